"""The scripts under examples/ run as shipped (the README and the guide point users to them)."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _failure(done: subprocess.CompletedProcess) -> str:
    """What a failed run printed: torchrun ends its stderr with its own summary, so the start (the
    worker's traceback or abort message) is kept as well as the end."""
    err = done.stderr if len(done.stderr) <= 6000 else done.stderr[:3000] + "\n[...]\n" + done.stderr[-3000:]
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{err}"


def test_second_order_digits_example_runs():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "second_order_digits.py")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, _failure(done)
    out = done.stdout
    assert "path = fused" in out and "extreme Ritz values" in out and "cubic Newton step" in out, out


def test_distributed_curvature_example_runs_on_two_processes():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "examples" / "distributed_curvature.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, _failure(done)
    out = done.stdout
    assert "2 process(es), rows per process [629, 629]" in out, out
    assert "the same eigenvalues and step on every process: True" in out, out


def test_distributed_curvature_example_run_directly_needs_no_free_port():
    """Run without torchrun (a group of one process) it listened on the fixed port 29512, and failed with
    EADDRINUSE while another run, or anything else, held that port."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 29512))
        holder.listen()
        done = subprocess.run([sys.executable, str(ROOT / "examples" / "distributed_curvature.py")],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, _failure(done)
    assert "1 process(es), rows per process [1258]" in done.stdout, done.stdout


def test_rfa_study_example_runs(tmp_path):
    """The smallest study (the MLP, seed 0: every protocol and method once)."""
    out = tmp_path / "rfa"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "rfa_study.py"), "--out", str(out),
                           "--models", "mlp", "--seeds", "0"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, _failure(done)
    records = json.loads((out / "results.json").read_text())["records"]
    methods = ["retrain", "original", "finetune", "neggrad_plus", "lotus", "cure_newton", "cure_newton_lora", "rfa",
               "rfa:margin", "rfa:unseen_class", "rfa:other_class", "rfa:no_shift"]
    for protocol in ("random", "mislabeled", "class"):
        assert [r["method"] for r in records if r["protocol"] == protocol] == methods, protocol
    assert {(r["model"], r["seed"]) for r in records} == {("mlp", 0)}
    summary = (out / "summary.md").read_text()
    assert "### mlp, random" in summary and "### mlp, class" in summary and "Pearson r" in summary, summary
    assert (out / "gap_closed.png").stat().st_size > 0 and (out / "rf_jsd_vs_jsd.png").stat().st_size > 0


@pytest.fixture
def rfa_example(monkeypatch):
    """examples/rfa_study.py as a module, whose study fails the test if it starts."""
    spec = importlib.util.spec_from_file_location("rfa_study", ROOT / "examples" / "rfa_study.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    def study_ran(*args, **kwargs):
        raise AssertionError("the study ran")

    monkeypatch.setattr(example, "run", study_ran)
    return example


def test_rfa_study_refuses_an_output_file_that_is_a_folder_before_the_study(rfa_example, tmp_path, monkeypatch,
                                                                            capsys):
    """A results file that exists as a folder fails at once (usage error, status 2), not when the results
    are written after the whole study."""
    (tmp_path / "summary.md").mkdir()
    monkeypatch.setattr(sys, "argv", ["rfa_study.py", "--out", str(tmp_path), "--models", "mlp", "--seeds", "0"])
    with pytest.raises(SystemExit) as exit_:
        rfa_example.main()
    assert exit_.value.code == 2
    assert f"--out: '{tmp_path / 'summary.md'}', where the run writes a file, is a directory" in capsys.readouterr().err


def test_rfa_study_refuses_an_output_file_it_may_not_overwrite_before_the_study(rfa_example, tmp_path, monkeypatch,
                                                                                capsys):
    """A results file that the study would replace and may not (os.access stands in for its permission bits): refused
    at once, as `unlearn-kernels run` and the benchmark runner refuse one (the example did not look)."""
    locked = tmp_path / "results.json"
    locked.write_text("the user's file")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    monkeypatch.setattr(sys, "argv", ["rfa_study.py", "--out", str(tmp_path), "--models", "mlp", "--seeds", "0"])
    with pytest.raises(SystemExit) as exit_:
        rfa_example.main()
    assert exit_.value.code == 2
    assert f"--out: '{locked}', which the run overwrites, is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    # a model or seed the study fails on (or counts twice) was found after the models and seeds before it
    (["--models", "vit"], "argument --models: invalid choice: 'vit'"),
    (["--models", "mlp", "mlp"], "--models repeats a model: ['mlp', 'mlp']"),
    (["--seeds", "0", "0"], "seeds (--seeds) repeat a seed: [0, 0]"),
    (["--seeds", "-1"], "seeds (--seeds) must be in [0, 2**32), got -1"),
    (["--hvp-modes"], "unrecognized arguments: --hvp-modes"),  # a benchmark now: python -m benchmarks lora_hvp
    (["--out", ""], "argument --out: '' names no folder"),  # not the working folder
    (["--out", "{file}/out"], "cannot be made"),  # a traceback from mkdir
])
def test_rfa_study_refuses_wrong_options_before_the_study(rfa_example, argv, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    argv = [arg.format(file=tmp_path / "file") for arg in argv]
    monkeypatch.setattr(sys, "argv", ["rfa_study.py", "--out", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as exit_:
        rfa_example.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rfa_study_plots_are_written_atomically(rfa_example, tmp_path, interrupt_plots):
    """An interrupted plot (Ctrl-C, a full disk) left a torn PNG in place of the committed one in docs/rfa."""
    records = [{"model": "mlp", "protocol": protocol, "seed": 0, "method": label, "acc_forget": 0.05 * i,
                "js_to_oracle": 0.01 * i * (1 + i % 3), "rf_jsd": 0.02 * i}
               for protocol in rfa_example.PROTOCOLS for i, label in enumerate(["retrain", *rfa_example.METHOD_SPECS])]
    rfa_example.plots(records, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"gap_closed.png", "rf_jsd_vs_jsd.png"}

    interrupt_plots()
    with pytest.raises(KeyboardInterrupt):
        rfa_example.plots(records, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_rfa_study_writes_strict_json_and_no_nan_gap_closed(rfa_example, tmp_path, monkeypatch, capsys):
    """A seed where the Original's Acc_f equals the oracle's (nothing to close) printed "nan" for the whole
    gap-closed mean, and a NaN value was written as the token NaN, which strict JSON readers refuse."""
    gaps = {"random": (0.0, 0.2), "mislabeled": (0.3, 0.2), "class": (0.0, 0.0)}  # the Original's, per seed
    records = [{"model": "mlp", "protocol": protocol, "seed": seed, "method": label, "seconds": 1.0,
                "acc_forget": 0.5 + (gaps[protocol][seed] if label == "original" else 0.02 * i),
                "acc_retain": 0.9, "acc_test": 0.8, "mia": float("nan") if label == "lotus" else 0.5,
                "avg_gap": 0.01 * i, "js_to_oracle": 0.01 * i * (1 + i % 3 + seed), "activation_distance": 0.1,
                "rf_jsd": 0.02 * i}
               for protocol in rfa_example.PROTOCOLS for seed in (0, 1)
               for i, label in enumerate(["retrain", *rfa_example.METHOD_SPECS])]
    monkeypatch.setattr(rfa_example, "run", lambda models, seeds: records)
    monkeypatch.setattr(sys, "argv", ["rfa_study.py", "--out", str(tmp_path), "--models", "mlp", "--seeds", "0", "1"])
    rfa_example.main()

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    written = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)["records"]
    assert [r["mia"] for r in written if r["method"] == "lotus"] == [None] * 6
    closed = {}  # (protocol, method) -> the gap-closed cell of the printed table
    for table in capsys.readouterr().out.split("### mlp, ")[1:]:
        protocol = table.split("\n")[0]
        for row in table.split("\n")[4:]:
            if row.startswith("| "):
                cells = [cell.strip() for cell in row.split("|")]
                closed[protocol, cells[1]] = cells[3]
    assert closed["mislabeled", "retrain"] == "1.00" and closed["mislabeled", "original"] == "0.00"
    assert closed["random", "retrain"] == "1.00 (1/2 seeds)" and closed["random", "finetune"] == "0.80 (1/2 seeds)"
    assert closed["class", "retrain"] == "-" and closed["class", "rfa"] == "-"
    summary = (tmp_path / "summary.md").read_text()
    assert "Original's Acc_f gap 0 on seed(s) [0]: nothing to close there" in summary
    assert "Original's Acc_f gap 0 on seed(s) [0, 1]: nothing to close there" in summary


def test_rfa_study_summary_leaves_undefined_metrics_out_of_the_mean(rfa_example):
    """A metric undefined (NaN) on some seeds made its cell "nan ± nan"; as the study's tables (and the
    example's own gap-closed column) do, it is left out of the mean, marked (k/n seeds), "-" where no seed has it."""
    nan = float("nan")
    mia = {"lotus": (nan, 0.4, 0.6), "rfa": (nan, nan, nan), "finetune": (0.5, nan, nan)}
    records = [{"model": "mlp", "protocol": "random", "seed": seed, "method": label, "seconds": 1.0,
                "acc_forget": 0.7 if label == "original" else 0.5, "acc_retain": 0.9, "acc_test": 0.8,
                "mia": mia.get(label, (0.5,) * 3)[seed], "avg_gap": 0.01, "js_to_oracle": 0.01,
                "activation_distance": 0.1, "rf_jsd": 0.02}
               for seed in range(3) for label in ["retrain", *rfa_example.METHOD_SPECS]]
    rows = [row.split("|") for row in rfa_example.summary(records).split("\n")]
    cells = {row[1].strip(): row[6].strip() for row in rows if len(row) == 13}  # method -> its MIA cell
    assert cells["lotus"] == "0.500 ± 0.141 (2/3 seeds)"
    assert cells["finetune"] == "0.500 (1/3 seeds)" and cells["rfa"] == "-"
    assert cells["retrain"] == "0.500 ± 0.000"  # defined on every seed: as before
