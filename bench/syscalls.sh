#!/usr/bin/env bash
# Syscalls and context switches per connection of one peer server under `flood run` at C=64
# (server pinned to core 0, flood to core 1; client and server share 2 cores), counted with
# `perf stat` on the syscall tracepoints over 1.5 s of a 2.2 s run. Needs perf and root.
#
# Usage: bench/syscalls.sh PEER [PEER ARGS...]   e.g. bench/syscalls.sh peer_floodgate --mode tokio
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/syscalls.sh PEER [ARGS...]" >&2; exit 2; }
command -v perf >/dev/null || { echo "perf is missing" >&2; exit 1; }
cargo build --release -q -p floodgate-bench --bins
cargo build --release -q -p flood
bin=target/release
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
peer=$1
shift
calls=io_uring_enter,read,write,epoll_wait,epoll_pwait2,epoll_ctl,nanosleep,clock_nanosleep,accept4,getpeername,getsockopt,sendto,close,futex
events=$(tr , '\n' <<<"$calls" | sed 's/^/syscalls:sys_enter_/' | paste -sd, -),context-switches
coproc SERVER { exec "$bin/$peer" "$@" --pin 0 --max-seconds 30; }
pid=$SERVER_PID
read -r -t 30 line <&"${SERVER[0]}"
addr=${line#LISTENING }
# Connections completed while perf counted: flood's count over the same window is not exact,
# so the per-connection figures divide by the server's own close(2) count when it has one.
(sleep 0.3; perf stat -x, -e "$events" -p "$pid" -o "$tmp/stat" -- sleep 1.5) &
stat_pid=$!
timeout 30 taskset -c 1 "$bin/flood" run --target "$addr" --concurrency 64 --duration 2.2s --json \
    >"$tmp/flood.json" 2>/dev/null || true
wait "$stat_pid" || true
kill "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
conns=$(awk -F, '/sys_enter_close/ {print $1}' "$tmp/stat")
echo "$peer $*: $conns closes in the window (one per connection)"
awk -F, -v n="$conns" '$3 ~ /sys_enter_|context/ {
    name = $3; sub("syscalls:sys_enter_", "", name); printf "  %-16s %8d  %.3f per connection\n", name, $1, $1 / n }' "$tmp/stat"
