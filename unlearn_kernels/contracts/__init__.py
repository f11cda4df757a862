"""What the Python backends of an op share: one module per op with its argument checks and error
messages (word for word those of the op's C++ checks, so every backend raises the same error), and
the op's fake implementation and autograd formulas where backends register them.

Both ``unlearn_kernels.ops`` (the public functions and the pure-PyTorch references) and
``unlearn_kernels.triton_kernels`` import from here; this package imports neither, so the kernels
and the public ops depend on it and not on each other.
"""
