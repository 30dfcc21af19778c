"""Build megan_fast and its C++ (and optional CUDA C++) kernels.

C++ CPU kernels are always built.  CUDA C++ sources (csrc/cuda/*.cu) are added
only when torch was built with CUDA and nvcc is found, so the package builds on
a machine with no GPU and no CUDA toolkit.  The GPU kernels proper are Triton
(megan_fast/triton/) and need no compilation.

Environment variables:
    MEGAN_FAST_NO_CUDA=1   never compile CUDA C++ sources
    MEGAN_FAST_DEBUG=1     -O0 -g
    TORCH_CUDA_ARCH_LIST   GPU architectures for CUDA C++ sources (torch's own)
    MAX_JOBS               parallel compile jobs (torch's own)
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))


def _have_nvcc() -> bool:
    if os.environ.get("MEGAN_FAST_NO_CUDA", "0") == "1":
        return False
    import torch

    if torch.version.cuda is None:
        return False
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return bool(nvcc and os.path.exists(nvcc)) or shutil.which("nvcc") is not None


def extensions():
    debug = os.environ.get("MEGAN_FAST_DEBUG", "0") == "1"
    # -fopenmp at compile time only: at::parallel_for's OpenMP pragmas then
    # resolve against the OpenMP runtime torch already ships and loads.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx += ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]  # the C++ standard: torch's choice
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs = dict(
        name="megan_fast._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        py_limited_api=False,
    )
    if cuda_sources and _have_nvcc():
        return [
            CUDAExtension(
                sources=sources + cuda_sources,
                extra_compile_args={"cxx": cxx + ["-DMEGAN_FAST_WITH_CUDA"], "nvcc": ["-O3", "--use_fast_math"]},
                **kwargs,
            )
        ]
    return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)]


setup(
    name="megan_fast",
    version="0.1.0",
    description="Fast MEGAN space-time video super-resolution: fused DCNv2, non-local attention and LMGA kernels",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megan_fast", "megan_fast.*"]),
    # The demo checkpoint (configs/megan_demo.yaml): megan-fast demo / upscale use it by default.
    package_data={"megan_fast": ["checkpoints/demo/config.json", "checkpoints/demo/model.safetensors"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "torchvision", "numpy", "safetensors", "pillow", "pyyaml", "tqdm", "av"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "expecttest"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    entry_points={"console_scripts": ["megan-fast=megan_fast.cli.main:main"]},
    zip_safe=False,
)
