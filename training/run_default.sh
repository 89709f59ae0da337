#!/bin/sh
# (Re)start or resume the training run of the bundled default checkpoint, idempotently:
# if the run is already going, say so and do nothing; otherwise start it in the background
# with --resume (which continues from the newest checkpoint, or starts at step 0 if none).
# A supervisor loop restarts the trainer (from its newest checkpoint) if it dies abnormally,
# e.g. killed by the OOM killer on a shared machine; a clean exit (done, or SIGTERM from
# `stop`, which saves a checkpoint first) or a usage error (exit 2) ends it.
#
#   training/run_default.sh            # start / resume
#   training/run_default.sh status     # is it running? last log line
#   training/run_default.sh stop       # SIGTERM: the trainer saves a checkpoint, then exits
#
# Outside git: RUN_DIR (default /work/runs/default), DATA (default /work/data/tokens), CORPUS
# (default /work/data/corpus). If DATA has no manifest yet (a fresh machine), `start` first builds
# the offline corpus and tokenizes it, in the same background job.
set -eu
RUN_DIR=${RUN_DIR:-/work/runs/default}
DATA=${DATA:-/work/data/tokens}
CORPUS=${CORPUS:-/work/data/corpus}
PIDFILE="$RUN_DIR/train.pid"          # the trainer process
SUPERVISOR="$RUN_DIR/supervisor.pid"  # the restart loop around it
mkdir -p "$RUN_DIR"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running() { alive "$SUPERVISOR" || alive "$PIDFILE"; }

case "${1:-start}" in
  status)
    if running; then echo "running (trainer pid $(cat "$PIDFILE" 2>/dev/null))"; else echo "not running"; fi
    tail -n 1 "$RUN_DIR/log.jsonl" 2>/dev/null || true
    ;;
  stop)
    if alive "$PIDFILE"; then
      kill -TERM "$(cat "$PIDFILE")"
      echo "sent SIGTERM to $(cat "$PIDFILE"); it saves a checkpoint and exits"
    else
      echo "not running"
    fi
    ;;
  start)
    if running; then echo "already running (trainer pid $(cat "$PIDFILE" 2>/dev/null))"; exit 0; fi
    RUN_DIR="$RUN_DIR" DATA="$DATA" CORPUS="$CORPUS" PIDFILE="$PIDFILE" nohup sh -c '
      if [ ! -f "$DATA/manifest.json" ]; then
        echo "no token shards in $DATA: building the corpus in $CORPUS and tokenizing it"
        python -m nanogpt_mlx.training.corpus --out "$CORPUS" || exit 1
        nanogpt-mlx prepare-data "$CORPUS/train.jsonl" --val-input "$CORPUS/val.jsonl" --out "$DATA" || exit 1
      fi
      while :; do
        nanogpt-mlx train --config default-offline --data "$DATA" --out "$RUN_DIR" --resume &
        echo $! >"$PIDFILE"
        rc=0; wait $! || rc=$?
        case $rc in 0|2|130) echo "trainer exited with $rc"; break ;; esac
        echo "trainer exited with $rc; resuming from the newest checkpoint in 60 s"
        sleep 60
      done' >>"$RUN_DIR/train.out" 2>&1 &
    echo $! >"$SUPERVISOR"
    sleep 1
    echo "started (trainer pid $(cat "$PIDFILE")); output in $RUN_DIR/train.out, metrics in $RUN_DIR/log.jsonl"
    ;;
  *) echo "usage: $0 [start|status|stop]" >&2; exit 2 ;;
esac
