# Sourced by run.sbatch and sweep.sbatch (not a job script itself): stages shards if asked, then starts
# one tpi_mpi rank per Slurm task with srun or mpirun. Reads the variables set at the top of those scripts.

tpi_fail() {  # one line, like tpi_mpi's own errors, and a non-zero exit of the job
  echo "tpi_mpi: error: $*" >&2
  exit 2
}

# Each task copies its own rank_R/ (R = its Slurm task id = its MPI rank) from SHARDS to STAGE_DIR on its
# node, under a temporary name renamed into place; a copy with the same manifest is reused. srun and
# MPICH's mpirun both give a node a block of consecutive ranks, so the copy lands where the rank runs.
tpi_stage() {
  [ -n "$SHARDS" ] || tpi_fail "STAGE_DIR=$STAGE_DIR needs SHARDS: the split to copy from"
  [ "$(realpath -m "$STAGE_DIR")" != "$(realpath -m "$SHARDS")" ] || tpi_fail "STAGE_DIR must differ from SHARDS"
  srun --mpi=none --kill-on-bad-exit=1 --ntasks="$SLURM_NTASKS" bash -c '
    set -e; src=$1/rank_$SLURM_PROCID; dst=$0/rank_$SLURM_PROCID
    [ -f "$src/manifest.json" ] || { echo "tpi_mpi: error: $src has no manifest.json: split the model for $SLURM_NTASKS ranks into $1" >&2; exit 2; }
    cmp -s "$src/manifest.json" "$dst/manifest.json" 2>/dev/null && exit 0
    mkdir -p "$0"; tmp=$(mktemp -d "$0/.rank_$SLURM_PROCID.XXXXXX"); cp -r "$src/." "$tmp/"
    rm -rf "$dst"; mv "$tmp" "$dst"' "$STAGE_DIR" "$SHARDS"
}

# tpi_launch HYDRA_RUN_DIR 'OVERRIDES' [MODULE]: OVERRIDES are Hydra overrides quoted as in a shell; MODULE is
# the entry point (tpi_mpi.run by default; serve.sbatch gives tpi_mpi.serve).
tpi_launch() {
  local run_dir=$1 line=$2 module=${3:-tpi_mpi.run} shards=$SHARDS py=$VENV/bin/python
  [ -x "$py" ] || tpi_fail "VENV=$VENV has no bin/python: set VENV to the tpi_mpi virtual environment"
  local -a args=() cmd=()
  # Split the override line as a shell would (prompt="two words" stays one word), without running it.
  mapfile -d '' -t args < <("$py" -c 'import shlex, sys; sys.stdout.write("\0".join(shlex.split(sys.argv[1])))' "$line")
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
  if [ -n "$STAGE_DIR" ]; then
    tpi_stage
    shards=$STAGE_DIR
  fi
  case $LAUNCHER in
    srun)
      [ "$SRUN_MPI" = pmix ] && export PMIX_MCA_psec=${PMIX_MCA_psec:-native} OMPI_MCA_mpi_yield_when_idle=1
      cmd=(srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1) ;;
    mpirun)
      cmd=("$VENV/bin/mpirun" -n "$SLURM_NTASKS") ;;
    *) tpi_fail "LAUNCHER=$LAUNCHER: choose srun or mpirun" ;;
  esac
  local -a base=("hydra.run.dir=$run_dir" "model.path=$MODEL" "output.results=$RESULTS")
  [ -n "$shards" ] && base+=("model.shards=$shards")
  echo "tpi_mpi: job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}: ${cmd[*]} python -m $module ${base[*]} ${args[*]}" >&2
  cd "$REPO" || tpi_fail "REPO=$REPO does not exist"
  "${cmd[@]}" "$py" -m "$module" "${base[@]}" "${args[@]}"
}
