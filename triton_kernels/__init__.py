"""Triton kernels of unlearn_kernels (installed as ``unlearn_kernels.triton_kernels``).

Each module holds one op, exposed through ``torch.library.triton_op`` so that ``torch.compile``
can trace it. With ``TRITON_INTERPRET=1`` set before Triton is imported, the kernels run through
Triton's interpreter, slowly, on CPU tensors: that is how the test suite checks them on machines
without a GPU. The variable must be set that early because Triton's own library (``tl.sum``,
``tl.max``...) is made of ``@triton.jit`` functions whose mode is fixed when they are defined: an
interpreted kernel calling a compiled one fails.
"""
import os
import struct
from typing import Callable

import torch
import triton
from torch.library import triton_op


def _interpreted() -> bool:
    """Whether Triton runs its kernels through the interpreter: its knobs from Triton 3.4 on (which read
    TRITON_INTERPRET when Triton was imported), the variable itself before (where ``triton.knobs`` is missing)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Whether the kernels are interpreted.
INTERPRETED: bool = _interpreted()


def float64_bits(x: float) -> int:
    """``x`` as the int64 with its float64 bits: Triton passes a Python float to a kernel as fp32,
    so a float64 scalar travels as these bits (``bits.to(tl.int64).to(tl.float64, bitcast=True)``)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def can_read(t: torch.Tensor) -> bool:
    """Whether ``t`` holds values to read back (a flag, a scalar to check): not while tracing, when
    it is a fake or functional tensor."""
    return not torch._subclasses.fake_tensor.is_fake(t) and not torch.compiler.is_compiling()


def define_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator defining the op ``name`` from a Python body that launches Triton kernels.

    With compiled kernels this is a ``triton_op``, so ``torch.compile`` traces into the kernels. In
    interpreter mode ``wrap_triton`` hands back the interpreted kernel untraced, so the body cannot
    run on fake tensors: the op is then an opaque ``custom_op`` with ``fake`` as its fake
    implementation."""

    def define(fn: Callable) -> Callable:
        if not INTERPRETED:
            return triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return define
