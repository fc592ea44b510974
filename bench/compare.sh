#!/usr/bin/env bash
# Side-by-side load comparison: every peer server and Floodgate, pinned to core 0, flooded by
# `flood run` pinned to core 1. Saturated (cgroup CPU quota), normal (C=64, C=256), light (C=4)
# and open loop (20k/s); 3 interleaved rounds, medians. Needs root (cgroup, nginx install).
#
# Usage: bench/compare.sh [extra options for the compare binary, e.g. --rounds 1 --seconds 1]
# Prints markdown tables; writes bench/results/compare-<UTC date-time>.json.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p floodgate-bench --bins
cargo build --release -q -p flood
bin_dir=target/release

nginx_args=()
install_out=$(bash bench/nginx/install.sh 2>&1 || true)
if grep -q '^SKIP' <<<"$install_out"; then
    nginx_args=(--skip-nginx "$(grep '^SKIP' <<<"$install_out" | head -1 | sed 's/^SKIP nginx: //')")
else
    nginx_args=(--nginx-run bench/nginx/run.sh)
fi

out="bench/results/compare-$(date -u +%Y%m%dT%H%M%SZ).json"
# Every run is bounded (flood --duration, server --max-seconds); the whole script by this.
exec timeout 900 "$bin_dir/compare" --bin-dir "$bin_dir" "${nginx_args[@]}" --out "$out" "$@"
