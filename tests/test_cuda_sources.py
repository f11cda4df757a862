"""Compile check of every CUDA source under csrc/ with nvcc.

The CUDA kernels are built only against a CUDA build of torch, which the CPU machines lack; nvcc
can still compile each ``.cu`` file to an object against the CPU torch's headers, which catches
syntax, template and API errors before a GPU build does. Flags follow the real build (setup.py's
nvcc flags plus torch's COMMON_NVCC_FLAGS), for sm_90. About 45-70 s of CPU time and 1.5 GB per
file, nearly all of it in torch's headers: the files compile side by side, one per core.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, CUDA_HOME, include_paths

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted(ROOT.glob("csrc/**/*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        found = os.path.join(CUDA_HOME, "bin", "nvcc")
    return found


NVCC = _nvcc()

# CPU wheels of torch lack this generated c10/cuda header; the real build defines the same macro.
_CMAKE_MACROS_SHIM = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def _compile(source: Path, workdir: Path) -> subprocess.CompletedProcess:
    shim = workdir / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    shim.parent.mkdir(parents=True)
    shim.write_text(_CMAKE_MACROS_SHIM)
    includes = [workdir / "include", *include_paths(), sysconfig.get_paths()["include"]]
    cmd = [
        NVCC, "-c", str(source), "-o", str(workdir / (source.stem + ".o")),
        "-arch=sm_90", "-std=c++20", "-O3", "-DNDEBUG", "-Xcompiler", "-fPIC",
        *COMMON_NVCC_FLAGS, *(f"-I{p}" for p in includes),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def compilations(tmp_path_factory: pytest.TempPathFactory):
    """Every source's nvcc run, started at once on a pool of one worker per core."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield {source: pool.submit(_compile, source, tmp_path_factory.mktemp(source.stem)) for source in CUDA_SOURCES}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or CUDA_HOME): CUDA sources cannot be compile-checked")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_source_compiles(source: Path, compilations: dict[Path, Future]) -> None:
    result = compilations[source].result()
    assert result.returncode == 0, (
        f"nvcc failed on {source.relative_to(ROOT)} (exit {result.returncode}):\n{result.stdout}{result.stderr}"
    )
