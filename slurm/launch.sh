# Sourced by train.sbatch and sweep.sbatch: start the ranks, forward the stop signal, requeue on exit 75.
#   softcpt_launch REQUEUE_ID CLI_ARGS...     (runs `python -m softcpt_dist.cli CLI_ARGS...` on every rank)
# LAUNCH=srun (default): one task per GPU, world from SLURM's variables. LAUNCH=torchrun: one task per
# node running torchrun (NPROC_PER_NODE, default the node's GPUs) with a c10d rendezvous at the first node.
# The ranks save a checkpoint and exit 75 on STOP_SIGNAL (default USR1; under torchrun the agent is sent
# TERM, which it forwards); the job is then requeued (`scontrol requeue REQUEUE_ID`) and exits 0.

LAUNCH=${LAUNCH:-srun}
PYTHON=${SOFTCPT_PYTHON:-python3}
STOP_SIGNAL=${STOP_SIGNAL:-USR1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

softcpt_launch() {
  local requeue_id=$1 step rc=0 stopped=0 forward_as=$STOP_SIGNAL
  shift
  echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $LAUNCH," \
    "master $MASTER_ADDR:$MASTER_PORT"
  case "$LAUNCH" in
    srun) srun --kill-on-bad-exit=1 "$PYTHON" -m softcpt_dist.cli "$@" & ;;
    torchrun)
      forward_as=TERM
      srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" \
        --nproc-per-node="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}" --rdzv-backend=c10d \
        --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" -m softcpt_dist.cli "$@" & ;;
    *) echo "LAUNCH=$LAUNCH is not srun or torchrun" >&2; return 2 ;;
  esac
  step=$!
  trap 'stopped=1; echo "stop signal: forwarding $forward_as to the ranks"; kill -s "$forward_as" "$step" || true' \
    "$STOP_SIGNAL"
  wait "$step" || rc=$?
  while kill -0 "$step" 2>/dev/null; do rc=0; wait "$step" || rc=$?; done  # `wait` returns early when a trap runs
  if [ "$rc" -eq 75 ] || { [ "$stopped" -eq 1 ] && [ "$rc" -ne 0 ]; }; then
    echo "checkpoint saved (exit $rc): requeueing job $requeue_id"
    scontrol requeue "$requeue_id"
    return 0
  fi
  return "$rc"
}
