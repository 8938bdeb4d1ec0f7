"""Builds moegate; the CUDA extension gate._C is built when torch has CUDA and nvcc is found.

Environment:
  MOEGATE_BUILD_CUDA   unset: build when possible; 0: never; 1: always, failing loudly if impossible.
  MOEGATE_CUDA_ARCHS   semicolon-separated nvcc targets, default "90a" (Hopper, wgmma/setmaxnreg/PDL).
                       Examples: "90a", "90a;80". Each becomes -gencode=arch=compute_X,code=sm_X.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(message):
    print(f"moegate setup: {message}", file=sys.stderr)


def _cuda_build_blocker():
    """None when gate._C can be built here, else the reason it cannot."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as error:
        return f"torch is not importable ({error}); install torch first and use --no-build-isolation"
    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _extension_kwargs():
    mode = os.environ.get("MOEGATE_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"MOEGATE_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        _say("MOEGATE_BUILD_CUDA=0: installing the pure-Python package (PyTorch fallbacks only)")
        return {}
    blocker = _cuda_build_blocker()
    if blocker is not None:
        if mode == "1":
            raise SystemExit(f"MOEGATE_BUILD_CUDA=1 but the CUDA extension cannot be built: {blocker}")
        _say(f"not building the CUDA extension: {blocker}; the pure-Python package still works")
        return {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = [a.strip() for a in os.environ.get("MOEGATE_CUDA_ARCHS", "90a").split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    sources = sorted(glob.glob("csrc/bindings/*.cpp")) + sorted(glob.glob("csrc/kernels/*.cu"))
    _say(f"building gate._C for {archs}")
    extension = CUDAExtension(
        name="gate._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # No -std here: torch picks the standard its own headers and library were built with
            # (C++20 for torch 2.10+); a different one breaks exceptions thrown across the ABI.
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", *gencode],
        },
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_kwargs())
