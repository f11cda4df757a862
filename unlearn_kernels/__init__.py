"""unlearn-kernels: fast second-order machine unlearning for PyTorch."""
from . import ops
from ._version import __version__
from .backends import BackendUnavailableError, backends
from .backends import choose as choose_backend

__all__ = ["BackendUnavailableError", "backends", "choose_backend", "ops", "__version__"]
