"""The scripts under examples/ run as shipped (the README and the guide point users to them)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_second_order_digits_example_runs():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "second_order_digits.py")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "path = fused" in out and "extreme eigenvalues" in out and "cubic Newton step" in out, out


def test_distributed_curvature_example_runs_on_two_processes():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "examples" / "distributed_curvature.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "2 process(es), rows per process [629, 629]" in out, out
    assert "the same eigenvalues and step on every process: True" in out, out
