"""Shared benchmark machinery: timing, environment description, correctness gate, JSON + table.

Every suite checks each candidate against a float64 reference before timing it (a wrong kernel is
reported as such and never timed), times all candidates in one run on the same inputs (one after
another, or interleaved round by round where the ratios matter most), and reports medians and
ratios against the baseline candidate. The gate's call also measures the candidate's peak memory
(:func:`peak_memory`), so every suite's JSON has ``peak_memory_bytes`` beside the time.
"""
from __future__ import annotations

import gc
import importlib.metadata
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from unlearn_kernels.backends import aten_gemm, cpu_gemm
from unlearn_kernels.checkpoint import save_json, software_versions
from unlearn_kernels.eval import PeakMemory
from unlearn_kernels.training import synchronize

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ANCHORS = ("numpy", "scipy", "peft", "curvlinops-for-pytorch", "PyHessian")
"""The packages the suites time ours against (their versions go into every JSON)."""


def synchronized(fn: Callable[..., object], device: torch.device) -> Callable[..., object]:
    """``fn``, followed by a synchronisation of ``device`` on a GPU, so that a timer (pytest-benchmark's
    included) sees the work and not only its launch; ``fn`` itself elsewhere."""
    if device.type != "cuda":
        return fn

    def call(*args: object) -> object:
        out = fn(*args)
        synchronize(device)
        return out
    return call


MIN_SAMPLES = 5  # a median and quartiles of fewer calls say little, however long each call
MAX_SAMPLES = 200  # time_callable's cap on its samples
MAX_ROUNDS = 100  # measure_interleaved's cap on its rounds


def time_callable(fn: Callable[[], object], device: torch.device, *, min_time: float = 0.5,
                  warmup: int = 2) -> list[float]:
    """Seconds per call, one sample per call after ``warmup`` calls, until ``min_time`` is spent
    (at least :data:`MIN_SAMPLES` samples, at most :data:`MAX_SAMPLES`)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    spent = 0.0
    while (spent < min_time or len(samples) < MIN_SAMPLES) and len(samples) < MAX_SAMPLES:
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return samples


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_gemm": cpu_gemm(),  # the GEMM of our compiled float32 CPU passes: "onednn" or "aten" (torch.mm's)
        **software_versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":  # float32 convolutions and matmuls rounded to TF32 or not
        env["tf32"] = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["anchors"] = {package: package_version(package) for package in ANCHORS}  # a ratio means little without them
    return env


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (a distribution name), None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


@dataclass
class Measurement:
    """One candidate on one case."""

    case: str
    candidate: str
    median_s: float | None
    iqr_s: float | None
    max_abs_err: float | None
    status: str = "ok"  # "ok", "wrong" (failed the correctness gate, not timed) or "unavailable: ..."
    extra: dict = field(default_factory=dict)
    peak_memory_bytes: int | None = None  # added by the gate's call (peak_memory), or by its set-up and call


def peak_memory(device: torch.device) -> PeakMemory:
    """The package's :class:`~unlearn_kernels.eval.PeakMemory` after a garbage collection, so that
    what earlier candidates freed is released before the block starts."""
    gc.collect()
    return PeakMemory(device)


def kernel_backends(device: torch.device) -> tuple[str, ...]:
    """The compiled backends timed on ``device`` (on the CPU the Triton kernels only run through the
    interpreter: not timed). Each is a candidate whether or not it can run here: one that cannot is a row
    "unavailable: <why>", which fails the run (a missing or broken build must not pass as a short table)."""
    return ("cpp",) if device.type == "cpu" else ("cuda", "triton")


def plain_error_tolerance(plain: torch.Tensor, exact: torch.Tensor, floor: float) -> float:
    """The correctness gate of every suite (flash-attention's rule): at most twice the max abs error
    of the plain PyTorch computation in the same dtype against the float64 ``exact``, plus ``floor``
    (a few eps of the output's scale, for when that error is exactly 0)."""
    return 2 * (plain.double() - exact).abs().max().item() + floor


def check_plain(plain: torch.Tensor, exact: torch.Tensor, rtol: float = 0.05) -> None:
    """AssertionError unless the plain PyTorch computation's max abs error against the float64 ``exact`` is at
    most ``rtol`` of the output's scale. The gates are twice that error, so a baseline candidate, which is the
    plain computation, is gated by itself and would pass whatever it computed: a plain computation of something
    else (a sign, a missing term) is off by about the output's scale, while float32's rounding stays far below
    (1.6e-3 of it under the lanczos suite's near-span cancellation, 1.3e-5 for the C = 32,000 softmax HVP)."""
    scale = exact.abs().max().item() if exact.numel() else 0.0
    error = (plain.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert error <= rtol * scale, f"the plain PyTorch computation's error {error:.3e} > {rtol:g} x its scale {scale:.3e}"


def within_aten_gemm(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` called within :func:`unlearn_kernels.aten_gemm`: a candidate of ours whose compiled float32 GEMMs take
    torch's own GEMM, as the anchors' do, beside the one that may take oneDNN's."""
    def call() -> object:
        with aten_gemm():
            return fn()
    return call


def unavailable(exc: BaseException) -> str:
    """The status of a candidate that cannot run here: ``"unavailable: <type>: <message>"``, the message whole
    (the runner looks in it for the reasons a suite expects, which may come after a long class name; it was cut
    at 200 characters), on one line of the table."""
    return f"unavailable: {type(exc).__name__}: {exc}".replace("\n", " ")


def check(case: str, candidate: str, fn: Callable[[], torch.Tensor], exact: torch.Tensor,
          tolerance: float) -> Measurement:
    """The correctness gate alone: one call, max abs error against ``exact`` <= tolerance, and the
    call's peak memory (:func:`peak_memory` on ``exact``'s device). The result has no time yet; its
    status says "ok", "wrong" (also for an output of another shape, which would broadcast against
    ``exact``; ``extra["shape"]`` then names it) or "unavailable: <why>"."""
    try:
        with peak_memory(exact.device) as peak:
            out = fn()
    except Exception as exc:  # a candidate that cannot run here is reported, not fatal
        return Measurement(case, candidate, None, None, None, unavailable(exc))
    if out.shape != exact.shape:
        return Measurement(case, candidate, None, None, None, "wrong", {"shape": list(out.shape)},
                           peak_memory_bytes=peak.bytes)
    err = (out.double() - exact).abs().max().item()
    return Measurement(case, candidate, None, None, err, "ok" if err <= tolerance else "wrong",
                       peak_memory_bytes=peak.bytes)


def set_time(m: Measurement, samples: list[float]) -> Measurement:
    """Sets ``m``'s median and interquartile range (``statistics.quantiles``' exclusive rule) of the timed
    ``samples`` (seconds); returns ``m``."""
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    m.median_s, m.iqr_s = statistics.median(samples), q[2] - q[0]
    return m


def measure(case: str, candidate: str, fn: Callable[[], torch.Tensor], exact: torch.Tensor, tolerance: float,
            device: torch.device, **timing) -> Measurement:
    """Correctness gate against ``exact`` (max abs error <= tolerance), then timing."""
    m = check(case, candidate, fn, exact, tolerance)
    return set_time(m, time_callable(fn, device, **timing)) if m.status == "ok" else m


def measure_interleaved(timed: list[tuple[Measurement, Callable[[], object]]], device: torch.device, *,
                        min_time: float = 0.5, burst: float = 0.05, warmup: int = 1) -> None:
    """Times candidates that passed :func:`check` in turn and sets their median and IQR.

    A shared machine has slow phases that last seconds: timing one candidate after another lets
    such a phase land on one of them and skew the ratios. Here every round gives each candidate a
    burst of calls (``warmup`` untimed calls, which restore its caches and allocator state after
    the others ran, then timed calls for about ``burst`` seconds, at least one), so slow phases are
    spread over all candidates alike while each is still timed in steady state, as in a solver
    loop. Rounds go on until every candidate has ``min_time`` of samples (at least :data:`MIN_SAMPLES`),
    or for :data:`MAX_ROUNDS`."""
    samples: list[list[float]] = [[] for _ in timed]
    for _ in range(MAX_ROUNDS):
        for (_, fn), out in zip(timed, samples):
            for _ in range(warmup):
                fn()
            synchronize(device)
            spent = 0.0
            while spent < burst or spent == 0.0:
                start = time.perf_counter()
                fn()
                synchronize(device)
                out.append(time.perf_counter() - start)
                spent += out[-1]
        if all(len(s) >= MIN_SAMPLES and sum(s) >= min_time for s in samples):
            break
    for (m, _), s in zip(timed, samples):
        set_time(m, s)


def write_results(suite: str, device: torch.device, measurements: list[Measurement], baseline: str,
                  config: dict, out_dir: Path = RESULTS_DIR, measured_with: dict | None = None) -> Path:
    """JSON with the environment, config, every measurement and its ratio to ``baseline``
    (baseline time / candidate time: > 1 means faster than the baseline). ``measured_with`` replaces
    entries of :func:`environment` that the writing process cannot tell, for a suite that measures in
    other processes (its ``MEASURED_WITH``)."""
    rows = []
    for m in measurements:
        row = asdict(m)
        base = next((b for b in measurements if b.case == m.case and b.candidate == baseline), None)
        row["speedup_vs_" + baseline] = (
            base.median_s / m.median_s if base and base.median_s and m.median_s else None
        )
        rows.append(row)
    payload = {"suite": suite, "environment": {**environment(device), **(measured_with or {})}, "config": config,
               "results": rows}
    return save_json(payload, result_path(suite, device, out_dir))


def result_path(suite: str, device: torch.device, out_dir: Path = RESULTS_DIR) -> Path:
    """Where :func:`write_results` writes ``suite``'s JSON: ``<out_dir>/<suite>_<cpu|gpu>.json``."""
    return out_dir / f"{suite}_{'gpu' if device.type == 'cuda' else 'cpu'}.json"


def format_table(measurements: list[Measurement], baseline: str) -> str:
    """A plain-text table: case, candidate, median, ratio to the baseline, error, status."""
    width = max([22] + [len(m.candidate) for m in measurements])
    header = (f"{'case':<28} {'candidate':<{width}} {'median':>11} {'vs ' + baseline:>12} {'max err':>10} "
              f"{'peak mem':>10}  status")
    lines = [header, "-" * len(header)]
    for m in measurements:
        base = next((b for b in measurements if b.case == m.case and b.candidate == baseline), None)
        ratio = f"{base.median_s / m.median_s:.2f}x" if base and base.median_s and m.median_s else "-"
        med = f"{m.median_s * 1e3:.3f} ms" if m.median_s is not None else "-"
        err = f"{m.max_abs_err:.1e}" if m.max_abs_err is not None else "-"
        mem = f"{m.peak_memory_bytes / 2**20:.1f} MiB" if m.peak_memory_bytes is not None else "-"
        lines.append(f"{m.case:<28} {m.candidate:<{width}} {med:>11} {ratio:>12} {err:>10} {mem:>10}  {m.status}")
    return "\n".join(lines)
