"""The package's version, in one place: ``unlearn_kernels.__version__``, the checkpoints' metadata and
pyproject.toml (``tool.setuptools.dynamic``) read it from here."""
__version__ = "0.1.0"
