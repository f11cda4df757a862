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


def test_the_cpu_features_a_library_needs_are_read_from_its_marker(tmp_path):
    from unlearn_kernels._extension import CPU_FEATURES_MARKER, missing_cpu_features

    library = tmp_path / "_C.so"
    library.write_bytes(b"\x7fELF..." + CPU_FEATURES_MARKER + b"avx2,fma,f16c;\x00more")
    assert missing_cpu_features(library, {"sse2", "avx", "fma"}) == ["avx2", "f16c"]
    assert missing_cpu_features(library, {"avx2", "fma", "f16c", "avx512f"}) == []
    assert missing_cpu_features(library, None) == []  # not Linux: unknown, loaded as before
    library.write_bytes(b"\x7fELF..." + CPU_FEATURES_MARKER + b";")  # a generic build needs nothing
    assert missing_cpu_features(library, set()) == []
    library.write_bytes(b"\x7fELF without the marker")  # an older build
    assert missing_cpu_features(library, set()) == []


def _library() -> Path:
    return next(PACKAGE.glob("_C.*"))


def test_the_built_library_names_the_cpu_features_it_was_compiled_for():
    """csrc/ops.cpp's marker is in the library, and this machine (which built it) has every feature it names."""
    from unlearn_kernels._extension import CPU_FEATURES_MARKER, _cpu_flags, missing_cpu_features

    assert CPU_FEATURES_MARKER in _library().read_bytes()
    assert missing_cpu_features(_library(), _cpu_flags()) == []


def test_a_library_for_cpu_features_this_cpu_lacks_is_not_loaded(tmp_path):
    """An AVX2 build on a CPU without AVX2 ended the process with an illegal instruction at `import
    unlearn_kernels` (no Python except catches SIGILL). The package copied here holds, as its library, a file whose
    marker names a feature no CPU has and which is no library at all (loading it would raise ImportError): it is
    left unloaded, one warning says why, and the references serve. On any build and machine."""
    import importlib.machinery

    from unlearn_kernels._extension import CPU_FEATURES_MARKER

    copy = tmp_path / "unlearn_kernels"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("_C.*", "__pycache__", "triton_kernels"))
    triton_kernels = PACKAGE / "triton_kernels"
    shutil.copytree(triton_kernels if triton_kernels.is_dir() else REPOSITORY / "triton_kernels",
                    copy / "triton_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    library = copy / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    library.write_bytes(b"\x7fELF, not a library: " + CPU_FEATURES_MARKER + b"avx9,fma,f16c;")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = out.stdout.strip().splitlines()
    assert len(warnings) == 1 and "compiled for CPU features this CPU lacks (avx9)" in warnings[0], out.stdout
    assert "UNLEARN_KERNELS_CPU_ARCH=generic" in warnings[0]


def _cpuinfo(tmp_path, flags: str) -> str:
    """A /proc/cpuinfo of one CPU with ``flags``, as a file."""
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: a test CPU\nflags\t\t: {flags}\n")
    return str(path)


def test_the_cpu_flags_follow_torchs_cpuid_reading_where_it_found_no_avx2(monkeypatch, tmp_path):
    """Under an emulator /proc/cpuinfo lists the host's flags (qemu's SandyBridge still showed avx2, and the AVX2
    library was loaded and died); torch's capability, read from CPUID, then says DEFAULT. An ATEN_CPU_CAPABILITY
    override lowers it on a CPU that has AVX2: the flags are kept then. (A cpuinfo of a CPU with AVX2 is given.)"""
    import torch

    import unlearn_kernels._extension as extension

    monkeypatch.setattr(extension, "CPUINFO", _cpuinfo(tmp_path, "fpu sse2 avx avx2 fma f16c"))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert {"sse2", "avx2", "fma", "f16c"} <= extension._cpu_flags()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not {"avx2", "fma"} & extension._cpu_flags() and "sse2" in extension._cpu_flags()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert {"avx2", "fma"} <= extension._cpu_flags()
    monkeypatch.setattr(extension, "CPUINFO", str(tmp_path / "none"))  # not Linux: unknown
    assert extension._cpu_flags() is None
