#!/bin/bash
# usage: floorx.sh REPS MODES...
REPS=$1; shift
cd /work/main
rm -rf /tmp/rig/data9400
.venv/bin/s3proxy serve --host 127.0.0.1 --port 9400 --data-dir /tmp/rig/data9400 --embedded-s3-port 10400 > /tmp/rig/log9400 2>&1 &
SP=$!
for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:9400/healthz && break; sleep 0.3; done
export AWS_ACCESS_KEY_ID=$(python3 -c "import json;print(json.load(open('/tmp/rig/data9400/credentials.json'))['access_key'])")
export AWS_SECRET_ACCESS_KEY=$(python3 -c "import json;print(json.load(open('/tmp/rig/data9400/credentials.json'))['secret_key'])")
cp bench/designs/floor.py bench/designs/floorx_tmp.py && patch -s bench/designs/floorx_tmp.py bench/results/issue-15-session26/floor-variants.patch
for mode in "$@"; do
  FLOORMODE=$mode .venv/bin/python -m bench.designs.floorx_tmp --endpoint-url http://127.0.0.1:10400 --bucket uploads --port 9900 > /tmp/rig/floorx.log 2>&1 &
  PID=$!
  sleep 1.5
  curl -s -o /dev/null -F file=@/dev/shm/f1g http://127.0.0.1:9900/upload
  for r in $(seq $REPS); do
    read -r -a a < /proc/$PID/stat; u0=${a[13]}; s0=${a[14]}
    t0=$(date +%s.%N)
    curl -s -o /dev/null -w "%{http_code} " -F file=@/dev/shm/f1g http://127.0.0.1:9900/upload
    t1=$(date +%s.%N)
    read -r -a a < /proc/$PID/stat; u1=${a[13]}; s1=${a[14]}
    echo "$mode user $((u1-u0)) sys $((s1-s0)) cpu_s $(echo "scale=2; ($u1-$u0+$s1-$s0)/100" | bc) wall $(echo "$t1-$t0" | bc | cut -c1-5)"
  done
  kill $PID; wait $PID 2>/dev/null
done
rm -f bench/designs/floorx_tmp.py
kill -TERM $SP; wait $SP 2>/dev/null
