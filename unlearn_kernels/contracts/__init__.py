"""What the Python backends of an op share: one module per op with its argument checks and error
messages (word for word those of the op's C++ checks, so every backend raises the same error), and
the op's fake implementation and autograd formulas where backends register them; and ``text``, how
the C++ checks print a dtype and a shape, for those messages and for the ops in ``ops/`` whose
Python checks repeat their C++ ones without a module here (``ops/mlp_hvp.py``).

Both ``unlearn_kernels.ops`` (the public functions and the pure-PyTorch references) and
``unlearn_kernels.triton_kernels`` import from here; this package imports neither, so the kernels
and the public ops depend on it and not on each other.
"""
