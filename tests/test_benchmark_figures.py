"""The figures the benchmark suites write (the ratios, gates and statuses docs/benchmarks.md quotes), recomputed
by hand from faked timings (a clock only the fake calls move, or fixed medians) and from the rows' own values; and
the runner's exit status and files for a failing suite, a missing anchor, a quick run and a GPU run."""
import dataclasses
import json
import time
import types

import pytest
import torch

import benchmarks.__main__ as runner
from benchmarks import common
from benchmarks.__main__ import main
from benchmarks.common import Measurement


# ---------------------------------------------------------------------------------------------- helpers
class FakeClock:
    """Stands in for ``time`` in benchmarks.common: perf_counter reads a clock that only the fake calls move."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def call(self, seconds):
        """A fake callable whose every call takes ``seconds`` (a number, or an iterator of numbers)."""
        def fn():
            self.now += next(seconds) if hasattr(seconds, "__next__") else seconds
            fn.calls += 1
            return torch.zeros(1)
        fn.calls = 0
        return fn


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=c.perf_counter, strftime=time.strftime,
                                                              gmtime=time.gmtime))
    return c


def fixed_times(times):
    """A measure_interleaved stand-in: every timed candidate gets the median ``times(m)`` (no timing at all)."""
    def fake(timed, device, **kwargs):
        for m, _ in timed:
            m.median_s, m.iqr_s = times(m), 0.0
    return fake


def tiny_mlp_problem(name="mlp tiny 6-5-3 n=16", n=16, d_in=6, hidden=(5,), classes=3):
    from benchmarks.hvp import Problem, seeded_mlp

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d_in, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return Problem(name, seeded_mlp(d_in, hidden, num_classes=classes).eval(), x, y)


# ---------------------------------------------------------------------------------------------- common.py
def test_the_json_speedup_is_baseline_over_candidate_within_each_case(tmp_path):
    """speedup_vs_<baseline> = the baseline's median / the candidate's, within each case (null for a wrong row)."""
    rows = [Measurement("case a", "eager", 4.0, 0.0, 0.0), Measurement("case a", "ours:cpp", 2.0, 0.0, 0.0),
            Measurement("case b", "eager", 9.0, 0.0, 0.0), Measurement("case b", "ours:cpp", 3.0, 0.0, 0.0),
            Measurement("case b", "peft", None, None, None, "wrong")]
    path = common.write_results("softmax_ce", torch.device("cpu"), rows, "eager", {}, out_dir=tmp_path)
    got = {(r["case"], r["candidate"]): r["speedup_vs_eager"] for r in json.loads(path.read_text())["results"]}
    assert got == {("case a", "eager"): 1.0, ("case a", "ours:cpp"): 2.0, ("case b", "eager"): 1.0,
                   ("case b", "ours:cpp"): 3.0, ("case b", "peft"): None}


def test_measure_reports_the_median_and_the_interquartile_range_of_at_least_five_calls(clock):
    """The median of at least five timed calls (after the gate's call), and the interquartile range Q3 - Q1."""
    fn = clock.call(iter([0.0, 1.0, 2.0, 3.0, 10.0, 100.0]))  # the gate's call, then the timed ones
    m = common.measure("c", "x", fn, torch.zeros(1, dtype=torch.float64), 0.0, torch.device("cpu"),
                       min_time=0.0, warmup=0)
    # 5 timed calls (min_time 0): median 3; exclusive quartiles of (1, 2, 3, 10, 100): 1.5 and 55
    assert fn.calls == 6 and m.median_s == 3.0 and m.iqr_s == pytest.approx(53.5)


def test_the_gate_takes_the_absolute_error():
    """The gate compares the largest absolute error: an output too low everywhere is wrong."""
    exact = torch.zeros(4, dtype=torch.float64)
    low = common.check("c", "ours", lambda: -torch.ones(4), exact, 1e-3)
    assert (low.status, low.max_abs_err) == ("wrong", 1.0)


def test_the_gate_is_twice_the_plain_error_plus_the_floor():
    """Twice the plain computation's error plus the floor, and a candidate 100x that error fails it."""
    exact = torch.zeros(3, dtype=torch.float64)
    plain = torch.tensor([0.0, -1e-6, 5e-7])
    assert common.plain_error_tolerance(plain, exact, 1e-7) == pytest.approx(2e-6 + 1e-7, rel=1e-6)
    # a candidate 100x plain's error fails the gate built from it
    tol = common.plain_error_tolerance(plain, exact, 1e-7)
    assert common.check("c", "ours", lambda: torch.full((3,), 1e-4), exact, tol).status == "wrong"


def test_interleaved_timing_gives_each_candidate_its_own_samples_and_at_least_five(clock):
    """Each candidate gets its own samples, at least five, however slow it is beside the others."""
    fast, slow = clock.call(0.01), clock.call(1.0)
    mf, ms = Measurement("c", "fast", None, None, 0.0), Measurement("c", "slow", None, None, 0.0)
    common.measure_interleaved([(mf, fast), (ms, slow)], torch.device("cpu"), min_time=0.09, burst=0.05, warmup=0)
    assert slow.calls >= 5 and ms.median_s == pytest.approx(1.0) and mf.median_s == pytest.approx(0.01)


def test_the_environment_records_torchs_thread_count():
    """cpu_threads is torch's intra-op thread count, what the suites ran with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert common.environment(torch.device("cpu"))["cpu_threads"] == 3
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the runner
def test_a_quick_run_has_no_torch_compile_candidates(monkeypatch, tmp_path):
    """--quick means no torch.compile candidates (the help says so): the suite is asked for none."""
    import benchmarks.softmax_ce

    seen = {}

    def run(device, shapes=None, dtype=None, with_compile=True, min_time=0.5):  # the suite's signature
        seen["with_compile"] = with_compile
        return [], {}

    monkeypatch.setattr(benchmarks.softmax_ce, "run", run)
    assert main(["softmax_ce", "--quick", "--out", str(tmp_path)]) == 0
    assert seen["with_compile"] is False


def test_a_suite_that_raises_fails_the_run_and_costs_no_other_suite(monkeypatch, capsys, tmp_path):
    """A suite that raises fails the run (status 1, named), and the next suite still runs and writes its JSON."""
    import benchmarks.lora
    import benchmarks.softmax_ce

    def broken(device, **kwargs):
        raise RuntimeError("a kernel crashed")

    monkeypatch.setattr(benchmarks.softmax_ce, "run", broken)
    monkeypatch.setattr(benchmarks.lora, "run", lambda device, **kwargs: ([], {}))
    assert main(["softmax_ce", "lora", "--quick", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "softmax_ce: FAILED" in out and "failed suites: softmax_ce" in out
    assert [p.name for p in tmp_path.iterdir()] == ["lora_cpu.json"]


def test_an_anchor_that_cannot_run_does_not_fail_the_run(monkeypatch, tmp_path):
    """An anchor that cannot run is an "unavailable" row and the run passes (only our own rows fail it)."""
    import benchmarks.lora

    rows = [Measurement("a case", "peft", None, None, None, "unavailable: ImportError: No module named 'peft'"),
            Measurement("a case", "ours:cpp", 1.0, 0.0, 0.0)]
    monkeypatch.setattr(benchmarks.lora, "run", lambda device, **kwargs: (rows, {}))
    assert main(["lora", "--quick", "--out", str(tmp_path)]) == 0


def test_a_gpu_run_does_not_redraw_the_docs_plot(monkeypatch, tmp_path):
    """The docs' plot is drawn from the committed CPU JSON: a GPU run into the committed folder writes
    hvp_gpu.json and leaves the plot alone."""
    import benchmarks.hvp

    drawn = []
    monkeypatch.setattr(runner.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(runner, "check_device", lambda *args, **kwargs: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(benchmarks.hvp, "run", lambda device, **kwargs: ([], {}))
    monkeypatch.setattr(benchmarks.hvp, "PLOT", lambda path: drawn.append(path) or tmp_path / "plot.png")
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        assert main(["hvp"]) == 0
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert (tmp_path / "hvp_gpu.json").is_file() and drawn == []


# ---------------------------------------------------------------------------------------------- hvp and floors
HVP_TIMES = {"gradient": {"autograd": 1.0},
             "hvp": {"autograd": 8.0, "pyhessian": 10.0, "curvlinops": 12.0, "pyhessian:cached-graph": 4.0,
                     "ours:fused": 2.0, "ours:generic": 3.0, "ours:fused-stream": 5.0, "ours:generic-stream": 6.0,
                     "ours:generic-fwd": 7.0, "ours:fused-aten-gemm": 2.5, "ours:generic-aten-gemm": 3.5},
             "matmat": {"ours:fused": 8.0, "ours:generic": 12.0}}


def _kind(case):
    return "gradient" if case.endswith("gradient") else "hvp" if case.endswith(" hvp") else "matmat"


def test_the_hvp_suites_ratios(monkeypatch):
    """vs_fastest_anchor against the fastest anchor only (never one of ours), gradient_units, and matmat's
    vs_8_matvecs / vs_8_streamed_products against its own path's products, with the config naming that anchor. The
    anchor libraries (curvlinops, PyHessian) are optional: an anchor that is not installed is an unavailable row, and
    the fastest is taken among those that ran."""
    import benchmarks.hvp as hvp

    monkeypatch.setattr(hvp, "problems", lambda device, quick=False: [tiny_mlp_problem()])
    monkeypatch.setattr(hvp, "measure_interleaved", fixed_times(lambda m: HVP_TIMES[_kind(m.case)][m.candidate]))
    results, config = hvp.run(torch.device("cpu"), quick=True, min_time=0.0)
    assert all(m.status == "ok" or (m.candidate in hvp.ANCHORS and m.status.startswith("unavailable"))
               for m in results), [(m.candidate, m.status) for m in results]
    rows = {(_kind(m.case), m.candidate): m.extra for m in results if m.median_s}
    fastest = min((a for a in hvp.ANCHORS if ("hvp", a) in rows), key=HVP_TIMES["hvp"].get)  # plain autograd at least
    assert config["cases"][0]["fastest_anchor"] == fastest
    assert ("hvp", "ours:fused-aten-gemm") in rows  # an MLP: our product on torch's GEMM beside it
    assert ("hvp", "ours:generic-aten-gemm") in rows  # and the generic path's
    for name, t in HVP_TIMES["hvp"].items():
        if ("hvp", name) in rows:
            assert rows["hvp", name]["gradient_units"] == t
            assert rows["hvp", name]["vs_fastest_anchor"] == HVP_TIMES["hvp"][fastest] / t  # an anchor, not ours:fused
    fused, generic = rows["matmat", "ours:fused"], rows["matmat", "ours:generic"]
    assert (fused["vs_8_matvecs"], generic["vs_8_matvecs"]) == (8 * 2.0 / 8.0, 8 * 3.0 / 12.0)
    assert (fused["vs_8_streamed_products"], generic["vs_8_streamed_products"]) == (8 * 5.0 / 8.0, 8 * 6.0 / 12.0)
    assert (fused["gradient_units"], fused["gradient_units_per_vector"]) == (8.0, 1.0)


def test_the_floors_suites_ratios(monkeypatch):
    """vs_floor = the floor's time / the candidate's, floor_bound = PyHessian's time / the floor's."""
    import benchmarks.floors as floors

    times = {"floor": 2.0, "ours:fused": 4.0, "ours:fused-aten-gemm": 10.0, "ours:generic": 8.0,
             "pyhessian:cached-graph": 5.0}
    monkeypatch.setattr(floors, "problems", lambda device, quick=False: [tiny_mlp_problem()])
    monkeypatch.setattr(floors, "measure_interleaved", fixed_times(lambda m: times[m.candidate]))
    results, _ = floors.run(torch.device("cpu"), quick=True, min_time=0.0)
    rows = {m.candidate: m.extra for m in results if m.median_s}  # PyHessian's row only where it is installed
    assert {name: rows[name]["vs_floor"] for name in times if name in rows and name != "floor"} == \
        {name: ratio for name, ratio in (("ours:fused", 0.5), ("ours:fused-aten-gemm", 0.2), ("ours:generic", 0.25),
                                          ("pyhessian:cached-graph", 0.4)) if name in rows}
    assert "ours:fused-aten-gemm" in rows  # the MLP's row of our product on torch's GEMM
    if "pyhessian:cached-graph" in rows:
        assert rows["pyhessian:cached-graph"]["floor_bound"] == 2.5


# ---------------------------------------------------------------------------------------------- lanczos
def test_the_lanczos_step_speedup(monkeypatch):
    """speedup_vs_torch float32 = the plain float32 step's time / the candidate's."""
    import benchmarks.lanczos as lanczos

    times = {lanczos.STEP_BASELINE: 3.0, "ours:cpp": 1.5}
    monkeypatch.setattr(lanczos, "measure_interleaved", fixed_times(lambda m: times[m.candidate]))
    problem = tiny_mlp_problem("mlp 20-10-10 n=64", n=64, d_in=20, hidden=(10,), classes=10)
    results, _ = lanczos.run_steps(problem, torch.device("cpu"), 0.0)
    assert results and all(m.status == "ok" for m in results)
    assert {m.candidate: m.extra["speedup_vs_torch float32"] for m in results} == {"torch float32": 1.0,
                                                                                  "ours:cpp": 2.0}


def test_the_eigenvalue_rows_count_one_calls_products_and_ours_carries_the_difference(monkeypatch):
    """num_hvps counts the products of one call (not of every timed call), and the difference to eigsh is on our
    row, not on eigsh's."""
    import benchmarks.lanczos as lanczos
    from unlearn_kernels.curvature import hessian_operator

    problem = tiny_mlp_problem("mlp 20-10-10 n=64", n=64, d_in=20, hidden=(10,), classes=10)
    monkeypatch.setattr(lanczos, "_problems", lambda device, quick: [(problem, torch.float64)])
    monkeypatch.setattr(lanczos, "run_steps", lambda problem, device, min_time: ([], []))
    results, _ = lanczos.run(torch.device("cpu"), quick=True, min_time=0.0)
    rows = {m.candidate: m.extra for m in results}
    tol = lanczos.TOLERANCE[torch.float64]
    for name, solver in (("scipy eigsh", lanczos.top_eigsh), ("ours lanczos", lanczos.top_lanczos)):
        op = hessian_operator(problem.model.double(), torch.nn.CrossEntropyLoss(), (problem.x.double(), problem.y))
        solver(op, lanczos.NUM_EIGS, tol)
        assert rows[name]["num_hvps"] == op.num_products, name
    assert "max_rel_diff_vs_eigsh" in rows["ours lanczos"] and "max_rel_diff_vs_eigsh" not in rows["scipy eigsh"]


# ---------------------------------------------------------------------------------------------- cubic
def _cubic_first_case(monkeypatch):
    import benchmarks.cubic as cubic

    problems = cubic._problems
    monkeypatch.setattr(cubic, "_problems", lambda quick: problems(quick)[:1])  # synthetic d = 1,000 alone
    return cubic


def test_a_step_whose_value_is_not_what_it_reports_is_wrong(monkeypatch, capsys, tmp_path):
    """The gate recomputes the model value at the returned step: a step that reports the right value but is
    1e-7 (relative) off fails the 1e-8 target."""
    cubic = _cubic_first_case(monkeypatch)
    solve = cubic.cubic_newton_step
    seen = []

    def off(H, g, M, *, method, **options):
        step = solve(H, g, M, method=method, **options)
        if method != "krylov":
            return step
        true = cubic.model_value_and_residual(H, g, step.step, M)[0]
        for eps in (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5):
            rel = abs(cubic.model_value_and_residual(H, g, (1 + eps) * step.step, M)[0] - true) / abs(true)
            if 2e-8 < rel < 5e-7:
                seen.append(rel)
                return dataclasses.replace(step, step=(1 + eps) * step.step)  # model_value: the true step's
        raise AssertionError("no perturbation in range")

    monkeypatch.setattr(cubic, "cubic_newton_step", off)
    assert main(["cubic", "--quick", "--out", str(tmp_path)]) == 1
    assert seen and "cubic: FAILED its correctness gates: krylov on synthetic d=1000" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- softmax_ce, lora
def test_the_softmax_ce_bandwidth_follows_the_bytes_model():
    """effective_GBps: the hvp reads z and u and writes its output; the grad reads z and the targets, writes."""
    from benchmarks import softmax_ce

    n, c = 8, 16
    rows = softmax_ce._shape(n, c, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0), True,
                             None, 0.0)
    for m in rows:
        nbytes = 3 * n * c * 4 if m.case.startswith("hvp") else 2 * n * c * 4 + n * 8
        assert m.extra["effective_GBps"] == pytest.approx(nbytes / m.median_s / 1e9)


def test_the_lora_suites_ratios_and_gates(monkeypatch, tmp_path):
    """vs_frozen_linear, each row gated against its own float64 reference (the frozen layer's against the frozen
    layer's), and the JSON's ratio against PEFT, the suite's baseline."""
    import benchmarks.lora as lora

    times = {"frozen linear": 1.0, "ours:cpp": 2.0, "ours:cpp-aten-gemm": 2.5, "peft": 4.0, "eager": 3.0}
    monkeypatch.setattr(lora, "measure_interleaved", fixed_times(lambda m: times[m.candidate]))
    results, config = lora.run(torch.device("cpu"), cases=((64, 32, 32, 4, torch.float32),), with_compile=False,
                               min_time=0.0)
    assert all(m.status == "ok" for m in results), [(m.case, m.candidate, m.status) for m in results]
    # every row's error is against its own float64 reference (the frozen layer's against the frozen layer's)
    assert max(m.max_abs_err for m in results) < 1e-4, [(m.case, m.candidate, m.max_abs_err) for m in results]
    assert {(m.case.split()[0], m.candidate): m.extra["vs_frozen_linear"] for m in results} == \
        {(mode, name): 1.0 / t for mode in ("fwd", "fwd+bwd") for name, t in times.items()}
    monkeypatch.setattr(lora, "run", lambda device, **kwargs: (results, config))
    assert main(["lora", "--quick", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "lora_cpu.json").read_text())["results"]
    assert {(r["case"].split()[0], r["candidate"]): r["speedup_vs_peft"] for r in written} == \
        {(mode, name): 4.0 / t for mode in ("fwd", "fwd+bwd") for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- unlearn
def test_the_unlearn_rows_speedup_gap_closed_and_median_of_the_calls(monkeypatch):
    """Each row's time is the median of its calls (faked, distinct: a mean, the first or the last call would
    differ), speedup = retrain / CureNewton of those medians, the IQR by the other suites' rule, the peak memory
    the first call's, and gap closed = 1 - |acc - oracle's| / |original's - oracle's|, recomputed from the rows'
    own forget accuracies."""
    import contextlib
    import dataclasses
    import statistics

    import benchmarks.unlearn as unlearn
    from unlearn_kernels.methods.base import Unlearner

    times = {"retrain": [3.0, 9.0, 4.0], "cure_newton": [0.5, 0.1, 0.2], "finetune": [2.0, 1.0, 7.0]}
    left = {name: list(t) for name, t in times.items()}
    real_unlearn = Unlearner.unlearn

    def scripted(self, *args, **kwargs):
        return dataclasses.replace(real_unlearn(self, *args, **kwargs), seconds=left[self.name].pop(0))

    peaks = iter(range(1, 100))

    @contextlib.contextmanager
    def counted_peak(device):
        block = type("Peak", (), {"bytes": None})()
        yield block
        block.bytes = next(peaks)  # each call's block its own number: the first call's is the lowest

    monkeypatch.setattr(Unlearner, "unlearn", scripted)
    monkeypatch.setattr(unlearn, "peak_memory", counted_peak)
    results, config = unlearn.run(torch.device("cpu"), sizes=(400,), epochs=2, repeats=3)
    row = config["rows"][0]
    by_name = {m.candidate: m for m in results}
    for name, t in times.items():
        m = by_name[name]
        q = statistics.quantiles(t, n=4)
        assert m.extra["seconds"] == t and m.median_s == statistics.median(t) and m.iqr_s == q[2] - q[0], name
        assert row[f"{name}_seconds"] == statistics.median(t), name
        assert m.extra["calls_identical"], name  # seeded calls on the CPU
    assert row["speedup"] == 4.0 / 0.2
    # the calls run in rounds, the methods in turn: the first call of each has the lowest of its peaks
    assert [by_name[n].peak_memory_bytes for n in ("retrain", "cure_newton", "finetune")] == [1, 2, 3]
    acc = {m.candidate: m.extra["acc_forget"] for m in results}
    original_gap = abs(row["acc_forget_original"] - row["acc_forget_retrain"])
    assert original_gap > 0  # the figure is defined
    for name, key in (("cure_newton", "gap_closed"), ("finetune", "finetune_gap_closed")):
        assert row[key] == pytest.approx(1 - abs(acc[name] - acc["retrain"]) / original_gap), name


@pytest.mark.parametrize("options, message", [
    ({"repeats": 0}, "repeats must be an int >= 1"), ({"repeats": True}, "repeats must be an int >= 1"),
    ({"sizes": (400, 50)}, r"sizes\[1\] must be an int >= 100"),
])
def test_the_unlearn_suite_refuses_bad_options_before_any_training(monkeypatch, options, message):
    import benchmarks.unlearn as unlearn

    monkeypatch.setattr(unlearn, "train", lambda *args, **kwargs: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match=message):
        unlearn.run(torch.device("cpu"), **{"sizes": (400,), "epochs": 1, **options})


# ---------------------------------------------------------------------------------------------- distributed
def test_the_distributed_rows_are_wrong_when_the_single_process_fails_its_float64_gate(monkeypatch):
    """The distributed rows are compared with the single-process one, which must itself pass its float64 gate:
    where it fails it, the distributed rows that agree with it (to 1e-7) are wrong too, and not timed."""
    import benchmarks.distributed as suite

    gates = suite._gates
    monkeypatch.setattr(suite, "_gates", lambda *args: {name: (exact, 0.0)  # no error passes
                                                        for name, (exact, _) in gates(*args).items()})
    results, _ = suite.run(torch.device("cpu"), quick=True, min_time=0.01, burst=0.01)
    rows = {(m.case.split()[0], m.candidate): m for m in results}
    for call in ("hvp", "gradient"):
        assert rows[call, suite.BASELINE].status == "wrong"
        assert rows[call, suite.DISTRIBUTED].extra["rel_diff"] <= suite.GATE_RTOL
        assert (rows[call, suite.DISTRIBUTED].status, rows[call, suite.DISTRIBUTED].median_s) == ("wrong", None)


def test_the_cpu_gemm_route_rows_are_timed_on_the_cpu_only():
    """aten_gemm() toggles oneDNN, which a GPU does not use: on CUDA the hvp and floors suites' aten-gemm rows
    repeated the rows beside them, in the GPU check's time. A problem whose tensors are elsewhere (meta here:
    no GPU on the CI machines) gets none."""
    from torch import nn

    from benchmarks import hvp

    p = hvp.digits_problem((16,), "tanh")
    v = torch.randn(sum(q.numel() for q in p.params))
    assert {"ours:fused-aten-gemm", "ours:generic-aten-gemm"} <= set(hvp.candidates(p, nn.CrossEntropyLoss(), v))
    elsewhere = dataclasses.replace(p, x=p.x.to("meta"))
    assert not any("aten-gemm" in name for name in hvp.candidates(elsewhere, nn.CrossEntropyLoss(), v))
