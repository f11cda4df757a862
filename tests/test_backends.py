"""Backend choice: ``choose`` is marked constant for torch.compile without importing torch._dynamo."""
import os
import subprocess
import sys

import torch

from unlearn_kernels.backends import choose


def test_choose_carries_what_assume_constant_result_sets():
    # backends.py sets the decorator's attribute by hand: this catches a torch that marks functions otherwise
    def dummy():
        return None

    before = dict(vars(dummy))
    marked = torch.compiler.assume_constant_result(dummy)
    added = {name: value for name, value in vars(marked).items() if before.get(name, object()) is not value}
    assert added, "torch.compiler.assume_constant_result no longer sets an attribute: update backends.py"
    assert {name: getattr(choose, name, None) for name in added} == added


def test_importing_the_package_leaves_dynamo_and_inductor_alone(tmp_path):
    # torch._dynamo costs seconds at import, sets TORCHINDUCTOR_CACHE_DIR (inherited by every subprocess)
    # and creates $TMPDIR/torchinductor_<user>
    child = ("import os, sys; import unlearn_kernels; "
             "print('torch._dynamo' in sys.modules, os.environ.get('TORCHINDUCTOR_CACHE_DIR'))")
    env = {name: value for name, value in os.environ.items() if name != "TORCHINDUCTOR_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                         env={**env, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "None"], out.stdout
    assert not list(tmp_path.iterdir())
