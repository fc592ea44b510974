#!/usr/bin/env bash
# HTTP with a new connection per request: axum on Floodgate (floodgate::tokio::TcpListener) vs
# axum on tokio's own TcpListener, both on a tokio multi-thread runtime, and axum on one driven
# shard on a current_thread runtime (floodgate-driven), server pinned to core 0,
# `ab` (apache2-utils; no -k: no keep-alive) pinned to core 1. Prints requests/s and the server
# process's CPU µs per request (utime+stime from /proc/PID/stat over the ab run), medians of
# ROUNDS interleaved rounds, and the ratio of requests per server-CPU-second.
#
# Usage: bench/http.sh [REQUESTS (30000)] [CONCURRENCY (32)] [ROUNDS (3)]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-30000}
concurrency=${2:-32}
rounds=${3:-3}
if ! command -v ab >/dev/null; then
    echo "ab is missing: installing apache2-utils" >&2
    { apt-get install -y -q apache2-utils || { apt-get update -q && apt-get install -y -q apache2-utils; }; } >&2 \
        || { echo "cannot install ab (apache2-utils)" >&2; exit 1; }
fi
cargo build --release -q -p floodgate-bench --bin http_axum
bin=target/release/http_axum
tck=$(getconf CLK_TCK)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() { # engine round
    local engine=$1 out="$tmp/$1.$2"
    coproc SERVER { exec "$bin" --engine "$engine" --pin 0 --max-seconds 120; }
    local pid=$SERVER_PID line addr
    read -r -t 30 line <&"${SERVER[0]}" || { echo "$engine: no LISTENING line" >&2; kill "$pid"; return 1; }
    addr=${line#LISTENING }
    local before after
    before=$(cpu_ticks "$pid")
    timeout 120 taskset -c 1 ab -q -n "$requests" -c "$concurrency" -s 10 "http://$addr/" >"$out.ab" 2>&1 || true
    after=$(cpu_ticks "$pid")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local rps failed
    rps=$(awk '/^Requests per second/ {print $4}' "$out.ab")
    failed=$(awk '/^Failed requests/ {print $3}' "$out.ab")
    local us
    us=$(awk -v t=$((after - before)) -v k="$tck" -v n="$requests" 'BEGIN {printf "%.2f", t * 1e6 / k / n}')
    echo "$engine round $2: ${rps:-?} req/s, server ${us} µs CPU/req, failed ${failed:-?}"
    echo "$rps $us" >>"$tmp/$engine.all"
}

for r in $(seq 1 "$rounds"); do
    run tokio "$r"
    run floodgate "$r"
    run floodgate-driven "$r"
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo
echo "| axum on | requests/s (median) | server CPU µs/request (median) | requests per server-CPU-second |"
echo "|---|---:|---:|---:|"
for e in tokio floodgate floodgate-driven; do
    rps=$(awk '{print $1}' "$tmp/$e.all" | median)
    us=$(awk '{print $2}' "$tmp/$e.all" | median)
    per=$(awk -v u="$us" 'BEGIN {printf "%.0f", 1e6 / u}')
    printf '| %s | %.0f | %s | %s |\n' "$e" "$rps" "$us" "$per"
    eval "us_${e//-/_}=$us"
done
awk -v f="$us_floodgate" -v d="$us_floodgate_driven" -v t="$us_tokio" 'BEGIN {
    printf "\nrequests per server-CPU-second vs axum on tokio (goal >= 1.2): floodgate %.3f, floodgate-driven %.3f\n", t / f, t / d }'
echo "($requests requests per run, concurrency $concurrency, $rounds interleaved rounds; client and server share 2 cores)"
