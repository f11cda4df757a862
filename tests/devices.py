"""The devices and (backend, device) pairs the kernel and operator tests run on: the CPU always,
"cuda" too when a GPU is visible, so that one ``pytest`` run on a GPU machine covers both.

Use the ``device`` fixture of tests/conftest.py (a test that takes it runs once per device), or
parametrise with :data:`DEVICES` / :func:`backend_devices`.
"""
from __future__ import annotations

import torch

from unlearn_kernels.backends import status

DEVICES: tuple[str, ...] = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
"""Every device a test should run on here."""

AUTOCAST_DTYPE: dict[str, torch.dtype] = {"cpu": torch.bfloat16, "cuda": torch.float16}
"""The lower precision the autocast tests run each device type in (the tests of ops that follow F.linear)."""

# Triton takes CPU tensors only through its interpreter, i.e. where no GPU is visible.
_BACKENDS_ON = {"cpu": ("reference", "cpp") + (() if torch.cuda.is_available() else ("triton",)),
                "cuda": ("reference", "cuda", "triton")}


def backend_devices(op: str, *, compiled_only: bool = False) -> list[tuple[str, str]]:
    """``(backend, device)`` for every backend of ``op`` that can run here, on each device it takes:
    on the CPU the reference, the C++ kernel and Triton through its interpreter; on a GPU the
    reference, the CUDA kernel and compiled Triton. A backend the op lacks is left out; one it has
    but that cannot run here (the C++ kernel not built) is kept, so that its test fails instead of
    passing silently. ``compiled_only`` leaves out the reference."""
    from unlearn_kernels.ops import OP_BACKENDS

    pairs = []
    for device in DEVICES:
        for backend in _BACKENDS_ON[device]:
            if backend not in OP_BACKENDS[op] or (compiled_only and backend == "reference"):
                continue
            if backend == "triton" and not status(op, "triton").usable:  # Triton is optional
                continue
            pairs.append((backend, device))
    return pairs


DEVICE_ERRORS = [
    ("", None, "--device '' is not a device name: use cpu, cuda or cuda:N"),
    ("tpu", None, "--device 'tpu' is not a device name: use cpu, cuda or cuda:N"),
    ("cpu:1", None, "--device 'cpu:1' cannot run here: there is one CPU device, cpu"),
    ("cuda:0", 0, "--device 'cuda:0' cannot run here: no CUDA device is visible"),
    ("cuda:7", 1, "--device 'cuda:7' cannot run here: 1 CUDA device(s) visible (cuda:0)"),
]
"""``(--device, CUDA devices visible or None for this machine's, the error)``: the refusals of
``unlearn-kernels run`` and ``python -m benchmarks`` alike, and of ``StudyConfig`` (one check,
``checks.check_device``)."""
