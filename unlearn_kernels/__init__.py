"""unlearn-kernels: fast second-order machine unlearning for PyTorch."""
from . import ops
from ._version import __version__
from .backends import BackendUnavailableError, aten_gemm, backends, cpu_gemm, onednn_gemm
from .backends import choose as choose_backend

__all__ = ["BackendUnavailableError", "aten_gemm", "backends", "choose_backend", "cpu_gemm", "onednn_gemm", "ops",
           "__version__"]
