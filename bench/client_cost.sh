#!/usr/bin/env bash
# What a connection costs the client's core: `flood run` and the independent one-thread epoll
# client (`client_epoll`) against `flood serve`, the tokio peer and the raw io_uring peer, all
# in one run: server pinned to core 0, client to core 1, C=64, 3 interleaved rounds, medians.
# Issue 4's goal: flood's core µs/conn <= 0.7 x the epoll client's.
#
# Usage: bench/client_cost.sh [extra options for the client_cost binary, e.g. --rounds 1]
# Prints markdown tables; writes bench/results/client-cost-<UTC date-time>.json.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p floodgate-bench --bins
cargo build --release -q -p flood
bin_dir=target/release
mkdir -p bench/results
out="bench/results/client-cost-$(date -u +%Y%m%dT%H%M%SZ).json"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
# Every run is bounded (client --duration, server --max-seconds); the whole script by this.
exec timeout 600 "$bin_dir/client_cost" --bin-dir "$bin_dir" --out "$out" "$@"
