"""Test-wide setup. Without a GPU, TRITON_INTERPRET=1 is set before any Triton kernel module is
imported, so that the Triton kernels run through the interpreter on the CPU; with one they are
compiled. The ``device`` fixture runs a test on every device of tests/devices.py (the CPU, and
"cuda" when a GPU is visible)."""
import os
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from devices import DEVICES  # noqa: E402  (imports the package: after TRITON_INTERPRET is decided)

# One intra-op thread: the test problems are tiny, and on a shared 2-core machine OpenMP threads
# waiting on each other made small ops ~20x slower. Kernel tests that exercise the parallel paths
# raise the count themselves (see the `threads` fixture).
torch.set_num_threads(1)

# Full float32 on the GPU: PyTorch's default lets cuDNN convolutions on Ampere and newer GPUs round float32
# inputs to TF32 (10-bit mantissas), and the tests hold float32 results to float32's precision (seen on an H100: a
# plain float32 CNN product 4.9e-5 from float64, ten times the 4.9e-6 test_fused_conv allows float32).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# A suite started in the background by a shell (`pytest &`) inherits SIGINT ignored, and so would the commands
# the Ctrl-C tests start: those tests then saw no Ctrl-C at all. Python's own handler, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Property tests draw the same cases on every run (a fixed seed: a CI failure reproduces locally) and
# keep no example database; hypothesis still writes its cache of the code's constants to .hypothesis/ in the
# working folder (git-ignored).
settings.register_profile("suite", derandomize=True, database=None)
settings.load_profile("suite")


@pytest.fixture
def threads():
    """Run a test with several intra-op threads, restoring the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, os.cpu_count() or 2))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.fixture
def rng() -> torch.Generator:
    """A seeded generator, so that every random test input is reproducible."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device a test should run on: "cpu", and "cuda" when a GPU is visible."""
    return torch.device(request.param)


@pytest.fixture
def interrupt_plots(monkeypatch):
    """Call it to make every later matplotlib ``savefig`` write half a PNG (to a path or a file object)
    and raise KeyboardInterrupt, as a plot interrupted by Ctrl-C or a full disk would end."""
    import matplotlib.figure

    def torn(self, target, **kwargs):
        if isinstance(target, (str, os.PathLike)):
            Path(target).write_bytes(b"\x89PNG half")
        else:
            target.write(b"\x89PNG half")
        raise KeyboardInterrupt

    return lambda: monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn)
