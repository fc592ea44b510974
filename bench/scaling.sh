#!/usr/bin/env bash
# Per-core scaling run: N Floodgate shards (cores 0..N-1) against N `flood run` clients, one
# pinned thread each (cores N..2N-1), closed loop; prints conn/s in all and per server core,
# the spread between shards (the listener's per-shard counts), server CPU per connection, and
# server and client core busy time per connection. Refuses an N the machine has no 2N cores
# for. On a 2-core machine only N=1 runs.
#
# Usage: bench/scaling.sh [--shards N] [--concurrency C] [--seconds S] [--rounds R] [--backend B]
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p floodgate-bench --bin scaling
cargo build --release -q -p flood
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# Every flood run is bounded by its --duration (at most 60 s, at most 20 rounds); the whole
# script by this.
exec timeout 1800 target/release/scaling --bin-dir target/release "$@"
