"""Loads the compiled extension ``unlearn_kernels._C`` once; the package keeps working without it."""
from __future__ import annotations

import importlib.machinery
import warnings
from pathlib import Path

import torch  # noqa: F401  (the extension links against torch: torch must be loaded first)

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
        f"({LOAD_ERROR}); the pure-PyTorch reference kernels will be used. Rebuild it with "
        "`pip install --no-build-isolation -e .` from the source tree.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    """Whether the compiled C++ (and possibly CUDA) kernels are registered with the dispatcher."""
    return LOAD_ERROR is None
