#!/usr/bin/env bash
# 20 hand-overs between `flood serve` processes (shards alternating 2 and 1)
# while `flood run` floods them closed-loop at C=64; prints flood's errors,
# the served counts, and per hand-over the gap from the predecessor
# stopping to accept to the successor's first connection (negative: the
# successor was already accepting; both accept on the same sockets).
# Usage: bench/handover.sh [HANDOVERS]   (client and server share the cores)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
F=target/release/flood
D=$(mktemp -d); S=$D/sock
$F serve --listen 127.0.0.1:0 --shards 2 --stats-interval 0 --handover "$S" > "$D/s0" 2>/dev/null &
until [ -s "$D/s0" ]; do sleep 0.01; done
ADDR=$(head -1 "$D/s0" | sed 's/LISTENING //')
$F run --target "$ADDR" --concurrency 64 --duration 15s --json > "$D/run" 2>/dev/null &
RUN=$!
sleep 0.5
for i in $(seq 1 "$N"); do
  sh=$(( i % 2 == 0 ? 2 : 1 ))
  extra=(--handover "$S"); [ "$i" -eq "$N" ] && extra=(--max-seconds 120)
  $F serve --takeover "$S" --shards $sh --stats-interval 0 "${extra[@]}" > "$D/s$i" 2>/dev/null &
  until [ -s "$D/s$i" ]; do sleep 0.005; done
  if [ "$i" -lt "$N" ]; then
    # next successor may connect once this one is offering again
    until grep -q " $S\$" /proc/net/unix && [ -S "$S" ]; do sleep 0.005; done
  fi
  sleep 0.2
done
wait $RUN
LAST=$(pgrep -n -f -- "--takeover $S --shards" || true)
[ -n "$LAST" ] && kill -TERM "$LAST"
wait
python3 - "$D" "$N" <<'PY'
import json, sys, statistics
d, n = sys.argv[1], int(sys.argv[2])
run = json.load(open(f"{d}/run"))
srv = [json.loads(open(f"{d}/s{i}").read().splitlines()[-1]) for i in range(n + 1)]
served = sum(s["served"] for s in srv)
gaps = [(srv[i + 1]["first_accept_at_us"] - srv[i]["stopped_accepting_at_us"]) / 1000
        for i in range(n)]
print("errors by kind", {k: v for k, v in run["errors_by_kind"].items() if v})
print(f"hand-overs {n}  flood ok {run['ok']}  errors {run['errors']}  conn/s {run['conn_per_s']:.0f}  served total {served}  conserved {all(s['conserved'] for s in srv)}")
print("gap stop-accepting -> successor's first connection, ms: median %.3f  min %.3f  max %.3f" % (statistics.median(gaps), min(gaps), max(gaps)))
PY
rm -rf "$D"
