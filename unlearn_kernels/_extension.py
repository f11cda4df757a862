"""Loads the compiled extension ``unlearn_kernels._C`` once; the package keeps working without it."""
from __future__ import annotations

import importlib.machinery
import os
import warnings
from pathlib import Path

import torch  # the extension links against torch: torch must be loaded first

#: the command that builds the extension (and installs the Triton kernels), run from the source tree: the one
#: place every message that says how to build it takes it from (this warning, ``backends``' reasons)
BUILD_COMMAND = "pip install --no-build-isolation -e ."
#: how to build the compiled extension, for the reasons it cannot be used
REBUILD = f"rebuild it with `{BUILD_COMMAND}` from the source tree"

#: the marker csrc/ops.cpp compiles into the library: the CPU features its kernels need, comma-separated, then ";"
CPU_FEATURES_MARKER = b"unlearn_kernels_cpu_features="


def missing_cpu_features(library: Path, cpu_flags: set[str] | None) -> list[str]:
    """The CPU features ``library`` was compiled for (its :data:`CPU_FEATURES_MARKER`) that are not among
    ``cpu_flags`` (those of /proc/cpuinfo; None where unknown: nothing is missing then, nor for a library
    without the marker)."""
    data = library.read_bytes()
    start = data.find(CPU_FEATURES_MARKER)
    if cpu_flags is None or start < 0:
        return []
    start += len(CPU_FEATURES_MARKER)
    needed = data[start:data.index(b";", start)].decode("ascii").split(",")
    return [feature for feature in needed if feature and feature not in cpu_flags]


#: where Linux lists the CPU's feature flags
CPUINFO = "/proc/cpuinfo"


def _cpu_flags() -> set[str] | None:
    """This CPU's feature flags as Linux lists them (:data:`CPUINFO`), None elsewhere; without AVX2 and FMA where
    torch's own CPUID reading found no AVX2 (its capability "DEFAULT" with no ATEN_CPU_CAPABILITY override):
    /proc/cpuinfo describes the host's CPU under an emulator (qemu's SandyBridge still listed avx2)."""
    try:
        with open(CPUINFO) as f:
            flags = set(f.read().split())
    except OSError:
        return None
    if not os.environ.get("ATEN_CPU_CAPABILITY") and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        flags -= {"avx2", "fma"}
    return flags


def _load() -> str | None:
    """Loads ``_C``; None, or why it cannot be used. A library compiled for CPU features this CPU lacks (an
    AVX2 build on an older x86) is not loaded: loading it would end the process with an illegal instruction."""
    here = Path(__file__).parent
    libraries = [here / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    library = next((path for path in libraries if path.exists()), None)
    if library is None:  # Python's own message would blame "a circular import"
        return f"it is not built: no _C library in {here}"
    missing = missing_cpu_features(library, _cpu_flags())
    if missing:
        return (f"it was compiled for CPU features this CPU lacks ({', '.join(missing)}), so loading it would end "
                f"the process with an illegal instruction: build it here with UNLEARN_KERNELS_CPU_ARCH=generic")
    try:
        from . import _C  # noqa: F401  (loading the library registers the C++/CUDA kernels)
    except ImportError as exc:  # built against another torch
        return f"{type(exc).__name__}: {exc}"
    return None


LOAD_ERROR: str | None = _load()
if LOAD_ERROR is not None:
    warnings.warn(
        "unlearn_kernels: the compiled extension could not be loaded "
        f"({LOAD_ERROR}); the pure-PyTorch reference kernels will be used: {REBUILD}.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    """Whether the compiled C++ (and possibly CUDA) kernels are registered with the dispatcher."""
    return LOAD_ERROR is None
