#!/usr/bin/env bash
# A rolling restart under load: a 3-node local cluster, `holdfast bench` producing, and each
# node in turn sent SIGTERM (the local cluster restarts it 0.5 s later), STAGGER_S apart.
# bench reports the longest gap without an acknowledged send.
#   scripts/rolling-restart.sh [on|off]   # off: hand_over_on_stop = false in every node.toml
set -euo pipefail
HANDOVER=${1:-on}
H=${HOLDFAST:-./target/release/holdfast}
D=${DIR:-/tmp/hf-rolling-$$}
PORT=${PORT:-7811}
MESSAGES=${MESSAGES:-300000}
STAGGER_S=${STAGGER_S:-5}
rm -rf "$D"; mkdir -p "$D"
start_cluster() {
  "$H" cluster --dir "$D/data" --base-port "$PORT" --no-auth >>"$D/cluster.log" 2>&1 &
  CLUSTER=$!
}
start_cluster
sleep 3
if [ "$HANDOVER" = off ]; then
  kill -INT "$CLUSTER"; wait "$CLUSTER" || true
  for n in 1 2 3; do echo "hand_over_on_stop = false" >>"$D/data/node-$n/node.toml"; done
  start_cluster
  sleep 3
fi
export HOLDFAST_SERVERS="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))"
"$H" bench --messages "$MESSAGES" --topic roll >"$D/bench.log" 2>&1 &
BENCH=$!
sleep "$STAGGER_S"
for n in 1 2 3; do
  pid=$(pgrep -f "server --config $D/data/node-$n/node.toml" | head -1)
  echo "SIGTERM node $n (pid $pid) at $(date +%T.%N)"
  kill -TERM "$pid"
  sleep "$STAGGER_S"
done
wait "$BENCH" || true
kill -INT "$CLUSTER"; wait "$CLUSTER" || true
cat "$D/bench.log"
grep -h "handing over\|no group left\|still leading\|became leader" "$D"/data/node-*/*.log 2>/dev/null | tail -20 || true
