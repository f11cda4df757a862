"""Data-parallel curvature: one Hessian-vector product and one gradient over a large batch, by
``hessian_operator(..., process_group=pg)`` on 2 processes with one thread each (each holding half
of the rows) against one process with one thread over all the rows.

The two workers are spawned once (gloo on CPU, NCCL on GPUs, one GPU each) and build their
operator; the parent builds the single-process one. Correctness gates: the single-process product and
gradient against float64 ones by plain autograd (double backward) over all rows, none of the package's
operators, by the other suites' rule (max abs error at most twice plain float32 autograd's, plus 16 eps of
the scale: a gate of the same kernel against itself once passed a product 1% off), and the distributed ones
against the single-process ones (relative difference <= 1e-5). Timing is
interleaved: rounds alternate a burst of single-process calls (the workers idle) with a burst of
distributed calls (the parent idles), so that a slow phase of a shared machine hits both. A
distributed call is timed on rank 0 from a barrier to the end of its all_reduce, i.e. the slower
rank plus the reduction. Each measurement's ``extra["cpu_s"]`` is the median CPU time of the
(timing) process per call: on a machine shared with other work, where two processes do not get
two cores, it shows how the work was split even when the wall time cannot.

A third candidate, the control ``2 processes, no all_reduce``, times each rank's local call alone
(the same half of the rows, no communication; from a barrier to a barrier after it, i.e. the slower
rank): what two processes can do on this machine at that moment. Its ratio to one process is the
machine's ceiling for the distributed call (on a virtual machine whose two cores are sometimes
placed on one physical core, far below 2x), and the distributed call's gap to it is the cost of the
reduction.
"""
from __future__ import annotations

import copy
import datetime
import os
import queue
import signal
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from unlearn_kernels.curvature import flatten_tensors, hessian_operator, unflatten_vector
from unlearn_kernels.training import synchronize

from .common import MIN_SAMPLES, Measurement, peak_memory, plain_error_tolerance, set_time
from .hvp import autograd_hvp, seeded_mlp

BASELINE = "1 process"
QUICK = {"quick": True, "min_time": 0.1}
"""What the runner passes for ``--quick``."""
WORLD = 2
DISTRIBUTED = f"{WORLD} processes"
OURS = (BASELINE, DISTRIBUTED)
"""The package's candidates here (the runner fails when one is wrong; the control is a part of the second)."""
EXPECTED_UNAVAILABLE = ("NCCL takes one per process",)
"""Why the suite's rows may be unavailable without failing the run: fewer GPUs than processes."""
CONTROL = f"{WORLD} processes, no all_reduce"
GATE_RTOL = 1e-5
THREADS = 1
"""Torch threads of every measured process: the parent for the single process, each worker for the others."""
MEASURED_WITH = {"cpu_threads": THREADS, "processes": {BASELINE: 1, DISTRIBUTED: WORLD, CONTROL: WORLD}}
"""What the measured processes ran with, for the JSON's environment: the runner's thread count (its
``--threads``) is not what they used."""


def _problem(quick: bool) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n, widths = (512, (64,)) if quick else (8192, (512, 512))
    x, y = torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return f"mlp 784-{'-'.join(map(str, widths))}-10 n={n}", seeded_mlp(784, widths).eval(), x, y


def _calls(op, v: torch.Tensor) -> dict:
    return {"hvp": lambda: op.matvec(v), "gradient": op.gradient}


def _plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient and H v of the mean loss over all rows by plain autograd (double backward) in the model's
    dtype, on the CPU."""
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    gradient = flatten_tensors(torch.autograd.grad(loss_fn(model(x), y), params))
    vectors = unflatten_vector(v.to(params[0].dtype), [p.shape for p in params])
    return {"hvp": flatten_tensors(autograd_hvp(model, loss_fn, x, y, vectors)), "gradient": gradient}


def _gates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> dict[str, tuple]:
    """Per call, (the float64 result, its gate): plain autograd on a float64 copy of the model, and the
    other suites' rule (:func:`~benchmarks.common.plain_error_tolerance`): twice plain float32 autograd's max
    abs error against it, plus 16 eps of the result's scale."""
    model_cpu, x_cpu, y_cpu, v_cpu = copy.deepcopy(model).cpu(), x.cpu(), y.cpu(), v.cpu()
    exact = _plain(model_cpu.double(), x_cpu.double(), y_cpu, v_cpu)
    plain = _plain(model_cpu.float(), x_cpu.float(), y_cpu, v_cpu)
    eps = 16 * torch.finfo(torch.float32).eps
    return {name: (exact[name], plain_error_tolerance(plain[name], exact[name], eps * exact[name].abs().max().item()))
            for name in exact}


def _timed(fn, device: torch.device, calls: int, barrier=None, wait_for_all: bool = False) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of this process for each of ``calls`` calls, after one warm-up call (the
    other side ran meanwhile); with ``wait_for_all``, up to a barrier after the call (the slower rank)."""
    out = []
    fn()
    for _ in range(calls):
        if barrier is not None:
            barrier()
        synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        if wait_for_all:
            barrier()
        out.append((time.perf_counter() - start, time.process_time() - cpu))
    return out


def _replies(outbox, procs: list, timeout: float = 600.0) -> dict:
    """One message from each worker, by rank. A worker that died (its traceback is above in the log)
    raises a RuntimeError within a second, instead of leaving the parent waiting out ``timeout``."""
    replies, deadline = {}, time.monotonic() + timeout
    while len(replies) < len(procs):
        try:
            rank, payload = outbox.get(timeout=1.0)
            replies[rank] = payload
        except queue.Empty:
            dead = {rank: p.exitcode for rank, p in enumerate(procs) if not p.is_alive()}
            if dead:
                raise RuntimeError(f"distributed suite: worker(s) exited (rank: exit code) {dead}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"distributed suite: no reply from the workers in {timeout:.0f} s") from None
    return replies


def _stop(procs: list, inboxes: list, *, at_once: bool) -> None:
    """Ends the workers and reaps them. Each stops at its stop message (None), which it reads only once it
    has started and waits for its next call: seconds after a Ctrl-C or a failure, which stop them ``at_once``
    instead (SIGTERM; SIGKILL for one still alive a second later)."""
    procs = [p for p in procs if p.pid is not None]  # the started ones
    if not at_once:
        for box in inboxes:
            box.put(None)
        for p in procs:
            p.join(timeout=60)
    for p in procs:  # nothing to do for a worker that exited
        p.terminate()
    for p in procs:
        p.join(timeout=1.0)
        if p.is_alive():
            p.kill()
            p.join()


def _worker(rank: int, store: str, device_type: str, quick: bool, inbox, outbox) -> None:
    # SIGINT is blocked here from the start (see run): the parent stops the workers
    torch.set_num_threads(THREADS)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(minutes=10))
    try:
        _, model, x, y = _problem(quick)
        part = slice(rank * x.shape[0] // WORLD, (rank + 1) * x.shape[0] // WORLD)
        op = hessian_operator(model.to(device), nn.CrossEntropyLoss(), (x[part].to(device), y[part].to(device)),
                              process_group=dist.group.WORLD)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1)).to(device)
        # the control: this rank's local operator over its shard, without the all_reduce
        calls, local_calls = _calls(op, v), _calls(op.local, v)
        results, peaks = {}, {}
        for name, fn in calls.items():
            with peak_memory(device) as peak:
                results[name] = fn().cpu()
            peaks[name] = peak.bytes
        outbox.put((rank, (results, peaks)))
        while (msg := inbox.get()) is not None:
            name, count, control = msg  # both ranks make the same number of calls
            fn = (local_calls if control else calls)[name]
            samples = _timed(fn, device, count, barrier=dist.barrier, wait_for_all=control)
            outbox.put((rank, samples))
    finally:
        dist.destroy_process_group()


def run(device: torch.device, *, quick: bool = False, min_time: float = 2.0,
        burst: float = 0.3) -> tuple[list[Measurement], dict]:
    """2 processes x 1 thread against 1 process x 1 thread (see the module docstring).

    Returns:
        The measurements (``extra``: ``rel_diff`` of the distributed result against the single
        process's) and the suite's config.
    """
    case_name, model, x, y = _problem(quick)
    config = {"world": WORLD, "threads_per_process": THREADS, "problem": case_name, "gate_rtol": GATE_RTOL,
              "reference": "float64 plain autograd over all rows; gate: 2 x plain float32 autograd's max abs error "
                           "+ 16 eps of the scale",
              "min_time_s": min_time, "burst_s": burst, "load_average_before": os.getloadavg()}
    candidates = (BASELINE, DISTRIBUTED, CONTROL)
    if device.type == "cuda" and torch.cuda.device_count() < WORLD:
        why = f"unavailable: needs {WORLD} GPUs (NCCL takes one per process), {torch.cuda.device_count()} visible"
        return [Measurement(f"{name} {case_name}", c, None, None, None, why)
                for name in ("hvp", "gradient") for c in candidates], config
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    ctx = mp.get_context("spawn")
    inboxes, outbox = [ctx.Queue() for _ in range(WORLD)], ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, os.path.join(tmp, "store"), device.type, quick, inboxes[r],
                                                    outbox), daemon=True) for r in range(WORLD)]
        # Ctrl-C reaches the whole process group: the parent stops the workers (_stop), so that it ends in one
        # line. They start with SIGINT blocked, a mask that spawn's exec and Python keep (ignored only once they
        # ran _worker, one still importing torch printed a KeyboardInterrupt traceback). Meanwhile the parent
        # records a Ctrl-C and raises it once both started: ignoring it here dropped it (the run went on), and
        # raising it mid-start left a worker reading its start-up data from a closed pipe (a traceback).
        interrupted: list[int] = []
        handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # this thread's mask: the workers inherit it
        try:
            try:  # inside the try that stops them: a second start that fails stops the first worker
                for p in procs:
                    p.start()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                signal.signal(signal.SIGINT, handler)
            if interrupted:
                raise KeyboardInterrupt
            single = hessian_operator(model.to(device), nn.CrossEntropyLoss(), (x.to(device), y.to(device)))
            v = torch.randn(single.shape[0], generator=torch.Generator().manual_seed(1)).to(device)
            calls = _calls(single, v)
            got, peaks = _replies(outbox, procs)[0]
            gates = _gates(model, x, y, v)
            results = []
            for name, fn in calls.items():
                with peak_memory(device) as peak:
                    want = fn().cpu()
                exact, tolerance = gates[name]
                error = (want.double() - exact).abs().max().item()
                diff = float((got[name] - want).norm() / want.norm())
                status = "ok" if diff <= GATE_RTOL and error <= tolerance else "wrong"
                base = Measurement(f"{name} {case_name}", BASELINE, None, None, error,
                                   "ok" if error <= tolerance else "wrong", {"gate": tolerance},
                                   peak_memory_bytes=peak.bytes)
                dist_m = Measurement(f"{name} {case_name}", DISTRIBUTED, None, None, diff, status,
                                     {"rel_diff": diff}, peak_memory_bytes=peaks[name])  # rank 0's
                control = Measurement(f"{name} {case_name}", CONTROL, None, None, None, status)  # a part: no gate
                samples: tuple[list[tuple[float, float]], ...] = ([], [], [])
                once = _timed(fn, device, 1)[0][0]
                counts = max(1, round(burst / once)), max(1, round(burst * WORLD / once))  # about burst seconds each
                while status == "ok" and (min(sum(wall for wall, _ in s) for s in samples) < min_time
                                          or min(len(s) for s in samples) < MIN_SAMPLES):
                    samples[0].extend(_timed(fn, device, counts[0]))
                    for which in (1, 2):  # the distributed call, then the control
                        for box in inboxes:
                            box.put((name, counts[1], which == 2))
                        per_rank = _replies(outbox, procs)
                        samples[which].extend(per_rank[0])
                for m, s in zip((base, dist_m, control), samples):
                    if s:
                        set_time(m, [wall for wall, _ in s])
                        m.extra["cpu_s"] = statistics.median(cpu for _, cpu in s)
                        m.extra["samples"] = len(s)
                results += [base, dist_m, control]
        except BaseException:
            _stop(procs, inboxes, at_once=True)
            raise
        else:
            _stop(procs, inboxes, at_once=False)
        finally:
            torch.set_num_threads(threads)
    config["load_average_after"] = os.getloadavg()
    return results, config
