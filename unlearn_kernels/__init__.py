"""unlearn-kernels: fast second-order machine unlearning for PyTorch."""
from . import ops
from .backends import BackendUnavailableError, backends
from .backends import choose as choose_backend

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "backends", "choose_backend", "ops", "__version__"]
