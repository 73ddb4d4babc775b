"""Build script. Pure-Python install everywhere; the CUDA extension (dash_kernels._C) from csrc/
only where a CUDA build of torch and nvcc exist.

Environment:
  DASH_SKIP_CUDA_BUILD=1   never build the extension
  DASH_CUDA_ARCHS="9.0"    architectures to build for (default: the visible GPU, else 9.0)
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build)
  CUTLASS_INCLUDE=DIR      CUTLASS/CuTe headers (the directory holding cute/ and cutlass/) for the Hopper forward
                           and backward (DASH_CUDA_FWD=sm90, DASH_CUDA_BWD=sm90); default: those of the `nvidia-cutlass` package if importable.
                           Without them (or without 9.0 among the architectures) that forward is not built.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _note(msg: str) -> None:
    print(f"[dash_kernels] {msg}", file=sys.stderr)


def _cutlass_include():
    """The directory holding cute/tensor.hpp: $CUTLASS_INCLUDE, else the nvidia-cutlass package's headers."""
    env = os.environ.get("CUTLASS_INCLUDE")
    if env:
        if os.path.exists(os.path.join(env, "cute", "tensor.hpp")):
            return os.path.abspath(env)
        _note(f"CUTLASS_INCLUDE={env} has no cute/tensor.hpp: ignored.")
        return None
    try:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        inc = os.path.join(root, "source", "include")
        if os.path.exists(os.path.join(inc, "cute", "tensor.hpp")):
            return inc
    return None


def cuda_extensions():
    if os.environ.get("DASH_SKIP_CUDA_BUILD", "0") == "1":
        _note("DASH_SKIP_CUDA_BUILD=1: skipping the CUDA extension; Triton and reference backends only.")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        _note("no CUDA sources in csrc/ yet: installing the Triton and reference backends only.")
        return [], {}
    nvcc = shutil.which("nvcc")
    if nvcc and not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        # torch guesses CUDA_HOME as nvcc's grandparent: /usr/local for a /usr/local/bin/nvcc wrapper, which has
        # no lib64/libcudart.so to link; take the first candidate that has one
        guesses = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
        for home in guesses:
            if os.path.exists(os.path.join(home, "lib64", "libcudart.so")):
                os.environ["CUDA_HOME"] = home
                break
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _note("torch is not importable in this build environment (use `pip install --no-build-isolation .` "
              "to build the CUDA extension): skipping it.")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        _note("no CUDA build of torch or no nvcc found: skipping the CUDA extension.")
        return [], {}
    archs = os.environ.get("DASH_CUDA_ARCHS")
    if not archs:
        archs = "9.0"
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs = f"{major}.{minor}"
    gencode, built = [], []
    for arch in archs.replace(";", " ").replace(",", " ").split():
        num = arch.replace(".", "")
        if int(num) < 80:  # bf16 tensor-core fragments need sm_80
            _note(f"compute capability {arch} is below 8.0, which the CUDA kernels need: not built for it.")
            continue
        suffix = "a" if num == "90" else ""  # wgmma / setmaxnreg need sm_90a
        gencode += [f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}"]
        built.append(num)
    if not built:
        _note("no architecture of 8.0 or newer to build for: skipping the CUDA extension.")
        return [], {}
    # the extension reports what it was built for (torch.ops.dash_kernels_cuda.built_archs)
    defines = [f"-DDASH_BUILT_ARCHS={','.join(built)}"]
    include_dirs = [os.path.join(HERE, "csrc")]
    # The Hopper forward and backward (csrc/mixed_attention/fwd_sm90.cu, bwd_sm90.cu, CuTe wgmma) need the
    # CUTLASS/CuTe headers and sm_90a; without them those files compile to nothing and DASH_CUDA_FWD=sm90 /
    # DASH_CUDA_BWD=sm90 raise a clear error.
    cutlass_inc = _cutlass_include()
    if "90" not in built:
        _note("architecture 9.0 not among DASH_CUDA_ARCHS: the Hopper forward and backward (DASH_CUDA_FWD=sm90, DASH_CUDA_BWD=sm90) are skipped.")
    elif cutlass_inc is None:
        _note("CUTLASS/CuTe headers not found: the Hopper forward and backward (DASH_CUDA_FWD=sm90, DASH_CUDA_BWD=sm90) are skipped; to build them, "
              "`pip install nvidia-cutlass` (or set CUTLASS_INCLUDE=<cutlass>/include) and rebuild.")
    else:
        _note(f"building the Hopper forward and backward (DASH_CUDA_FWD=sm90, DASH_CUDA_BWD=sm90) with the CuTe headers in {cutlass_inc}")
        include_dirs.append(cutlass_inc)
        defines.append("-DDASH_WITH_SM90_CUTE=1")
    ext = CUDAExtension(
        name="dash_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        # C++20: torch 2.14's headers refuse anything older ("C++20 or later compatible compiler is required")
        # DASH_CUDA_LINEINFO=1: source-line tables for Nsight Compute's source view (benchmarks/ncu_source.py);
        # no effect on the generated code
        extra_compile_args={"cxx": ["-O3", "-std=c++20", *defines],
                            "nvcc": ["-O3", "-std=c++20", *gencode, *defines,
                                     *(["-lineinfo"] if os.environ.get("DASH_CUDA_LINEINFO") == "1" else [])]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="dash-kernels",
    version="0.1.0",
    description="DASH: differentiable architecture search for hybrid attention, with fused mixed-attention kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dash_kernels", "dash_kernels.*", "dash", "dash.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.0,<6",  # dash/ only; dash_kernels never imports it
        "pyyaml",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy"]},
    entry_points={"console_scripts": ["dash = dash.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
