# Everything runs inside a local virtualenv that the first target creates.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this exact torch lies on the build machines; GPU users can override it,
# e.g. `make test TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: install test test-fast demo docs bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,train,docs,eval]"
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) tests

test-fast: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" tests

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py --output_dir outputs/demo

docs: install
	$(VENV)/bin/mkdocs build --strict

bench: install
	$(PY) benchmarks/bench_attention.py --output benchmarks/results/cpu-attention.json
	$(PY) benchmarks/bench_models.py --output benchmarks/results/cpu-models.json

clean:
	rm -rf $(VENV) site outputs
