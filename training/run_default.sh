#!/bin/sh
# (Re)start or resume the training run of the bundled default checkpoint, idempotently:
# if the run is already going, say so and do nothing; otherwise start it in the background
# with --resume (which continues from the newest checkpoint, or starts at step 0 if none).
#
#   training/run_default.sh            # start / resume
#   training/run_default.sh status     # is it running? last log line
#   training/run_default.sh stop       # SIGTERM: the trainer saves a checkpoint, then exits
#
# Outside git: RUN_DIR (default /work/runs/default), DATA (default /work/data/tokens).
set -eu
RUN_DIR=${RUN_DIR:-/work/runs/default}
DATA=${DATA:-/work/data/tokens}
PIDFILE="$RUN_DIR/train.pid"
mkdir -p "$RUN_DIR"

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-start}" in
  status)
    if running; then echo "running (pid $(cat "$PIDFILE"))"; else echo "not running"; fi
    tail -n 1 "$RUN_DIR/log.jsonl" 2>/dev/null || true
    ;;
  stop)
    if running; then kill -TERM "$(cat "$PIDFILE")"; echo "sent SIGTERM to $(cat "$PIDFILE"); it saves a checkpoint and exits"; else echo "not running"; fi
    ;;
  start)
    if running; then echo "already running (pid $(cat "$PIDFILE"))"; exit 0; fi
    nohup nanogpt-mlx train --config default-offline --data "$DATA" --out "$RUN_DIR" --resume \
      >>"$RUN_DIR/train.out" 2>&1 &
    echo $! >"$PIDFILE"
    echo "started (pid $!); output in $RUN_DIR/train.out, metrics in $RUN_DIR/log.jsonl"
    ;;
  *) echo "usage: $0 [start|status|stop]" >&2; exit 2 ;;
esac
