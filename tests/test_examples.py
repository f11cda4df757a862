"""The scripts under examples/ run as shipped (the README and the guide point users to them)."""
import subprocess
import sys
from pathlib import Path

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
    assert "path = fused" in out and "extreme eigenvalues" in out and "cubic Newton step" in out, out


def test_distributed_curvature_example_runs_on_two_processes():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "examples" / "distributed_curvature.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, _failure(done)
    out = done.stdout
    assert "2 process(es), rows per process [629, 629]" in out, out
    assert "the same eigenvalues and step on every process: True" in out, out
