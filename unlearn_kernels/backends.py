"""Which backend runs an op, and why the others cannot.

Every op has up to four backends: ``cpp`` (C++ CPU kernel), ``cuda`` (CUDA kernel), ``triton``
(Triton kernel) and ``reference`` (pure PyTorch, always available). ``backend="auto"`` takes the
fastest usable one for the input's device: C++ on CPU tensors; CUDA, then Triton, on GPU tensors;
the reference elsewhere. Forcing a backend that cannot run raises :class:`BackendUnavailableError`
with the reason.

This module knows no op by itself: the ops declare the backends they are implemented in with
:func:`register_ops` (``unlearn_kernels.ops`` does, beside its table ``OP_BACKENDS``), so the ops
import this module and never the other way round.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd import forward_ad

from . import _extension

BACKEND_NAMES = ("cpp", "cuda", "triton", "reference")
_KERNEL_KIND = {"cpp": "C++ CPU kernel", "cuda": "CUDA kernel", "triton": "Triton kernel",
                "reference": "reference"}
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


#: op name -> the backends it is implemented in, as declared with register_ops
_IMPLEMENTED: dict[str, tuple[str, ...]] = {}


def register_ops(implemented: Mapping[str, Sequence[str]]) -> None:
    """Declare, for each op (its dispatcher name), the backends it is implemented in (all or none of
    the declarations are taken)."""
    for op, names in implemented.items():
        unknown = set(names) - set(BACKEND_NAMES)
        if unknown:
            raise ValueError(f"{op}: unknown backends {sorted(unknown)}; choose from {BACKEND_NAMES}")
    _IMPLEMENTED.update({op: tuple(names) for op, names in implemented.items()})
    status.cache_clear()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this op on these inputs here."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run an op on this machine; ``reason`` says why (not) and how."""

    usable: bool
    reason: str

    def __str__(self) -> str:
        return ("usable" if self.usable else "unavailable") + f" ({self.reason})"


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return _extension.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"unlearn_kernels::{op}", dispatch_key
    )


@functools.cache
def triton_available() -> tuple[bool, str]:
    """Whether Triton kernels can run here: (usable, reason)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed: pip install triton"
    if importlib.util.find_spec(f"{__package__}.triton_kernels") is None:
        # installed into the package from the top-level triton_kernels/ (setup.py): a source tree lacks them
        return False, ("the package's Triton kernels are not installed: install the package "
                       f"({_extension.BUILD_COMMAND}) rather than run it from the source tree")
    try:
        from .triton_kernels import INTERPRETED
    except ImportError as error:  # torch before 2.6 has no torch.library.triton_op
        return False, (f"the package's Triton kernels cannot be imported ({error}): they need torch >= 2.6 "
                       "(torch.library.triton_op) and the triton that torch pins")
    if INTERPRETED:
        return True, "TRITON_INTERPRET=1: runs through the Triton interpreter, on CPU tensors too (for testing; slow)"
    if torch.cuda.is_available():
        return True, f"compiled for {torch.cuda.get_device_name()}"
    return False, ("no GPU; to run the Triton kernels through Triton's interpreter on the CPU (for testing), set "
                   "TRITON_INTERPRET=1 before Python imports triton")


@functools.cache  # what is built and visible does not change while the process runs
def status(op: str, backend: str) -> BackendStatus:
    """Static usability of ``backend`` for ``op`` on this machine (independent of the inputs)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKEND_NAMES}")
    if op not in _IMPLEMENTED:
        raise ValueError(f"unknown op {op!r}; the ops are {sorted(_IMPLEMENTED)}")
    if backend not in _IMPLEMENTED[op]:
        return BackendStatus(False, f"no {_KERNEL_KIND[backend]} for {op}")
    if backend == "reference":
        return BackendStatus(True, "pure PyTorch, runs on any device")
    if backend == "cpp":
        if not _extension.extension_loaded():
            return BackendStatus(False, f"extension not loaded: {_extension.LOAD_ERROR}; {_extension.REBUILD}")
        if not _has_kernel(op, "CPU"):
            return BackendStatus(False, "no C++ CPU kernel registered for this op")
        return BackendStatus(True, "compiled C++ CPU kernel")
    if backend == "cuda":
        if not _extension.extension_loaded():
            return BackendStatus(False, f"extension not loaded: {_extension.LOAD_ERROR}; {_extension.REBUILD}")
        if not _has_kernel(op, "CUDA"):
            why = "torch is a CPU build" if torch.version.cuda is None else "built without nvcc or CPU-only"
            return BackendStatus(False, f"CUDA kernels not compiled ({why})")
        if not torch.cuda.is_available():
            return BackendStatus(False, "compiled, but no CUDA device is visible")
        return BackendStatus(True, f"compiled CUDA kernel on {torch.cuda.get_device_name()}")
    return BackendStatus(*triton_available())


def _fits_device(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot take tensors on ``device`` (None if it can)."""
    if backend == "cpp" and device.type != "cpu":
        return f"the C++ CPU kernel needs CPU tensors, got {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"the CUDA kernel needs CUDA tensors, got {device}"
    if backend == "triton" and device.type != "cuda":
        from .triton_kernels import INTERPRETED

        if not (INTERPRETED and device.type == "cpu"):
            return f"Triton kernels need CUDA tensors (or CPU tensors in interpreter mode), got {device}"
    if backend == "triton" and device.type == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device is visible for tensors on {device} (the interpreter takes CPU tensors)"
    if backend == "triton" and device.type == "cuda" and device.index is not None:
        current = torch.cuda.current_device()  # Triton launches there, whatever device the tensors are on
        if device.index != current:
            return (f"Triton kernels launch on the current CUDA device, cuda:{current}, not the tensors' {device}: "
                    f"call torch.cuda.set_device({device.index}) first")
    return None


def check_backend_name(op: str, backend: Any) -> None:
    """TypeError unless ``backend`` is a str, ValueError unless it is "auto" or a backend's name, named by
    the op (also for a call with no tensors, whose device is unknown)."""
    if not isinstance(backend, str):  # the status cache would fail on an unhashable value first
        raise TypeError(f"{op}: backend must be a str, one of {('auto',) + BACKEND_NAMES}, "
                        f"got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKEND_NAMES:  # named by the op, as the other refusals are
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {('auto',) + BACKEND_NAMES}")


def choose(op: str, device: torch.device | str, backend: str = "auto") -> str:
    """The backend that runs ``op`` for inputs on ``device`` (a torch.device or its name): ``backend``
    itself if forced and able, else the first usable one in the automatic order. Raises
    BackendUnavailableError with the reason, ValueError for an unknown backend or device name."""
    check_backend_name(op, backend)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:  # torch's "Expected one of cpu, cuda, ... device type" for "gpu"
        raise ValueError(f"{op}: {device!r} is not a device: {err}") from None
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if status(op, name).usable and _fits_device(name, device) is None:
                return name
        return "reference"
    st = status(op, backend)
    if not st.usable:
        raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run here: {st.reason}")
    why = _fits_device(backend, device)
    if why is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run these inputs: {why}")
    return backend


def choose_for_dtype(op: str, device: torch.device | str, dtype: torch.dtype, backend: str,
                     cpp_dtypes: tuple[torch.dtype, ...]) -> str:
    """:func:`choose` for an op whose C++ kernel takes only ``cpp_dtypes``: for another ``dtype`` "auto" takes the
    reference and a forced "cpp" is refused (BackendUnavailableError)."""
    chosen = choose(op, device, backend)
    if chosen == "cpp" and dtype not in cpp_dtypes:
        if backend == "cpp":
            names = " and ".join(str(t).removeprefix("torch.") for t in cpp_dtypes)
            raise BackendUnavailableError(f"{op}: backend 'cpp' cannot run these inputs: the C++ kernel takes "
                                          f"{names}, got {dtype}")
        return "reference"
    return chosen


def reverse_mode_only(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must run an op's reference because a forward-mode tangent or one of torch.func's transforms
    reaches it: a compiled op registered with a backward only would give it a zero tangent (or no vmap rule)."""
    return torch._C._are_functorch_transforms_active() or any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# The choice depends only on what is installed and on the device, so torch.compile may treat it as a
# constant instead of tracing the dispatcher queries inside it. This is what @torch.compiler.assume_constant_result
# does, set by hand: the decorator imports torch._dynamo, which costs seconds at import and sets
# TORCHINDUCTOR_CACHE_DIR in os.environ (tests/test_backends.py pins the attribute).
choose._dynamo_marked_constant = True  # type: ignore[attr-defined]


class BackendReport(dict):
    """``{op: {backend: BackendStatus}}`` that prints as a table."""

    def __repr__(self) -> str:
        lines = []
        for op, per_backend in self.items():
            lines.append(op)
            lines.extend(f"  {name:<10} {st}" for name, st in per_backend.items())
        return "\n".join(lines)


def backends() -> BackendReport:
    """For every op, the status of each backend on this machine, e.g.
    ``{"softmax_ce_hvp": {"cpp": BackendStatus(True, ...), "cuda": BackendStatus(False, ...), ...}}``;
    printing it gives a table."""
    return BackendReport({op: {b: status(op, b) for b in BACKEND_NAMES} for op in _IMPLEMENTED})


def cpu_gemm() -> str:
    """Which GEMM the compiled passes (the fused MLP products and loss, the LoRA layer's big GEMMs, ``ops.gemm``)
    use for float32 CPU matmuls of at least 786,432 multiply-adds, here and now: ``"onednn"`` (torch's own oneDNN
    matmul, on a non-Intel x86 CPU with AVX-512, where it ran 2.0-2.3x faster than torch's MKL on an AMD EPYC: MKL
    takes its AVX2 path on AMD; and within :func:`onednn_gemm` on an Intel one), ``"aten"`` (ATen's GEMM, as
    ``torch.mm``: on Intel CPUs, whose MKL runs AVX-512 and made our products faster, elsewhere, for
    other dtypes, and within :func:`aten_gemm` or wherever ``torch.backends.mkldnn.enabled`` is False) or
    ``"unavailable"`` (the extension is not loaded). The two differ in rounding only."""
    if not _extension.extension_loaded():
        return "unavailable"
    return torch.ops.unlearn_kernels.cpu_gemm()


class _GemmRoute:
    """The state behind :func:`aten_gemm` and :func:`onednn_gemm`: how many runs of each are open (in any thread)
    and the mkldnn flag before the first ``aten_gemm``."""

    lock = threading.Lock()
    aten_depth = 0
    onednn_depth = 0
    was = True
    forced = False  # whether the outermost onednn_gemm() set the extension's flag


@contextlib.contextmanager
def aten_gemm() -> Iterator[None]:
    """Within: the compiled passes' float32 CPU GEMMs run through ATen's GEMM (``cpu_gemm()`` is ``"aten"``), for
    results rounded as ``torch.mm`` rounds them or to time the two routes. It sets ``torch.backends.mkldnn.enabled``,
    a process-wide flag, to False: while any run is open, in any thread, torch's own oneDNN paths (such as CPU
    convolutions) are off too, in every thread. The flag is set back to what it was once the last open run ends
    (runs may nest and overlap across threads). It wins over :func:`onednn_gemm`."""
    with _GemmRoute.lock:
        if _GemmRoute.aten_depth == 0:
            _GemmRoute.was = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _GemmRoute.aten_depth += 1
    try:
        yield
    finally:
        with _GemmRoute.lock:
            _GemmRoute.aten_depth -= 1
            if _GemmRoute.aten_depth == 0:
                torch.backends.mkldnn.enabled = _GemmRoute.was


@contextlib.contextmanager
def onednn_gemm() -> Iterator[None]:
    """Within: the compiled passes take oneDNN's GEMM wherever the CPU can run it (x86 with AVX-512, torch built
    with oneDNN), on an Intel CPU too, where ``cpu_gemm()`` otherwise says ``"aten"``: to test or time that route.
    Process-wide while any run is open, in any thread (runs may nest and overlap); :func:`aten_gemm` wins over it.
    A generic Hessian's linear layers take the route in force when its gradient graphs are built (at its
    construction): build the operator inside the block too. Without the extension it does nothing."""
    with _GemmRoute.lock:
        if _GemmRoute.onednn_depth == 0 and _extension.extension_loaded():
            torch.ops.unlearn_kernels.set_onednn_gemm_forced(True)
            _GemmRoute.forced = True
        _GemmRoute.onednn_depth += 1
    try:
        yield
    finally:
        with _GemmRoute.lock:
            _GemmRoute.onednn_depth -= 1
            if _GemmRoute.onednn_depth == 0 and _GemmRoute.forced:
                torch.ops.unlearn_kernels.set_onednn_gemm_forced(False)
                _GemmRoute.forced = False
