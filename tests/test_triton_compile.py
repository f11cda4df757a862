"""The Triton kernels compile for an H100/H200 (sm_90), checked without a GPU.

The rest of the suite runs the Triton kernels through the interpreter, which executes Python, not
Triton's compiler: a kernel can pass there and still fail to compile (a non-constexpr shape, a
dtype mix that tl.dot refuses) or ask for more shared memory than the GPU has. tests/triton_sm90.py
compiles every kernel, in a fresh process that defines them compiled, with the launch configuration
its module uses on a GPU and for every input dtype. Without the interpreter and without a GPU the
Triton backend must say it cannot run, not crash at its first launch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_sm90.py")

#: the dynamic shared memory one H100/H200 block may use (227 KiB); a launch asking for more fails
SM90_SHARED_BYTES = 232_448


@pytest.mark.parametrize("op", ["softmax_ce", "lanczos_step", "lora_linear"])
def test_triton_kernels_compile_for_sm90(op: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), op], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records, f"no kernel of {op} was compiled"
    failed = [f"{r['variant']}: {r.get('error')}" for r in records if not r["ok"]]
    assert not failed, "\n".join(failed)
    too_big = [f"{r['variant']}: {r['shared']} bytes" for r in records if r["shared"] > SM90_SHARED_BYTES]
    assert not too_big, f"more shared memory than an sm_90 block has ({SM90_SHARED_BYTES} bytes): {too_big}"
    # softmax_ce's rows and lora_linear's row tiles took tl.program_id(0) * ROWS in int32: from 2**31 rows on
    # the first row of a program wrapped negative, passed the rows < N mask and was read and written out of bounds
    wrapping = [r["variant"] for r in records if not r["int64_ids"]]
    assert not wrapping, f"program ids used in int32 arithmetic: {wrapping}"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="with a GPU the kernels run compiled")
def test_without_gpu_or_interpreter_the_triton_backend_is_unavailable() -> None:
    # Triton's own tl.sum / tl.max are compiled JIT functions unless TRITON_INTERPRET was set when
    # triton was imported: an interpreted kernel calling them failed at its first launch.
    code = (
        "import torch\n"
        "from unlearn_kernels import backends, ops\n"
        "from unlearn_kernels.backends import BackendUnavailableError\n"
        "assert not backends()['softmax_ce_hvp']['triton'].usable\n"
        "try:\n"
        "    ops.softmax_ce_hvp(torch.randn(4, 3), torch.randn(4, 3), backend='triton')\n"
        "except BackendUnavailableError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "backend 'triton' cannot run here" in result.stdout and "set TRITON_INTERPRET=1" in result.stdout
