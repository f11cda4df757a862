"""The benchmark runner's usage errors (``python -m benchmarks``): found before any suite runs."""
import ast
import contextlib
import importlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scipy
import torch
import torch.multiprocessing as mp

from benchmarks.__main__ import main
from benchmarks.common import ANCHORS, environment
from benchmarks.cubic import plot_scaling
from benchmarks.distributed import _replies
from benchmarks.hvp import plot_gradient_units
from devices import DEVICE_ERRORS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RUNNER = [sys.executable, "-m", "benchmarks"]
"""``python -m benchmarks`` (run from the repository root, ``BENCHMARKS.parent``)."""


@pytest.mark.parametrize("argv, message", [
    (["bogus"], "unknown suite(s) ['bogus']"),
    (["softmax_ce", "--device", "bogus"], "--device 'bogus' is not a device name: use cpu, cuda or cuda:N"),
    # the suites' devices, whether or not this machine has the one named (`unlearn-kernels run` may take them)
    (["softmax_ce", "--device", "meta"], "--device 'meta': only cpu or cuda devices are supported here"),
    (["softmax_ce", "--device", "mps"], "--device 'mps': only cpu or cuda devices are supported here"),
    (["softmax_ce", "--threads", "0"], "--threads must be between 1 and "),
    (["softmax_ce", "--threads", "100000"], "--threads must be between 1 and "),  # a segfault
    (["softmax_ce", "softmax_ce", "--quick"], "suite(s) named more than once: ['softmax_ce']"),
])
def test_usage_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_out_that_is_a_file_is_refused_before_any_suite(capsys, tmp_path):
    out = tmp_path / "results"
    out.write_text("the user's file")
    with pytest.raises(SystemExit) as exit_info:
        main(["softmax_ce", "--quick", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--out: {str(out)!r} is a file, not a directory" in err
    assert out.read_text() == "the user's file"


def test_an_empty_out_is_refused_not_read_as_the_working_folder(monkeypatch, capsys, tmp_path):
    """``--out "$DIR"`` with DIR unset wrote the JSON into the working folder (the repository root)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["softmax_ce", "--quick", "--out", ""])
    assert exit_info.value.code == 2 and "argument --out: '' names no folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_and_status_130_and_keeps_the_finished_suites(monkeypatch, capsys, tmp_path):
    import benchmarks.lanczos
    import benchmarks.softmax_ce

    def interrupted(device, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmarks.softmax_ce, "run", lambda device, **kwargs: ([], {}))
    monkeypatch.setattr(benchmarks.lanczos, "run", interrupted)
    assert main(["softmax_ce", "lanczos", "--quick", "--out", str(tmp_path)]) == 130
    captured = capsys.readouterr()
    assert captured.err == "python -m benchmarks: interrupted\n"  # no traceback
    assert [p.name for p in tmp_path.iterdir()] == ["softmax_ce_cpu.json"]


def _workers(pid: int) -> list[int]:
    """The pids of the multiprocessing workers among the children of process ``pid`` (from /proc)."""
    workers = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):  # a child that ended meanwhile
            if b"--multiprocessing-fork" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(int(child))
    return workers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="finds the workers in /proc (Linux)")
def test_ctrl_c_ends_the_runner_by_sigint_in_one_line_and_stops_the_workers_at_once(tmp_path):
    """A status of 130 let a shell loop over runs go on after Ctrl-C: the runner now dies of SIGINT. Ctrl-C
    reaches the process group: a distributed worker still importing torch printed its own traceback. The
    runner then waited up to 60 s (12-27 s measured) for workers still starting to read their stop message. (How
    long it takes is not asserted, on these noisy machines: that no worker outlives the runner is.)"""
    proc = subprocess.Popen([*RUNNER, "distributed", "--quick", "--out", str(tmp_path)], cwd=BENCHMARKS.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith("device: ")
        while len(workers := _workers(proc.pid)) < 2:  # started, and seconds from reading any message
            assert proc.poll() is None, "the runner ended before it started its workers"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the group
        err = proc.communicate(timeout=300)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the workers too, should the test fail
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, err) == (-signal.SIGINT, "python -m benchmarks: interrupted\n")
    assert [pid for pid in workers if _alive(pid)] == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails")
@pytest.mark.parametrize("argv, unbuffered", [
    # argparse dropped the failed write (status 0, no help), or Python's flush at exit failed (status 120)
    (["--help"], "1"), (["--help"], ""),
    (["softmax_ce", "--quick"], ""),  # the buffered header failed at exit, after the suites
])
def test_output_that_cannot_be_written_is_one_line_and_status_1_before_any_suite(argv, unbuffered, tmp_path):
    with open("/dev/full", "w") as full:
        done = subprocess.run([*RUNNER, *argv, "--out", str(tmp_path)], cwd=BENCHMARKS.parent, stdout=full,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": unbuffered})
    assert done.returncode == 1
    assert done.stderr == "python -m benchmarks: error: cannot write to standard output: No space left on device\n"
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_went_away_ends_the_runner_quietly():
    """`python -m benchmarks --help | head -0` ended with status 0 (argparse drops the failed write)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([*RUNNER, "--help"], cwd=BENCHMARKS.parent, stdout=write_end, stderr=subprocess.PIPE,
                              text=True)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize("plot", [plot_gradient_units, plot_scaling])
def test_an_interrupted_plot_leaves_the_committed_image_whole(plot, tmp_path, interrupt_plots):
    """The plots replace docs/img/*.png; savefig straight to the path left a torn image when interrupted."""
    out = plot(out=tmp_path / "plot.png")
    before = out.read_bytes()

    interrupt_plots()
    with pytest.raises(KeyboardInterrupt):
        plot(out=out)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"] and out.read_bytes() == before


@pytest.mark.parametrize("module", sorted(p.stem for p in BENCHMARKS.glob("test_bench_*.py")))
def test_the_grouping_a_pytest_benchmark_view_advises_exists(module):
    """``--benchmark-group-by=param:NAME`` with a NAME that no test takes ends pytest in an INTERNALERROR
    (KeyError) after every benchmark ran: each NAME a docstring names is a parameter of the module's tests."""
    source = (BENCHMARKS / f"{module}.py").read_text()
    advised = re.findall(r"param:(\w+)", ast.get_docstring(ast.parse(source)) or "")
    tests = importlib.import_module(f"benchmarks.{module}")
    taken = {name for fn_name, fn in vars(tests).items() if fn_name.startswith("test_") and callable(fn)
             for name in inspect.signature(fn).parameters}
    assert set(advised) <= taken, (advised, taken)


def test_a_quick_run_says_so_in_its_json(tmp_path):
    assert main(["softmax_ce", "--quick", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "softmax_ce_cpu.json").read_text())
    assert written["config"]["quick"] is True and written["results"]


def test_the_lora_hvp_suite_gates_and_times_both_modes(tmp_path):
    """The adapter HVP timing of docs/rfa.md (once examples/rfa_study.py --hvp-modes): both modes pass their gate
    and are timed, each with its difference to double backward."""
    assert main(["lora_hvp", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "lora_hvp_cpu.json").read_text())["results"]
    modes = ("reverse-over-reverse", "forward-over-reverse")
    assert {("matvec" if "matvec" in r["case"] else "matmat", r["candidate"]) for r in rows} == \
        {(product, mode) for product in ("matvec", "matmat") for mode in modes}
    assert all(r["status"] == "ok" and r["median_s"] and r["extra"]["relative_difference_to_double_backward"] < 1e-5
               for r in rows), rows


def test_a_quick_run_does_not_replace_the_committed_results(monkeypatch, tmp_path):
    """Without --out, a quick run (a smoke test) writes to QUICK_DIR, not beside the committed JSON."""
    import benchmarks.__main__ as runner

    monkeypatch.setattr(runner, "QUICK_DIR", tmp_path / "quick")
    monkeypatch.setattr(runner.common, "RESULTS_DIR", tmp_path / "committed")
    assert main(["softmax_ce", "--quick"]) == 0
    assert (tmp_path / "quick" / "softmax_ce_cpu.json").is_file() and not (tmp_path / "committed").exists()


def test_a_cuda_run_measures_float32_without_tf32(monkeypatch, tmp_path):
    """cuDNN's default rounds float32 convolutions to TF32: on an H100 the ResNet-18 gradient row failed its float64
    gate (7.0e-5) and every CNN product was 10x less accurate than on the CPU. A CUDA run turns TF32 off, and its
    JSON says which it measured."""
    import benchmarks.__main__ as runner

    seen = {}

    def run_suites(args, device, out):
        seen["flags"] = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        return []

    monkeypatch.setattr(runner, "check_device", lambda *args, **kwargs: torch.device("cuda"))
    monkeypatch.setattr(runner, "_run_suites", run_suites)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # PyTorch's default for cuDNN
    try:
        assert main(["softmax_ce", "--out", str(tmp_path)]) == 0
        assert seen["flags"] == (False, False)
        assert environment(torch.device("cuda"))["tf32"] is False and "tf32" not in environment(torch.device("cpu"))
        torch.backends.cudnn.allow_tf32 = True  # cuDNN's alone (matmul's default is off): recorded as TF32
        assert environment(torch.device("cuda"))["tf32"] is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder nobody can add files to")
def test_out_that_refuses_new_files_is_refused_before_any_suite(capsys):
    # mkdir(exist_ok=True) accepts it; the suite's work was lost when the JSON could not be written
    with pytest.raises(SystemExit) as exit_info:
        main(["softmax_ce", "--quick", "--out", "/proc"])
    err = capsys.readouterr().err
    # permission bits refuse it (a user) or, for root, the trial file does
    assert exit_info.value.code == 2
    assert "--out: '/proc' is not writable" in err or "--out: '/proc' cannot be written" in err


def test_out_whose_result_path_is_a_folder_is_refused_before_any_suite(capsys, tmp_path):
    (tmp_path / "softmax_ce_cpu.json").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["softmax_ce", "--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"--out: '{tmp_path / 'softmax_ce_cpu.json'}', where the run writes a file, is a directory" in err


def test_out_whose_result_file_cannot_be_overwritten_is_refused_before_any_suite(capsys, tmp_path, monkeypatch):
    """A results file the run would replace and may not (os.access stands in for its permission bits, which root
    would not see): refused as `unlearn-kernels run` refuses one, with its words (the runner did not look)."""
    locked = tmp_path / "softmax_ce_cpu.json"
    locked.write_text("the user's file")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    with pytest.raises(SystemExit) as exit_info:
        main(["softmax_ce", "--quick", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--out: '{locked}', which the run overwrites, is not writable" in capsys.readouterr().err
    assert locked.read_text() == "the user's file"


@pytest.mark.parametrize("device, gpus, message", DEVICE_ERRORS)
def test_device_errors_are_those_of_the_cli(device, gpus, message, monkeypatch, capsys, tmp_path):
    """The runner and `unlearn-kernels run` checked --device in two ways: '' gave torch's "Device string must
    not be empty" here, cuda:0 without a GPU "Torch not compiled with CUDA enabled" there; cpu:1 ran."""
    if gpus is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(SystemExit) as exit_info:
        main(["softmax_ce", "--quick", "--device", device, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m benchmarks: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_the_json_names_the_anchors_versions(tmp_path):
    """The ratios are against other packages (scipy's eigsh, PEFT, curvlinops): their versions are recorded."""
    env = environment(torch.device("cpu"))
    assert set(env["anchors"]) == set(ANCHORS) and env["anchors"]["scipy"] == scipy.__version__
    assert {"device", "cpu_threads", "torch", "unlearn_kernels"} <= set(env)


def test_the_distributed_json_says_what_each_measured_configuration_ran_with(tmp_path):
    """Its environment recorded the runner's --threads (2 here) while every measured process ran one thread."""
    subprocess.run([*RUNNER, "distributed", "--quick", "--threads", "2", "--out", str(tmp_path)], check=True,
                   cwd=BENCHMARKS.parent, stdout=subprocess.DEVNULL)
    written = json.loads((tmp_path / "distributed_cpu.json").read_text())
    env = written["environment"]
    assert env["cpu_threads"] == 1
    assert env["processes"] == {"1 process": 1, "2 processes": 2, "2 processes, no all_reduce": 2}
    assert {row["candidate"] for row in written["results"]} == set(env["processes"])


def test_the_distributed_suite_takes_at_least_five_samples_of_each_call():
    """It timed bursts until each candidate had spent ``min_time``, so a call longer than that had one or two
    samples (none at all with min_time 0): a median of too few. At least five now, recorded in the JSON."""
    import benchmarks.distributed

    results, _ = benchmarks.distributed.run(torch.device("cpu"), quick=True, min_time=0.0, burst=0.0)
    assert len(results) == 6 and all(m.status == "ok" for m in results)
    assert all(m.extra["samples"] >= 5 and m.median_s > 0 for m in results)


def test_a_ctrl_c_while_the_distributed_workers_start_is_not_lost(monkeypatch):
    """The parent ignored SIGINT while it started the workers (so that they start with it ignored): a Ctrl-C in
    that window was dropped and the suite ran on to its end. The workers start with it blocked now and the
    parent records a Ctrl-C meanwhile and raises it once both started (raising it mid-start left a worker
    reading its start-up data from a closed pipe: an EOFError traceback)."""
    import benchmarks.distributed as suite

    spawn = mp.get_context("spawn").Process
    started = []

    def start_then_ctrl_c(self):
        spawn_start(self)
        started.append(self)
        os.kill(os.getpid(), signal.SIGINT)  # inside the window: the first worker started, the second not yet

    spawn_start = spawn.start
    monkeypatch.setattr(spawn, "start", start_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        suite.run(torch.device("cpu"), **suite.QUICK)
    assert len(started) == 2 and not any(p.is_alive() for p in started)


def test_distributed_suite_stops_waiting_for_a_dead_worker():
    """A worker that died (NCCL init, out of memory) fails the suite at once, not after 600 s."""
    ctx = mp.get_context("spawn")
    dead = ctx.Process(target=sys.exit, args=(3,))
    dead.start()
    dead.join()
    with pytest.raises(RuntimeError, match=r"worker\(s\) exited \(rank: exit code\) \{0: 3\}"):
        _replies(ctx.Queue(), [dead], timeout=5)  # not "no reply from the workers in 5 s"


@pytest.mark.parametrize("out_given", [False, True])
def test_replacing_the_committed_json_redraws_the_docs_plot(out_given, monkeypatch, tmp_path):
    """docs/img/hvp_gradient_units.png stayed drawn from an earlier JSON after the committed one was replaced:
    the runner redraws a suite's plot whenever it writes the committed CPU results, and only then."""
    import benchmarks.__main__ as runner
    import benchmarks.cubic

    drawn = []
    monkeypatch.setattr(runner.common, "RESULTS_DIR", tmp_path / "committed")
    monkeypatch.setattr(benchmarks.cubic, "run", lambda device, **kwargs: ([], {}))
    monkeypatch.setattr(benchmarks.cubic, "PLOT", lambda path: drawn.append(path) or tmp_path / "plot.png")
    (tmp_path / "committed").mkdir()
    assert main(["cubic", "--threads", "1"] + (["--out", str(tmp_path / "elsewhere")] if out_given else [])) == 0
    assert drawn == ([] if out_given else [tmp_path / "committed" / "cubic_cpu.json"])
    assert main(["cubic", "--quick", "--out", str(tmp_path / "committed")]) == 0  # a smoke test draws nothing
    assert len(drawn) == (0 if out_given else 1)


def test_the_runner_in_a_callers_process_leaves_its_thread_count(monkeypatch, tmp_path):
    """main(["cubic", "--threads", "1"]) left torch at one thread for the rest of the caller's process (and of
    this test session), also when the arguments were refused."""
    import benchmarks.cubic

    monkeypatch.setattr(benchmarks.cubic, "run", lambda device, **kwargs: ([], {}))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["cubic", "--threads", "1", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 2
        with pytest.raises(SystemExit):
            main(["no-such-suite", "--threads", "1"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_plot_that_fails_costs_no_other_suite(monkeypatch, capsys, tmp_path):
    import benchmarks.__main__ as runner
    import benchmarks.cubic
    import benchmarks.softmax_ce

    def broken(path):
        raise OSError("docs/img is read-only")

    monkeypatch.setattr(runner.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(benchmarks.cubic, "run", lambda device, **kwargs: ([], {}))
    monkeypatch.setattr(benchmarks.cubic, "PLOT", broken)
    monkeypatch.setattr(benchmarks.softmax_ce, "run", lambda device, **kwargs: ([], {}))
    assert main(["cubic", "softmax_ce", "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "cubic: plot FAILED" in out and (tmp_path / "softmax_ce_cpu.json").is_file()



def test_a_suite_that_cannot_load_costs_no_other_suite(monkeypatch, capsys, tmp_path):
    """The code before imported each suite outside the per-suite catch: one suite's import error ended the run."""
    import importlib

    import benchmarks.__main__ as runner
    import benchmarks.softmax_ce

    load = importlib.import_module

    def import_module(name, package=None):
        if name == ".cubic":
            raise ImportError("an anchor of the cubic suite is broken")
        return load(name, package)

    monkeypatch.setattr(runner.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(runner.importlib, "import_module", import_module)
    monkeypatch.setattr(benchmarks.softmax_ce, "run", lambda device, **kwargs: ([], {}))
    assert main(["cubic", "softmax_ce", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert "cubic: FAILED to load" in captured.out and "an anchor of the cubic suite is broken" in captured.err
    assert (tmp_path / "softmax_ce_cpu.json").is_file()

def test_gpu_check_selects_every_test_that_runs_a_cuda_backend():
    """benchmarks/gpu_check.sh runs its test files with a -k selection. A test whose cuda cases run inside its
    body (a loop over the op's (backend, device) pairs) has no "cuda" in its id: it must take the ``device``
    fixture (its ids then name the device) or carry the ``every_backend`` mark, which the selection names. Four
    accuracy tests of the CUDA MLP HVP and the softmax CE error test were left out of the GPU check before."""
    import ast

    script = (BENCHMARKS / "gpu_check.sh").read_text()
    selection = re.search(r'-k "([^"]+)" "\$\{TESTS\[@\]\}"', script).group(1)
    assert {"cuda", "triton", "every_backend"} <= set(selection.split(" or "))
    files = re.search(r"TESTS=\(([^)]*)\)", script).group(1).split()
    tables = r"for [^\n]*\bin (PAIRS|COMPILED|DEVICES|BACKENDS|ERROR_BACKENDS|ERROR_DEVICES|backend_devices\()"
    looping = []
    for name in files:
        source = (BENCHMARKS.parent / name).read_text()
        for node in ast.parse(source).body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            if re.search(tables, ast.get_source_segment(source, node)):
                marked = any("every_backend" in ast.unparse(d) for d in node.decorator_list)
                takes_device = "device" in [a.arg for a in node.args.args]
                looping.append((f"{name}::{node.name}", marked or takes_device))
    assert len(looping) >= 8  # the rule has something to check
    assert [test for test, selected in looping if not selected] == []
    # and every test file that runs an op on each (backend, device) pair is in the list (tests/test_mlp_value_grad.py
    # was not: its CUDA cases would not have run on a lent GPU)
    pairs = sorted(f"tests/{p.name}" for p in (BENCHMARKS.parent / "tests").glob("test_*.py")
                   if re.search(r"backend_devices\(|@pytest\.mark\.every_backend", p.read_text()))
    assert [name for name in pairs if name not in files] == []


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for the interpreter: every step passes at once, but a benchmark suite ignores SIGINT (a call hung
# in the driver, say) and sleeps until it is killed
case "$1 $2" in
    "-c from benchmarks.__main__"*) echo "softmax_ce hvp"; exit 0;;
    "-m benchmarks") trap '' INT; exec sleep 1000;;
esac
echo "ok"
"""


def test_gpu_check_ends_within_its_budget_when_a_step_ignores_sigint(tmp_path):
    """A step that ignores the timeout's SIGINT is killed 10 s later: that grace came on top of the time left,
    so a run could end 10 s past its budget (25% of a 40 s one), and its exit 137 was not called a timeout. (The
    wall time is not asserted, on these noisy machines: the step killed at its timeout and no time left for the
    next are.)"""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_BUDGET_S": "16",
           "GPU_CHECK_LOGS": str(tmp_path / "logs")}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "gpu_check: FAILED: bench_softmax_ce (exit 137, killed: timed out or out of memory)" in done.stdout, \
        done.stdout[-3000:]
    assert "gpu_check: FAILED: bench_hvp (no time left)" in done.stdout, done.stdout[-3000:]


def test_a_wrong_result_of_ours_fails_the_run_and_an_anchors_does_not(monkeypatch, capsys, tmp_path):
    """A kernel of ours marked wrong by its correctness gate left the runner's status 0 (benchmarks/gpu_check.sh
    then counted the step as passed); it fails the run now, its JSON written all the same. An anchor's wrong
    result (curvlinops on the ViT, in the committed hvp run) is reported in the table only."""
    import benchmarks.cubic
    import benchmarks.lora
    from benchmarks.common import Measurement

    def suite(candidate):
        return lambda device, **kwargs: ([Measurement("a case", candidate, None, None, 0.5, "wrong")], {})

    for module, candidate, status in ((benchmarks.lora, "ours:cpp", 1), (benchmarks.cubic, "krylov", 1),
                                      (benchmarks.lora, "peft", 0)):
        monkeypatch.setattr(module, "run", suite(candidate))
        name = module.__name__.rsplit(".", 1)[1]
        assert main([name, "--quick", "--out", str(tmp_path)]) == status
        out = capsys.readouterr().out
        assert (f"{name}: FAILED its correctness gates: {candidate} on a case" in out) == bool(status)
        assert json.loads((tmp_path / f"{name}_cpu.json").read_text())["results"][0]["status"] == "wrong"


def test_the_lora_suite_without_peft_reports_its_baseline_unavailable_and_times_ours(monkeypatch, capsys, tmp_path):
    """PEFT, the LoRA suite's baseline, is an optional library: without it the suite raised ImportError and
    wrote no JSON. Its rows are "unavailable" now, the run passes, and our kernel is still timed."""
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ModuleNotFoundError
    assert main(["lora", "--quick", "--no-compile", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "lora_cpu.json").read_text())["results"]
    peft = [r for r in rows if r["candidate"] == "peft"]
    assert peft and all(r["status"].startswith("unavailable: ModuleNotFoundError") for r in peft)
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows if r["candidate"] == "ours:cpp")
    assert "peft" in capsys.readouterr().out


# gd halved as such; krylov halved and also reported at gd's step cap, unconverged (what gd's relabelling looks at)
@pytest.mark.parametrize("broken, at_the_cap", [("gd", False), ("krylov", True)])
def test_a_wrong_step_is_not_taken_for_one_that_stopped_short(monkeypatch, capsys, tmp_path, broken, at_the_cap):
    """The cubic suite relabelled every wrong result of "gd" as stopped short of the target (its step cap, or its
    own tolerance), so a gd returning half its step passed the run. Only a gd step that meets its own stopping
    rule, or one at the step cap, is relabelled now; this one stays wrong and fails the run. A wrong Krylov step
    stays wrong whatever its iteration count."""
    import dataclasses

    import benchmarks.cubic as cubic

    solve = cubic.cubic_newton_step

    def halved(H, g, M, *, method, **options):
        step = solve(H, g, M, method=method, **options)
        if method != broken:
            return step
        half = 0.5 * step.step
        capped = {"converged": False, "iterations": cubic.GD_MAX_STEPS} if at_the_cap else {}
        return dataclasses.replace(step, step=half, model_value=cubic.model_value_and_residual(H, g, half, M)[0],
                                   **capped)

    problems = cubic._problems
    monkeypatch.setattr(cubic, "_problems", lambda quick: problems(quick)[:1])  # d = 1,000 alone
    monkeypatch.setattr(cubic, "cubic_newton_step", halved)
    assert main(["cubic", "--quick", "--out", str(tmp_path)]) == 1
    assert f"cubic: FAILED its correctness gates: {broken} on synthetic d=1000" in capsys.readouterr().out
    monkeypatch.setattr(cubic, "cubic_newton_step", solve)
    assert main(["cubic", "--quick", "--out", str(tmp_path)]) == 0


def test_a_kernel_of_ours_that_cannot_run_fails_the_run_unless_the_suite_expects_it(monkeypatch, capsys, tmp_path):
    """A kernel of ours that raised on its inputs, or was not built, was a row "unavailable" (or no row at all:
    the suites timed only the backends that could run) and the run passed, so benchmarks/gpu_check.sh could
    report every step passed with a crashing CUDA kernel. It fails the run now, but where the suite expects it
    (the fused path on a model that is not an MLP)."""
    import benchmarks.hvp
    import benchmarks.softmax_ce
    from unlearn_kernels import ops

    hvp = ops.softmax_ce_hvp

    def crashing(*args, backend="auto", **kwargs):
        if backend == "cpp":
            raise RuntimeError("kernel launch failed")
        return hvp(*args, backend=backend, **kwargs)

    monkeypatch.setattr(ops, "softmax_ce_hvp", crashing)
    assert main(["softmax_ce", "--quick", "--no-compile", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "softmax_ce: FAILED: candidates of ours that could not run: ours:cpp on" in out
    assert "RuntimeError: kernel launch failed" in out
    monkeypatch.setattr(ops, "softmax_ce_hvp", hvp)
    assert benchmarks.softmax_ce.kernel_backends(torch.device("cpu")) == ("cpp",)  # timed whether or not it runs
    # the lanczos suite filtered its step's backends by their status itself: an unbuilt kernel left no row
    import benchmarks.lanczos

    def crashing_step(*args, backend):
        if backend == "cpp":
            raise RuntimeError("kernel launch failed")
        return ops.lanczos_step(*args, backend=backend)

    monkeypatch.setattr(benchmarks.lanczos, "lanczos_step", crashing_step)
    assert main(["lanczos", "--quick", "--out", str(tmp_path)]) == 1
    assert "lanczos: FAILED: candidates of ours that could not run: ours:cpp on" in capsys.readouterr().out

    def suite(status):
        return lambda device, **kwargs: ([benchmarks.hvp.Measurement("a case", "ours:fused", None, None, None,
                                                                     status)], {})

    structure = "not an nn.Sequential of Linear layers and activations"
    for status, code in ((f"unavailable: ValueError: ... not a fused MLP (the model is ResNet18, {structure})", 0),
                         ("unavailable: ValueError: ... not a fused MLP (the cpp mlp_hvp kernel cannot run: extension "
                          "not loaded)", 1),  # an MLP without its kernel: the words "not a fused MLP" excused it
                         ("unavailable: RuntimeError: CUDA error", 1)):
        monkeypatch.setattr(benchmarks.hvp, "run", suite(status))
        assert main(["hvp", "--quick", "--out", str(tmp_path)]) == code, status


def test_the_correctness_gate_refuses_an_output_of_another_shape():
    """A candidate returning (3, n) where the exact answer is (n,) broadcast against it: its error was read
    from the broadcast difference and passed the gate where every row matched. It is wrong now, shape named."""
    from benchmarks.common import check

    exact = torch.arange(4, dtype=torch.float64)
    broadcast = check("a case", "ours", lambda: exact.float().expand(3, 4), exact, 1e-6)
    assert (broadcast.status, broadcast.max_abs_err, broadcast.extra) == ("wrong", None, {"shape": [3, 4]})
    assert check("a case", "ours", lambda: exact.float(), exact, 1e-6).status == "ok"


def test_an_unavailable_candidates_reason_is_kept_whole_for_the_runner_to_read(monkeypatch, capsys, tmp_path):
    """The status was cut at 200 characters, before the runner looked in it for a reason the suite expects: a
    model class with a long name pushed "not an nn.Sequential of Linear layers ..." past the cut, and the run
    failed for what the suite expects."""
    import benchmarks.hvp
    from benchmarks.common import check, unavailable

    structure = "not an nn.Sequential of Linear layers and activations"
    long_reason = (f"hessian_operator: path='fused' cannot be used: not a fused MLP (the model is {'A' * 200}, "
                   f"{structure})")

    def raising():
        raise ValueError(long_reason + "\nsecond line")

    exact = torch.zeros(3)
    status = check("a case", "ours:fused", raising, exact, 1e-6).status
    assert status == unavailable(ValueError(long_reason + "\nsecond line"))
    assert structure in status and "\n" not in status and status.startswith("unavailable: ValueError: ")
    monkeypatch.setattr(benchmarks.hvp, "run", lambda device, **kwargs: (
        [benchmarks.hvp.Measurement("a case", "ours:fused", None, None, None, status)], {}))
    assert main(["hvp", "--quick", "--out", str(tmp_path)]) == 0


def test_a_reference_wrong_like_the_kernel_fails_the_softmax_suite(monkeypatch, capsys, tmp_path):
    """The gates are twice the plain computation's error against the package's own reference: a reference and a
    kernel wrong alike (1.5x here) passed every candidate, the eager expression at 25% error too, and the run
    passed. The plain expression is held to the reference first now."""
    import benchmarks.softmax_ce
    from unlearn_kernels import ops

    reference, kernel = ops.softmax_ce_hvp_ref, ops.softmax_ce_hvp
    monkeypatch.setattr(benchmarks.softmax_ce.ops, "softmax_ce_hvp_ref", lambda *a, **k: 1.5 * reference(*a, **k))
    monkeypatch.setattr(benchmarks.softmax_ce.ops, "softmax_ce_hvp", lambda *a, **k: 1.5 * kernel(*a, **k))
    assert main(["softmax_ce", "--quick", "--no-compile", "--out", str(tmp_path)]) != 0
    captured = capsys.readouterr()
    assert "softmax_ce: FAILED" in captured.out and "the plain PyTorch computation's error" in captured.err
