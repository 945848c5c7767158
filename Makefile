# Two commands: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench-dry clean-venv

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import shutil, sys; free = shutil.disk_usage("$(VENV)").free / 2**30; free < 9 and print(f"warning: {free:.1f} GiB free on the disk holding $(VENV): the install (torch with its CUDA libraries) takes about 6 GiB, and a test run about 3 GiB more (compiled kernels, temporary files)", file=sys.stderr)'
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sit_fast.demo

# The suite runs in TEST_WORKERS processes (pytest-xdist; the cores, at most 4), each given whole test
# files (--dist loadfile), so a file's module-scoped fixtures (the benchmark dry run, the DDP runs) run once;
# the longest files first, as conftest.py orders them (--no-loadscope-reorder keeps that order).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

test-all: $(STAMP)
	$(PYTEST) -m ""

bench-dry: $(STAMP)
	$(PY) -m benchmarks all --device cpu --size tiny --out /tmp/sit_fast_bench_dry

clean-venv:
	rm -rf $(VENV)
