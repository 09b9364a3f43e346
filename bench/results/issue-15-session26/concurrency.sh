#!/bin/bash
# usage: conc.sh PORT N CONC -- proxy args : N uploads of /dev/shm/f64m, CONC at a time
PORT=$1; N=$2; C=$3; shift 4
cd /work/main
rm -rf /tmp/rig/data$PORT
.venv/bin/s3proxy serve --host 127.0.0.1 --port $PORT --data-dir /tmp/rig/data$PORT --embedded-s3-port $((PORT+1000)) --memory-budget 64MiB --part-size 8MiB "$@" > /tmp/rig/log$PORT 2>&1 &
PID=$!
for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:$PORT/healthz && break; sleep 0.3; done
curl -s -o /dev/null -F file=@/dev/shm/f64m http://127.0.0.1:$PORT/upload  # warm
for rep in 1 2; do
  read -r -a a < /proc/$PID/stat; u0=${a[13]}; s0=${a[14]}
  t0=$(date +%s.%N)
  seq $N | xargs -P $C -I{} curl -s -o /dev/null -F file=@/dev/shm/f64m http://127.0.0.1:$PORT/upload
  t1=$(date +%s.%N)
  read -r -a a < /proc/$PID/stat; u1=${a[13]}; s1=${a[14]}
  echo "n=$N c=$C cpu_s_per_GiB $(echo "scale=3; ($u1-$u0+$s1-$s0)/100/($N/16)" | bc) wall $(echo "$t1-$t0" | bc | cut -c1-5)"
done
kill -TERM $PID; wait $PID 2>/dev/null
