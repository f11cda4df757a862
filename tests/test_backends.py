"""Backend choice: ``choose`` is marked constant for torch.compile without importing torch._dynamo."""
import importlib
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


def test_triton_kernels_that_cannot_be_imported_make_triton_unavailable(monkeypatch):
    """In a source tree used without installing the package, ``unlearn_kernels.triton_kernels`` does not
    exist (setup.py maps the top-level triton_kernels/ into it): ``backends()`` and every choice that
    looks at Triton failed with ModuleNotFoundError; Triton is now unavailable, with the reason."""
    import importlib.util

    module = importlib.import_module("unlearn_kernels.backends")  # the package's name `backends` is the function
    find_spec = importlib.util.find_spec  # triton present, whether or not it is installed here: the import is reached
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "triton" else find_spec(name, *args))
    monkeypatch.setitem(sys.modules, "unlearn_kernels.triton_kernels", None)  # import raises ImportError
    monkeypatch.delattr(sys.modules["unlearn_kernels"], "triton_kernels", raising=False)
    module.triton_available.cache_clear()
    module.status.cache_clear()
    try:
        usable, reason = module.triton_available()
        assert not usable and "the package's Triton kernels cannot be imported" in reason
        assert "pip install --no-build-isolation -e ." in reason
        report = module.backends()
        assert not report["softmax_ce_hvp"]["triton"].usable and report["softmax_ce_hvp"]["reference"].usable
        assert module.choose("softmax_ce_hvp", "cpu") in ("cpp", "reference")
    finally:
        module.triton_available.cache_clear()
        module.status.cache_clear()


def test_declaring_an_op_again_refreshes_its_status(monkeypatch):
    """``status`` is cached per (op, backend): a new declaration must clear it, or the old answer stays."""
    backends = importlib.import_module("unlearn_kernels.backends")  # the package's name `backends` is a function
    monkeypatch.setattr(backends, "_IMPLEMENTED", dict(backends._IMPLEMENTED))
    try:
        backends.register_ops({"declared_twice": ("cpp",)})
        assert not backends.status("declared_twice", "reference").usable
        backends.register_ops({"declared_twice": ("cpp", "reference")})
        assert backends.status("declared_twice", "reference").usable
    finally:
        backends.status.cache_clear()
