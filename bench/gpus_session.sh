#!/usr/bin/env bash
# One device-tool call of the several-GPU benchmark: start the steps once (setsid, so they outlive
# the call), wait up to WAIT seconds for them, and copy what is there to $OUT. Call it again (within
# the machine's 30 s warm window) to wait for the rest.   cd .gpu-gpus && WAIT=540 bash bench/gpus_session.sh
set -u
mkdir -p /tmp/zb /tmp/zw
if [ ! -f /tmp/zb/started ]; then
  touch /tmp/zb/started
  setsid bash bench/gpus_steps.sh > /tmp/zb/session.log 2>&1 < /dev/null &
fi
end=$((SECONDS + ${WAIT:-540}))
while [ $SECONDS -lt $end ] && [ ! -f /tmp/zb/done ]; do sleep 3; done
cat /tmp/zb/session.log
for f in /tmp/zb/*.json; do [ -f "$f" ] && cp "$f" "$OUT/"; done
tar czf "$OUT/logs.tgz" -C /tmp/zb $(cd /tmp/zb && ls *.log *.out 2>/dev/null) 2>/dev/null
ls /tmp/zb
[ -f /tmp/zb/done ] && echo "ALL DONE" || echo "STILL RUNNING"
