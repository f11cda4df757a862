"""Loads the compiled extension ``unlearn_kernels._C`` once; the package keeps working without it."""
from __future__ import annotations

import importlib.machinery
import warnings
from pathlib import Path

import torch  # noqa: F401  (the extension links against torch: torch must be loaded first)

#: the command that builds the extension (and installs the Triton kernels), run from the source tree: the one
#: place every message that says how to build it takes it from (this warning, ``backends``' reasons)
BUILD_COMMAND = "pip install --no-build-isolation -e ."
#: how to build the compiled extension, for the reasons it cannot be used
REBUILD = f"rebuild it with `{BUILD_COMMAND}` from the source tree"

try:
    from . import _C  # noqa: F401  (loading the library registers the C++/CUDA kernels)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    here = Path(__file__).parent
    if any((here / f"_C{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    else:  # Python's own message would blame "a circular import"
        LOAD_ERROR = f"it is not built: no _C library in {here}"
    warnings.warn(
        "unlearn_kernels: the compiled extension could not be loaded "
        f"({LOAD_ERROR}); the pure-PyTorch reference kernels will be used: {REBUILD}.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    """Whether the compiled C++ (and possibly CUDA) kernels are registered with the dispatcher."""
    return LOAD_ERROR is None
