"""Backend choice: ``choose`` is marked constant for torch.compile without importing torch._dynamo."""
import importlib
import os
import subprocess
import sys

import pytest
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


@pytest.mark.parametrize("case", ["source tree", "old torch"])
def test_triton_kernels_that_cannot_be_imported_make_triton_unavailable(monkeypatch, case):
    """In a source tree used without installing the package, ``unlearn_kernels.triton_kernels`` does not
    exist (setup.py maps the top-level triton_kernels/ into it): ``backends()`` and every choice that
    looks at Triton failed with ModuleNotFoundError; Triton is now unavailable, with the reason. Where the
    kernels are installed but cannot be imported (a torch before 2.6 has no ``torch.library.triton_op``),
    the reason said to install the package as well: it names what they need now."""
    import importlib.util

    module = importlib.import_module("unlearn_kernels.backends")  # the package's name `backends` is the function
    find_spec = importlib.util.find_spec  # triton present, whether or not it is installed here: the import is reached
    kernels = "unlearn_kernels.triton_kernels"

    def spec(name, *args):
        if name == "triton" or (name == kernels and case == "old torch"):
            return object()
        return None if name == kernels else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", spec)
    monkeypatch.setitem(sys.modules, kernels, None)  # import raises ImportError
    monkeypatch.delattr(sys.modules["unlearn_kernels"], "triton_kernels", raising=False)
    module.triton_available.cache_clear()
    module.status.cache_clear()
    try:
        usable, reason = module.triton_available()
        assert not usable
        if case == "source tree":
            assert "the package's Triton kernels are not installed" in reason
            assert "pip install --no-build-isolation -e ." in reason
        else:
            assert "the package's Triton kernels cannot be imported" in reason and "need torch >= 2.6" in reason
        report = module.backends()
        assert not report["softmax_ce_hvp"]["triton"].usable and report["softmax_ce_hvp"]["reference"].usable
        assert module.choose("softmax_ce_hvp", "cpu") in ("cpp", "reference")
    finally:
        module.triton_available.cache_clear()
        module.status.cache_clear()


def test_interpreter_mode_is_read_without_triton_knobs(monkeypatch):
    """``triton.knobs`` came with Triton 3.4; the package allows older ones, where reading it raised a bare
    AttributeError from backends() and every choice that looks at Triton. Without it the variable decides."""
    import triton

    kernels = importlib.import_module("unlearn_kernels.triton_kernels")
    monkeypatch.delattr(triton, "knobs", raising=False)
    for value, interpreted in (("1", True), ("0", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert kernels._interpreted() is interpreted
    monkeypatch.delenv("TRITON_INTERPRET")
    assert kernels._interpreted() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without CUDA")
def test_triton_refuses_cuda_tensors_where_no_gpu_is_visible():
    """In interpreter mode Triton counts as usable without a GPU: a CUDA device passed its check and
    torch.cuda.current_device() raised torch's bare AssertionError ("Torch not compiled with CUDA enabled")."""
    from unlearn_kernels.backends import BackendUnavailableError

    assert choose("softmax_ce_hvp", "cuda:0") == "reference"
    assert choose("softmax_ce_hvp", "cuda") == "reference"
    with pytest.raises(BackendUnavailableError, match=r"^softmax_ce_hvp: backend 'triton' cannot run"):
        choose("softmax_ce_hvp", "cuda:1", "triton")


def test_a_backend_the_extension_lacks_says_how_to_build_it(monkeypatch):
    """The reason named why the C++ and CUDA backends cannot run without the extension, not how to build it
    (the one-time import warning did, which a user may have silenced)."""
    from unlearn_kernels import _extension

    module = importlib.import_module("unlearn_kernels.backends")
    monkeypatch.setattr(_extension, "extension_loaded", lambda: False)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "it is not built: no _C library in /somewhere")
    module.status.cache_clear()
    try:
        for backend in ("cpp", "cuda"):
            reason = module.status("softmax_ce_hvp", backend).reason
            assert reason == ("extension not loaded: it is not built: no _C library in /somewhere; rebuild it with "
                              "`pip install --no-build-isolation -e .` from the source tree")
    finally:
        module.status.cache_clear()


def test_the_build_command_is_written_once():
    """The command that builds the extension was written three times (the import warning, the C++/CUDA
    backends' reason, the Triton one), free to drift apart: _extension.BUILD_COMMAND now, which each takes."""
    from pathlib import Path

    from unlearn_kernels import _extension

    package = Path(_extension.__file__).parent
    holding = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                     if _extension.BUILD_COMMAND in p.read_text(encoding="utf-8"))
    assert holding == ["_extension.py"]
    assert f"`{_extension.BUILD_COMMAND}`" in _extension.REBUILD


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
