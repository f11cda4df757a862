"""Build of the compiled extension ``unlearn_kernels._C``.

Environment flags (all optional):
  UNLEARN_KERNELS_CPU_ONLY=1    build only the C++ CPU kernels, even where CUDA is available.
  UNLEARN_KERNELS_NO_EXTENSION=1  build nothing (a machine without a C++ compiler): the package then runs
                                every op through its pure-PyTorch reference. Without it, a build that
                                fails stops the install.
  UNLEARN_KERNELS_FORCE_CUDA=1  fail if the CUDA kernels cannot be built (torch without CUDA, or no
                                nvcc) instead of building the CPU kernels alone. Without it, the
                                CUDA kernels are built whenever torch has CUDA and nvcc is found;
                                no GPU is needed.
  MAX_JOBS=N                    parallel compile jobs (read by torch's ninja build).
  CUDA_HOME=/usr/local/cuda     the CUDA toolkit (read by torch, as is CUDA_PATH); with neither set, the
                                one the nvcc on PATH reports (torch alone took the folder above nvcc,
                                a wrapper script's).
  TORCH_CUDA_ARCH_LIST="9.0"    CUDA architectures to compile for (read by torch). Unset, torch compiles
                                for the GPUs it sees; with none visible the build uses DEFAULT_CUDA_ARCHS.
  UNLEARN_KERNELS_CPU_ARCH=generic  compile the CPU kernels without AVX2 (for a binary that must run
                                on other x86 machines); by default ("auto") AVX2+FMA+F16C is used when the
                                build machine has it, as PyTorch's own AVX2 kernels do, and the package
                                does not load such a build on a CPU without it. Another value is an error.
Always install with ``pip install --no-build-isolation``: nothing is downloaded during the build.
"""
import glob
import os
import re
import shutil
import subprocess

import setuptools
import torch
from setuptools import find_packages, setup


def _toolkit_of_nvcc() -> str | None:
    """The CUDA toolkit of the nvcc on PATH as nvcc reports it (its ``TOP``), or None.

    torch takes the folder above nvcc's path, which is wrong where nvcc is a wrapper script outside the
    toolkit (as /usr/local/bin/nvcc on this project's machines): the link then failed with "cannot find
    -lcudart"."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        run = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", run.stdout + run.stderr, re.MULTILINE)
    return os.path.normpath(top.group(1).strip()) if top else None


# before torch.utils.cpp_extension reads CUDA_HOME (once, at import)
if torch.version.cuda is not None and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    toolkit = _toolkit_of_nvcc()
    if toolkit is not None:
        os.environ["CUDA_HOME"] = toolkit

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


# pyproject.toml's licence fields (PEP 639) need setuptools 77; an older one, which --no-build-isolation
# leaves in place (a new venv of Python < 3.12 has 65), fails reading them with a schema error
if int(setuptools.__version__.split(".")[0]) < 77:
    raise RuntimeError(f"unlearn-kernels: the build needs setuptools >= 77, found {setuptools.__version__}: "
                       "pip install -U 'setuptools>=77'")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _build_cuda() -> bool:
    if _flag("UNLEARN_KERNELS_CPU_ONLY"):
        return False
    # torch sets CUDA_HOME wherever /usr/local/cuda exists, also in runtime images without nvcc
    has_toolchain = (torch.version.cuda is not None and CUDA_HOME is not None
                     and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if _flag("UNLEARN_KERNELS_FORCE_CUDA"):
        if not has_toolchain:
            raise RuntimeError(
                "UNLEARN_KERNELS_FORCE_CUDA=1 needs a CUDA build of torch and nvcc "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    return has_toolchain


# Turing, Ampere and Hopper binaries (a binary serves the later GPUs of its major version) and PTX that
# the driver compiles for the GPUs after them
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def _cuda_arch_list() -> str | None:
    """The TORCH_CUDA_ARCH_LIST a CUDA build must set: None where the user set one or a GPU is visible.

    Unset and with no GPU visible, torch's build took the architectures of the GPUs it sees (none) and
    failed inside torch with an IndexError."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return None
    return DEFAULT_CUDA_ARCHS


#: where Linux lists the build machine's CPU feature flags
CPUINFO = "/proc/cpuinfo"


def _cpu_vector_flags() -> list[str]:
    """AVX2 flags for ATen's vector types (at::vec) when this x86 machine has AVX2, FMA and F16C.

    Without CPU_CAPABILITY_AVX2, at::vec::Vectorized falls back to scalar loops and scalar exp. The library
    records the choice (csrc/ops.cpp), and the package does not load an AVX2 build on a CPU without AVX2."""
    arch = os.environ.get("UNLEARN_KERNELS_CPU_ARCH", "auto").strip().lower()
    if arch not in ("auto", "generic"):  # "x86-64" or a typo gave the AVX2 build without a word
        raise RuntimeError(f"UNLEARN_KERNELS_CPU_ARCH must be 'auto' or 'generic', got "
                           f"{os.environ['UNLEARN_KERNELS_CPU_ARCH']!r}")
    if arch == "generic":
        return []
    try:
        with open(CPUINFO) as f:
            flags = set(f.read().split())
    except OSError:
        return []
    # torch's CPUID reading, as the package's loader takes it: /proc/cpuinfo lists the host's CPU under an emulator
    no_avx2 = not os.environ.get("ATEN_CPU_CAPABILITY") and torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    if {"avx2", "fma", "f16c"} <= flags and not no_avx2:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _extension():
    # csrc/*.cpp: the schemas and the device-agnostic passes, compiled in every build.
    sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -g0: Python's CFLAGS carry -g, which made the library 27 times larger (15.7 MB, 0.59 MB without)
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-DNDEBUG", *_cpu_vector_flags()]
    if _build_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        archs = _cuda_arch_list()
        if archs is not None:
            print(f"unlearn-kernels: no GPU visible, CUDA kernels built for TORCH_CUDA_ARCH_LIST={archs}")
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        return CUDAExtension(
            "unlearn_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DNDEBUG"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "unlearn_kernels._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
    )


def _extensions() -> list:
    if not _flag("UNLEARN_KERNELS_NO_EXTENSION"):
        return [_extension()]
    if _flag("UNLEARN_KERNELS_FORCE_CUDA"):  # else FORCE_CUDA would build nothing without a word
        raise RuntimeError("UNLEARN_KERNELS_NO_EXTENSION=1 builds nothing, UNLEARN_KERNELS_FORCE_CUDA=1 the CUDA "
                           "kernels: set one of them")
    return []


packages = find_packages(include=["unlearn_kernels", "unlearn_kernels.*"])
packages.append("unlearn_kernels.triton_kernels")

setup(
    packages=packages,
    # triton_kernels/ lives at the top of the repository but installs inside our namespace:
    # PyPI already owns the top-level import name `triton_kernels`.
    package_dir={"unlearn_kernels.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
