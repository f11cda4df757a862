"""The one bridge from torch products to ``scipy.sparse.linalg.LinearOperator``."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse.linalg
import torch

from ..checks import check_int

MatVec = Callable[[torch.Tensor], torch.Tensor]


def to_scipy_operator(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, matvec: MatVec,
                      matmat: MatVec) -> scipy.sparse.linalg.LinearOperator:
    """A symmetric float64 numpy ``LinearOperator`` over torch products.

    Inputs are converted to ``dtype`` on ``device`` (so a float32 operator computes in float32),
    outputs back to float64 numpy arrays on the CPU. ``matvec`` takes a (d,) tensor, ``matmat`` a
    (d, K) tensor; the transposed products are the same functions (the operator is symmetric). A
    complex input (scipy's ``eigs`` with a complex shift, ``gmres`` on a complex right-hand side) is
    two real products, ``H (a + ib) = H a + i H b``, and its result complex128: converted to float64,
    its imaginary part was dropped with at most a ComplexWarning.
    """
    def convert(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float64)).to(device, dtype)

    def real_or_complex(product: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        def apply(a: np.ndarray) -> np.ndarray:
            if np.iscomplexobj(a):
                return product(a.real) + 1j * product(a.imag)
            return product(a)
        return apply

    @real_or_complex
    def mv(a: np.ndarray) -> np.ndarray:
        return matvec(convert(a).reshape(-1)).double().cpu().numpy()

    @real_or_complex
    def mm(a: np.ndarray) -> np.ndarray:
        return matmat(convert(a)).double().cpu().numpy()

    return scipy.sparse.linalg.LinearOperator(shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)


def dense_by_products(d: int, dtype: torch.dtype, device: torch.device, matmat: MatVec,
                      chunk_size: int = 256) -> torch.Tensor:
    """The (d, d) matrix of a linear operator, by ``matmat`` with identity columns, ``chunk_size`` at
    a time (small d only; the chunks bound the memory a batched product holds).

    Raises:
        ValueError: ``chunk_size`` is not an int >= 1 ("to_dense: chunk_size ...").
    """
    chunk_size = check_int("to_dense: chunk_size", chunk_size)
    eye = torch.eye(d, dtype=dtype, device=device)
    return torch.cat([matmat(eye[:, i:i + chunk_size]) for i in range(0, d, chunk_size)], dim=1)
