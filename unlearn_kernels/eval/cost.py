"""Cost of a call: wall time and peak memory, and the speed-up over retraining.

Peak memory is the peak *increase* over what was in use when the call started, so that the model
and data already in memory are not counted:

* CUDA (``device="cuda"`` or ``"cuda:k"``): exact, from the caching allocator:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at the start (tensor bytes; the allocator's cached reserve is not counted).
* CPU (``device=None`` or ``"cpu"``): an estimate, the peak resident-set size (RSS) of the process
  sampled every ``interval`` seconds by a background thread from ``/proc/self/statm``, minus the
  RSS at the start. Limitations: a spike shorter than the interval can be missed; RSS counts the
  whole process (other threads too) and depends on the allocator (memory freed but not returned
  to the OS and then reused is not counted again). Where ``/proc`` does not exist (not Linux) it
  falls back to the growth of ``resource.getrusage().ru_maxrss``, the process's lifetime high-water
  mark, which reads 0 for a call that stays below an earlier peak.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import check_number

_STATM = "/proc/self/statm"


@dataclass(frozen=True)
class Measured:
    """What :func:`measure` returns: the call's ``result``, its wall time in ``seconds`` and its
    ``peak_memory_bytes`` (peak increase over the start; see the module docstring)."""

    result: Any
    seconds: float
    peak_memory_bytes: int


def _rss_bytes() -> int:
    with open(_STATM) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class _RssSampler:
    """Samples the RSS in a daemon thread: ``start`` is the RSS on creation, ``peak`` the largest
    sample seen."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure(
    fn: Callable[..., Any], *args: Any, device: torch.device | str | None = None, interval: float = 1e-3,
    **kwargs: Any,
) -> Measured:
    """Call ``fn(*args, **kwargs)`` and measure its wall time and peak memory on ``device``.

    ``device``: a CUDA device to measure GPU memory (the device is synchronised before and after,
    so that the time covers the queued kernels), or None / ``"cpu"`` for the process RSS (see the
    module docstring for what each measures). ``interval``: the CPU sampling period in seconds.
    Exceptions of ``fn`` propagate.
    """
    if not callable(fn):
        raise TypeError(f"measure: fn must be callable, got {type(fn).__name__}")
    interval = check_number("measure: interval", interval, 0.0, strict=True)
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"measure: device {dev} requested but CUDA is not available")
        torch.cuda.synchronize(dev)
        start_bytes = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        return Measured(result, seconds, max(0, torch.cuda.max_memory_allocated(dev) - start_bytes))
    if dev.type != "cpu":
        raise ValueError(f"measure: device must be 'cpu' or a CUDA device, got {dev}")
    if not os.path.exists(_STATM):
        start_peak = _max_rss_bytes()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        return Measured(result, seconds, max(0, _max_rss_bytes() - start_peak))
    with _RssSampler(interval) as sampler:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
    return Measured(result, seconds, max(0, sampler.peak - sampler.start))


def speedup(seconds: float, retrain_seconds: float) -> float:
    """Speed-up over retraining: ``retrain_seconds / seconds`` (> 1 means faster than retraining)."""
    if not (seconds > 0 and retrain_seconds > 0):
        raise ValueError(f"speedup: both times must be > 0 seconds, got {seconds} and {retrain_seconds}")
    return retrain_seconds / seconds
