"""Build megan_fast and its C++ CPU kernels.

The C++ CPU kernels (csrc/) are always built; the GPU kernels are Triton
(megan_fast/triton/), compiled at run time, so the package builds on a machine
with no GPU and no CUDA toolkit.

Environment variables:
    MEGAN_FAST_DEBUG=1     -O0 -g
    MAX_JOBS               parallel compile jobs (torch's own)
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    debug = os.environ.get("MEGAN_FAST_DEBUG", "0") == "1"
    # -fopenmp at compile time only: at::parallel_for's OpenMP pragmas then
    # resolve against the OpenMP runtime torch already ships and loads.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx += ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]  # the C++ standard: torch's choice
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    return [CppExtension(name="megan_fast._C", sources=sources, include_dirs=[os.path.join(HERE, "csrc")],
                         extra_compile_args={"cxx": cxx}, py_limited_api=False)]


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
        "onnx": ["onnx", "onnxscript", "onnxruntime"],  # megan-fast export, and running its files
        "test": ["pytest", "pytest-benchmark", "expecttest"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    entry_points={"console_scripts": ["megan-fast=megan_fast.cli.main:main"]},
    zip_safe=False,
)
