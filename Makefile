# compacter-jax: `make run` (the main job) and `make test`. Both install first when needed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export COMPACTER_DATA_DIR ?= $(abspath ../shared/data)
# Tests and examples run on the CPU with a few fake devices for data-parallel checks.
export JAX_PLATFORMS ?= cpu

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: install
	$(PY) -m experiments.glue --config experiments/configs/glue.py --workdir runs/sst2_compacterpp

test: install
	$(PY) -m pytest -n 2 --dist loadfile --durations=10 --nbmake --nbmake-timeout=300 tests notebooks

bench: install
	$(PY) -m benchmarks.efficiency --model random:t5-base --batch 8 --src-len 128 --tgt-len 8 --steps 5 --json benchmarks/results/t5-base_cpu_f32_all.json

clean:
	rm -rf $(VENV) runs
