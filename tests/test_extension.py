"""The package without its compiled library (a failed build): it imports, one warning says why and how to
rebuild, and the pure-PyTorch reference kernels serve."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import unlearn_kernels

PACKAGE = Path(unlearn_kernels.__file__).parent
REPOSITORY = PACKAGE.parent

CHILD = r"""
import sys, warnings
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # not the installed copy
sys.path.insert(0, sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import unlearn_kernels
    from unlearn_kernels.ops import softmax_ce_grad
import torch
assert unlearn_kernels.__file__.startswith(sys.argv[1]), unlearn_kernels.__file__
logits = torch.tensor([[1.0, 2.0, 3.0]])
grad = softmax_ce_grad(logits, torch.tensor([2]))
assert torch.allclose(grad, torch.softmax(logits, 1) - torch.tensor([[0.0, 0.0, 1.0]]))
print("\n".join(str(w.message) for w in caught if "compiled extension" in str(w.message)))
"""


def test_a_missing_library_is_named_and_the_references_serve(tmp_path):
    # Python's own message for the absent library blamed "a circular import"
    copy = tmp_path / "unlearn_kernels"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("_C.*", "__pycache__", "triton_kernels"))
    triton_kernels = PACKAGE / "triton_kernels"  # installed inside the package, or beside it in the source tree
    shutil.copytree(triton_kernels if triton_kernels.is_dir() else REPOSITORY / "triton_kernels",
                    copy / "triton_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = out.stdout.strip().splitlines()
    assert len(warnings) == 1 and f"it is not built: no _C library in {copy}" in warnings[0], out.stdout
    assert "circular import" not in warnings[0] and "pip install --no-build-isolation -e ." in warnings[0]
