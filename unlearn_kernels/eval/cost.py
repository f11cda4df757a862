"""Cost of a call: wall time and peak memory, and the speed-up over retraining.

Peak memory is the peak *increase* over what was in use when the call started, so that the model
and data already in memory are not counted (:class:`PeakMemory`, which the benchmarks use too):

* CUDA (``device="cuda"`` or ``"cuda:k"``): exact, from the caching allocator:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at the start (tensor bytes; the allocator's cached reserve is not counted).
* CPU (``device=None`` or ``"cpu"``): the process's peak resident set on Linux (``VmHWM``, reset at
  the start by writing 5 to ``/proc/self/clear_refs``) minus the resident set at the start, after
  returning freed heap to the system (``malloc_trim``) so that reused free memory does not hide new
  allocations. It counts everything the process touches (other threads, the allocator's rounding,
  a library's workspace), so compare calls measured the same way. Where the peak cannot be reset
  (no ``/proc``, not Linux) it falls back to the growth of ``resource.getrusage().ru_maxrss``, the
  process's lifetime high-water mark, which reads 0 for a call that stays below an earlier peak.
"""
from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import check_device, check_number
from ..training import synchronize


@dataclass(frozen=True)
class Measured:
    """What :func:`measure` returns: the call's ``result``, its wall time in ``seconds`` and its
    ``peak_memory_bytes`` (peak increase over the start; see the module docstring)."""

    result: Any
    seconds: float
    peak_memory_bytes: int


class PeakMemory:
    """Peak memory added while a ``with`` block runs, in bytes (``.bytes`` after the block; see the
    module docstring for what it counts on each device). Blocks may nest: the process has one peak
    counter per device, so a block that resets it first hands the peak so far to the open ones."""

    _open: list["PeakMemory"] = []  # the blocks inside which their device's counter may be reset

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = check_device("PeakMemory: device", "cpu" if device is None else device, ("cpu", "cuda"))
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" and "cuda:0" are one counter, but
            # torch.device("cuda") != torch.device("cuda:0"): a nested block on the other name kept its peak apart
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.bytes = 0
        self._start = 0
        self._high_water_mark = True  # VmHWM, reset at the start; else ru_maxrss growth
        self._peak_before_reset = 0  # the highest VmHWM an inner block's reset erased

    def _hand_peak_to_open_blocks(self, peak: int) -> None:
        """Before this block resets its device's peak counter: the open blocks keep the peak so far."""
        for outer in PeakMemory._open:
            if outer.device == self.device:
                outer._peak_before_reset = max(outer._peak_before_reset, peak)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._hand_peak_to_open_blocks(torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            PeakMemory._open.append(self)
            return self
        with contextlib.suppress(OSError, AttributeError):  # best effort: not glibc, no malloc_trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            peak = _proc_status_bytes("VmHWM")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hand_peak_to_open_blocks(peak)
            self._start = _proc_status_bytes("VmRSS")
            PeakMemory._open.append(self)
        except OSError:
            self._high_water_mark = False
            self._start = _max_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            PeakMemory._open.remove(self)
            peak = max(torch.cuda.max_memory_allocated(self.device), self._peak_before_reset)
        elif self._high_water_mark:
            PeakMemory._open.remove(self)
            peak = max(_proc_status_bytes("VmHWM"), self._peak_before_reset)
        else:
            peak = _max_rss_bytes()
        self.bytes = max(0, peak - self._start)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"/proc/self/status has no {field}")


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def measure(fn: Callable[..., Any], *args: Any, device: torch.device | str | None = None, **kwargs: Any) -> Measured:
    """Call ``fn(*args, **kwargs)`` and measure its wall time and peak memory on ``device``.

    ``device``: a CUDA device to measure GPU memory (the device is synchronised before and after,
    so that the time covers the queued kernels), or None / ``"cpu"`` for the process's resident set
    (see the module docstring for what each measures). Exceptions of ``fn`` propagate.

    Raises:
        TypeError: ``fn`` is not callable.
        ValueError: ``device`` is not a device name, not the CPU or a CUDA device, or a CUDA device that
            is not visible (before ``fn`` is called).
    """
    if not callable(fn):
        raise TypeError(f"measure: fn must be callable, got {type(fn).__name__}")
    try:
        peak = PeakMemory(device)
    except ValueError as exc:
        raise ValueError(f"measure: {str(exc).removeprefix('PeakMemory: ')}") from None
    with peak:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        synchronize(peak.device)
        seconds = time.perf_counter() - start
    return Measured(result, seconds, peak.bytes)


def speedup(seconds: float, retrain_seconds: float) -> float:
    """Speed-up over retraining: ``retrain_seconds / seconds`` (> 1 means faster than retraining).

    Raises:
        ValueError: either time is not a finite number > 0 (a string, None, NaN or Inf, which gave a
            Python TypeError or a NaN or Inf speed-up).
    """
    seconds = check_number("speedup: seconds", seconds, 0.0, strict=True)
    retrain_seconds = check_number("speedup: retrain_seconds", retrain_seconds, 0.0, strict=True)
    return retrain_seconds / seconds
