# compacter-jax: `make run` (the main job) and `make test`. Both install first when needed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# `make run JAX_EXTRA=cuda12` (or cuda13, tpu) installs JAX for the accelerator; empty = CPU/plain jax.
JAX_EXTRA ?=
export COMPACTER_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install install-test run test bench clean

# The runtime (make run) needs no torch: the test extra (torch as the numerical reference,
# pytest, nbmake) is installed by `make test` only.
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e .
	$(if $(JAX_EXTRA),$(PY) -m pip install -q -c constraints.txt "jax[$(JAX_EXTRA)]")
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

run: install
	$(PY) -m experiments.glue --config experiments/configs/glue.py --workdir runs/sst2_compacterpp

# Tests and notebooks run on the CPU with a few fake devices for data-parallel checks.
test: export JAX_PLATFORMS ?= cpu
test: install-test
	$(PY) -m pytest -n 2 --dist loadfile --durations=10 --nbmake --nbmake-timeout=300 tests notebooks

bench: export JAX_PLATFORMS ?= cpu
bench: install-test
	$(PY) -m benchmarks.efficiency --model random:t5-base --batch 8 --src-len 128 --tgt-len 8 --steps 5 --json benchmarks/results/t5-base_cpu_f32_all.json

clean:
	rm -rf $(VENV) runs
