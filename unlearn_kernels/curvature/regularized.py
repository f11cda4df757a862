"""The curvature of a weight-decayed objective: ``H + weight_decay I``."""
from __future__ import annotations

import contextlib

import scipy.sparse.linalg
import torch

from ..checks import check_number
from .base import CurvatureOperator
from .distributed import DistributedOperator
from .linear_operator import to_scipy_operator


class RegularizedOperator:
    """``C + weight_decay I`` for a curvature operator C: the Hessian of
    ``L(w) + (weight_decay / 2) ||w||^2`` when C is the Hessian of L.

    A model trained with weight decay minimises that objective, so a Newton-type step that should
    land on the retrained optimum needs this curvature (and the gradient ``grad L + weight_decay w``).
    It speaks the operator interface the solvers use (``shape``, ``dtype``, ``device``, ``matvec``,
    ``matmat``, ``to_dense``, ``to_scipy``); products are those of C (they read the model's weights
    live, as C does) and are counted by C: :attr:`num_products` is C's counter.

    Args:
        operator: the curvature operator C (one process's, or a DistributedOperator over ranks).
        weight_decay: the shift, a finite number >= 0 that the operator's dtype holds (1e39 overflows
            float32: a ValueError, not an Inf diagonal).
    """

    def __init__(self, operator: CurvatureOperator | DistributedOperator, weight_decay: float) -> None:
        if not isinstance(operator, (CurvatureOperator, DistributedOperator)):
            raise TypeError("RegularizedOperator: operator must be a CurvatureOperator or a DistributedOperator, "
                            f"got {type(operator).__name__}")
        self.operator = operator
        self.weight_decay = check_number("RegularizedOperator: weight_decay", weight_decay, 0.0)
        if self.weight_decay > torch.finfo(operator.dtype).max:
            raise ValueError(f"RegularizedOperator: weight_decay {self.weight_decay!r} overflows the operator's "
                             f"{operator.dtype} (at most {torch.finfo(operator.dtype).max:.3g})")
        self.shape: tuple[int, int] = operator.shape
        self.dtype: torch.dtype = operator.dtype
        self.device: torch.device = operator.device

    @property
    def num_products(self) -> int:
        """The wrapped operator's product counter."""
        return self.operator.num_products

    @property
    def path(self) -> str:
        """The wrapped operator's path ("generic", "fused", ...)."""
        return self.operator.path

    def fixed_weights(self) -> contextlib.AbstractContextManager:
        """C's :meth:`~unlearn_kernels.curvature.CurvatureOperator.fixed_weights` run (a DistributedOperator,
        which compares the ranks' weights at every product, has none: nothing then)."""
        run = getattr(self.operator, "fixed_weights", None)
        return run() if run is not None else contextlib.nullcontext()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``(C + weight_decay I) v`` for a (d,) vector (one product of C), on no autograd graph, as C's."""
        out = self.operator.matvec(v)
        return out.add_(v.detach(), alpha=self.weight_decay) if self.weight_decay else out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``(C + weight_decay I) V`` for a (d, K) matrix (K products of C, one data pass), on no autograd graph."""
        out = self.operator.matmat(V)
        return out.add_(V.detach(), alpha=self.weight_decay) if self.weight_decay else out

    def to_dense(self, chunk_size: int = 256) -> torch.Tensor:
        """The d x d matrix (d products of C; small d only)."""
        dense = self.operator.to_dense(chunk_size)
        dense.diagonal().add_(self.weight_decay)
        return dense

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` (products counted by C)."""
        return to_scipy_operator(self.shape, self.dtype, self.device, self.matvec, self.matmat)

    def __repr__(self) -> str:
        return f"RegularizedOperator({self.operator!r}, weight_decay={self.weight_decay})"
