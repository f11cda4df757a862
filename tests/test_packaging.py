"""What the sdist and the build script give a user who does not build from a clone: an sdist with every
source the build reads, and a CUDA build that does not need a visible GPU."""
import os
import re
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import setuptools

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist_members(tmp_path_factory) -> set[str]:
    """The files of the sdist built from this tree, relative to its top folder."""
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
                   cwd=REPOSITORY, check=True, capture_output=True)
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_the_sdist_holds_every_source_and_header_the_build_reads(sdist_members):
    """The sdist held the .cpp files setup.py lists but neither the headers they include nor the CUDA
    sources: building it failed at the first ``#include "../lanczos_step.h"``."""
    sources = {str(p.relative_to(REPOSITORY)) for p in (REPOSITORY / "csrc").rglob("*")
               if p.suffix in (".h", ".cpp", ".cu")}
    assert sources and sources <= sdist_members, sorted(sources - sdist_members)
    for source in sorted(sources):
        for include in re.findall(r'#include\s+"([^"]+)"', (REPOSITORY / source).read_text()):
            assert os.path.normpath(os.path.join(os.path.dirname(source), include)) in sdist_members, (source, include)
    kernels = {str(p.relative_to(REPOSITORY)) for p in (REPOSITORY / "triton_kernels").glob("*.py")}
    assert kernels <= sdist_members and {"LICENSE", "README.md", "setup.py", "pyproject.toml"} <= sdist_members


def test_the_sdist_leaves_out_the_suite_and_build_outputs(sdist_members):
    """A part of the suite (it reads the docs, examples and benchmarks of a clone) cannot run from the sdist."""
    assert not [m for m in sdist_members if m.startswith("tests/") or m.endswith((".so", ".o", ".pyc"))]


def _setup_functions(monkeypatch) -> dict:
    """setup.py's functions, without running setup() (nor its CUDA branch, which sets TORCH_CUDA_ARCH_LIST in the
    environment where no GPU is visible)."""
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("UNLEARN_KERNELS_CPU_ONLY", "1")
    monkeypatch.chdir(REPOSITORY)
    return runpy.run_path(str(REPOSITORY / "setup.py"), run_name="setup_under_test")


@pytest.mark.parametrize("gpus, env, expected", [
    (0, None, "default"),  # torch took the architectures of the GPUs it sees: none, and an IndexError inside it
    (0, "8.6", None),  # the user's choice stands
    (1, None, None),  # torch compiles for the GPU it sees
])
def test_a_cuda_build_without_a_visible_gpu_gets_architectures(gpus, env, expected, monkeypatch):
    import torch

    functions = _setup_functions(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if env is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", env)
    archs = functions["_cuda_arch_list"]()
    assert archs == (functions["DEFAULT_CUDA_ARCHS"] if expected == "default" else None)
    if archs is not None:  # each entry an architecture torch's build takes, the last with PTX for later GPUs
        assert all(re.fullmatch(r"\d+\.\d+(\+PTX)?", a) for a in archs.split(";")) and archs.endswith("+PTX")


def test_an_old_setuptools_is_named_before_the_build(monkeypatch):
    """With --no-build-isolation a venv's setuptools 65 stays in place, and reading pyproject.toml's licence
    failed with "`project.license` must be valid exactly by one definition"."""
    monkeypatch.setattr(setuptools, "__version__", "65.5.0")
    with pytest.raises(RuntimeError, match=r"needs setuptools >= 77, found 65\.5\.0"):
        _setup_functions(monkeypatch)


@pytest.mark.parametrize("reports, expected", [("#$ TOP=/opt/cuda-13.0/bin/..", "/opt/cuda-13.0"), ("", None)])
def test_the_toolkit_is_the_one_nvcc_reports(reports, expected, monkeypatch, tmp_path):
    """torch took the folder above the nvcc on PATH for the toolkit: with /usr/local/bin/nvcc a wrapper script
    (as on this project's machines) a CUDA build failed to link ("cannot find -lcudart")."""
    functions = _setup_functions(monkeypatch)
    wrapper = tmp_path / "nvcc"
    wrapper.write_text(f"#!/bin/sh\necho '{reports}' >&2\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert functions["_toolkit_of_nvcc"]() == expected
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert functions["_toolkit_of_nvcc"]() is None


@pytest.mark.parametrize("no_extension", [False, True])
def test_the_extension_can_be_left_out_of_the_build(no_extension, monkeypatch):
    """On a machine without a C++ compiler the build failed and nothing was installed, and no flag left the
    extension out, although the package runs every op through its reference without it."""
    kept = {}
    _setup_functions(monkeypatch)  # the environment it sets (CPU only, the repository as working folder)
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: kept.update(kwargs))
    if no_extension:
        monkeypatch.setenv("UNLEARN_KERNELS_NO_EXTENSION", "1")
    runpy.run_path(str(REPOSITORY / "setup.py"), run_name="setup_under_test")
    names = [extension.name for extension in kept["ext_modules"]]
    assert names == ([] if no_extension else ["unlearn_kernels._C"])
    if no_extension:  # with FORCE_CUDA, which asks for the CUDA kernels, it built nothing without a word
        monkeypatch.setenv("UNLEARN_KERNELS_FORCE_CUDA", "1")
        with pytest.raises(RuntimeError, match="UNLEARN_KERNELS_NO_EXTENSION=1 builds nothing, "
                                               "UNLEARN_KERNELS_FORCE_CUDA=1 the CUDA kernels: set one of them"):
            runpy.run_path(str(REPOSITORY / "setup.py"), run_name="setup_under_test")


def test_an_unknown_cpu_arch_is_refused_and_generic_read_in_any_case(monkeypatch):
    """"x86-64" or "Generic" gave the AVX2 build without a word (only the exact string "generic" was read)."""
    functions = _setup_functions(monkeypatch)
    for value in ("x86-64", "avx512"):
        monkeypatch.setenv("UNLEARN_KERNELS_CPU_ARCH", value)
        with pytest.raises(RuntimeError, match=rf"UNLEARN_KERNELS_CPU_ARCH must be 'auto' or 'generic', got '{value}'"):
            functions["_cpu_vector_flags"]()
    monkeypatch.setenv("UNLEARN_KERNELS_CPU_ARCH", " Generic ")
    assert functions["_cpu_vector_flags"]() == []


def test_a_cuda_home_without_nvcc_builds_the_cpu_kernels(monkeypatch, tmp_path):
    """torch sets CUDA_HOME wherever /usr/local/cuda exists, as in CUDA runtime images without nvcc: the build then
    took the CUDA kernels and failed at the first .cu file instead of building the CPU kernels alone."""
    import torch

    functions = _setup_functions(monkeypatch)
    monkeypatch.delenv("UNLEARN_KERNELS_CPU_ONLY")
    monkeypatch.delenv("UNLEARN_KERNELS_FORCE_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    build_cuda = functions["_build_cuda"]
    monkeypatch.setitem(build_cuda.__globals__, "CUDA_HOME", str(tmp_path))
    assert build_cuda() is False
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    assert build_cuda() is True


def test_the_build_takes_no_avx2_where_torchs_cpuid_reading_found_none(monkeypatch, tmp_path):
    """The loader counts AVX2 as missing where torch's capability is DEFAULT (an emulator's /proc/cpuinfo lists the
    host's flags); the build read /proc/cpuinfo alone and made an AVX2 library that every import then refused.
    (A cpuinfo of a CPU with AVX2, FMA and F16C is given, and one without them.)"""
    import torch

    functions = _setup_functions(monkeypatch)
    cpuinfo = tmp_path / "cpuinfo"
    vector_flags = functions["_cpu_vector_flags"]
    monkeypatch.setitem(vector_flags.__globals__, "CPUINFO", str(cpuinfo))
    monkeypatch.delenv("UNLEARN_KERNELS_CPU_ARCH", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n")
    assert "-mavx2" in vector_flags()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert vector_flags() == []
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")  # a SandyBridge
    assert vector_flags() == []
