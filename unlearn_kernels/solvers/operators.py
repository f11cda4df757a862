"""Adapters from what users pass as "H" to the one operator interface the solvers use.

The solvers accept a dense symmetric torch matrix, a function ``v -> H v``, or any object with
``matvec``/``shape``/``dtype``/``device`` (for example a
:class:`~unlearn_kernels.curvature.base.CurvatureOperator`). :func:`as_operator` validates the input
once and returns a :class:`SolverOperator`, which counts the products the solver asks for and
checks that every product is finite. Symmetry is checked where a dense matrix is at hand (a dense
H, or one built from products by ``to_dense``); an operator or function is taken as symmetric, as
the curvature operators are by construction: checking it would cost products at every solve (LiSSA
wraps a new sample at every step), and the Krylov solvers assume it, so a non-symmetric one gives
wrong results with no error.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any

import scipy.sparse.linalg
import torch

from ..checks import SMALLEST_SQUARED, all_finite, as_device, check_has_values, check_tensor, norm64
from ..curvature.linear_operator import MatVec, dense_by_products, to_scipy_operator


class NonFiniteProduct(ValueError):
    """An operator's product held NaN or Inf (a diverging recursion such as LiSSA's meets it).

    ``operator_fault`` tells the two causes apart where a :class:`SolverOperator` raised it: True where the
    operator's products are not finite (its product of a finite vector of entries at most 1 holds NaN or Inf),
    False where the vector it was given is (or, multiplied, became) too large for the dtype: the solver's
    iterate overflowed, not H. (Raised elsewhere without that test: True.)
    """

    def __init__(self, *args: Any, operator_fault: bool = True) -> None:
        super().__init__(*args)
        self.operator_fault = operator_fault


class DenseOperator:
    """A dense symmetric (d, d) torch matrix behind the operator interface (products counted).

    Args:
        matrix: the (d, d) floating point matrix; it is used as given (no copy), detached from any
            autograd graph.
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        # detached (the same storage), before the checks too: a matrix that requires grad would give steps with a
        # graph on some paths and torch's "Can't call numpy() on Tensor that requires grad" on others, and the
        # checks' float() reads of it warned (an error under -W error)
        self.matrix = matrix.detach()
        _check_dense(self.matrix)
        self.shape: tuple[int, int] = (matrix.shape[0], matrix.shape[1])
        self.dtype: torch.dtype = matrix.dtype
        self.device: torch.device = matrix.device
        self.num_products = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a (d,) vector."""
        self.num_products += 1
        return self.matrix @ v

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for a (d, K) matrix (K products)."""
        self.num_products += V.shape[1]
        return self.matrix @ V

    def to_dense(self) -> torch.Tensor:
        """The matrix itself (no products)."""
        return self.matrix

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` (products counted)."""
        return to_scipy_operator(self.shape, self.dtype, self.device, self.matvec, self.matmat)

    def __repr__(self) -> str:
        return f"DenseOperator(d={self.shape[0]}, dtype={self.dtype}, device={self.device})"


class SolverOperator:
    """A validated symmetric operator as the solvers see it.

    Wraps a :class:`DenseOperator`, a function ``v -> H v`` or any object with ``matvec``, ``shape``,
    ``dtype`` and ``device``. Every product is checked to be finite and of the right shape.
    :attr:`num_hvps` is the number of products since the wrap: read from the wrapped object's own
    ``num_products`` counter when it has one (so its own accounting, e.g. of a ``matmat``, is used),
    else counted here.
    """

    def __init__(self, base: Any, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                 matvec: MatVec, matmat: MatVec | None) -> None:
        self.base = base
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self._matvec = matvec
        self._matmat = matmat
        self._calls = 0
        self._start = self._base_count()

    def _base_count(self) -> int | None:
        count = getattr(self.base, "num_products", None)
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    @property
    def num_hvps(self) -> int:
        """Products applied since this wrapper was made."""
        now = self._base_count()
        return now - self._start if now is not None and self._start is not None else self._calls

    @property
    def dense(self) -> torch.Tensor | None:
        """The dense matrix when the operator wraps one, else None."""
        return self.base.matrix if isinstance(self.base, DenseOperator) else None

    def _product(self, apply: MatVec, v: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
        """``apply(v)``, checked; a NaN or Inf in it (or the operator's refusal of a non-finite v, as a
        curvature operator's "vector contains NaN or Inf") is told apart: the vector's own overflow (the
        solver's iterate grew beyond the dtype) or the operator's products (H, or its product, not finite)."""
        try:
            out = apply(v)
        except Exception as error:
            if isinstance(v, torch.Tensor) and not all_finite(v):
                raise NonFiniteProduct(self._overflow_message("the vector given to the operator holds NaN or Inf",
                                                              v.dtype), operator_fault=False) from error
            raise
        return self._check(out, expected, apply, v)

    def _check(self, out: Any, expected: tuple[int, ...], apply: MatVec | None = None,
               v: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the operator returned {got} for a product, expected shape {expected}")
        if out.dtype != self.dtype or out.device != self.device:
            raise ValueError(f"the operator returned a {out.dtype} product on {out.device}, but it declares "
                             f"{self.dtype} on {self.device}")
        if not all_finite(out):
            raise self._non_finite(apply, v)
        return out.detach()  # the solvers are not differentiable: no graph through their iterations

    def _non_finite(self, apply: MatVec | None, v: torch.Tensor | None) -> NonFiniteProduct:
        """The error for a product that holds NaN or Inf. A finite H was blamed where the solver's iterate had
        overflowed (float32 CG on a singular PSD diagonal H: |x| 2.6e38 at iteration 30): the vector is checked,
        and one more product, at the vector scaled to entries at most 1 (only where it has a larger one), tells
        an overflowing product of a large vector from an operator whose products are not finite."""
        if isinstance(v, torch.Tensor) and v.numel():
            if not all_finite(v):
                return NonFiniteProduct(self._overflow_message("the vector given to the operator holds NaN or Inf",
                                                               v.dtype), operator_fault=False)
            size = float(v.abs().max())
            if size > 1.0 and apply is not None:
                self._calls += 1 if v.dim() == 1 else v.shape[1]
                try:
                    unit = apply(v / size)
                except Exception:  # the operator's own error for a finite vector: H's fault
                    unit = None
                if isinstance(unit, torch.Tensor) and tuple(unit.shape) == tuple(v.shape) and all_finite(unit):
                    return NonFiniteProduct(self._overflow_message(
                        f"the operator's product of a vector of largest |entry| {size:.3g} holds NaN or Inf, while "
                        "its product at that vector scaled to entries at most 1 is finite", v.dtype),
                        operator_fault=False)
        return NonFiniteProduct("the operator returned NaN or Inf (non-finite Hessian or Hessian-vector product)")

    @staticmethod
    def _overflow_message(what: str, dtype: torch.dtype) -> str:
        return (f"{what}: the solver's iterate grew beyond {dtype}'s range (not a non-finite Hessian; e.g. a "
                "singular or indefinite system, or a diverging recursion): solve in float64 or add damping")

    def fixed_weights(self) -> contextlib.AbstractContextManager:
        """A run of products that the solver makes at one H (an iteration): the wrapped object's
        ``fixed_weights()`` where it has one (a curvature operator then checks the model at the run's two
        ends, not at every product), else nothing."""
        run = getattr(self.base, "fixed_weights", None)
        if not callable(run):
            return contextlib.nullcontext()
        context = run()
        if not (hasattr(context, "__enter__") and hasattr(context, "__exit__")):
            raise TypeError(f"the operator's fixed_weights() must return a context manager (the solvers enter it "
                            f"around each iteration), got {type(context).__name__} from {type(self.base).__name__}")
        return context

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a (d,) vector of the operator's dtype and device."""
        self._calls += 1
        return self._product(self._matvec, v, (self.shape[0],))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for a (d, K) matrix: one ``matmat`` of the wrapped object if it has one."""
        self._calls += V.shape[1]
        if self._matmat is None:
            return torch.stack([self._product(self._matvec, c, (self.shape[0],)) for c in V.T], dim=1)
        return self._product(self._matmat, V, tuple(V.shape))

    def to_dense(self, chunk_size: int = 256) -> torch.Tensor:
        """The (d, d) matrix: the wrapped one, or d products, ``chunk_size`` columns per ``matmat``
        (small d only; the chunks bound the memory a batched product holds)."""
        if self.dense is not None:
            return self.dense
        dense = dense_by_products(self.shape[0], self.dtype, self.device, self.matmat, chunk_size)
        _check_symmetric(dense, "the operator's products", ASYMMETRY_RTOL)  # its users take the symmetric part
        return dense

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` whose products are counted here."""
        return to_scipy_operator(self.shape, self.dtype, self.device, self.matvec, self.matmat)

    def __repr__(self) -> str:
        return f"SolverOperator({self.base!r}, num_hvps={self.num_hvps})"


def _check_dense(matrix: torch.Tensor) -> None:
    # sparse or meta: refused here by name, not by torch in the checks below
    check_has_values("H", check_tensor("H", matrix))
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"H must be a square (d, d) matrix, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TypeError(f"H must be a floating point matrix, got {matrix.dtype}")
    if not all_finite(matrix):
        raise ValueError("H contains NaN or Inf")
    _check_symmetric(matrix, "H")


ASYMMETRY_RTOL = 1e-2
"""The largest ``max |H - H^T|`` a dense matrix built from an operator's products (``to_dense``) may have,
relative to ``max |H|``. Rounding is not bounded relative to H: a well-fitted model's Hessian is a small
difference of far larger terms (softmax probabilities near 0 and 1), so its float32 products were asymmetric by
1.7e-3 of max |H| (an MLP on 50 rows; float64: 5e-8), which a sqrt(eps) rule refused (the fused path's, until its
loss rows were taken relative to each row's top class: 1.3e-7 since; torch's double backward there 1.4e-6, and on 10
rows all rounding). Those who use such a
matrix (the dense Newton baselines, the dense cubic step) take its symmetric part. A dense H given by the caller,
which the solvers use as given, is held to sqrt(eps) of its dtype: 0.8% of asymmetry there made Lanczos
certify a wrong eigenvalue."""


def _check_symmetric(matrix: torch.Tensor, what: str, rtol: float | None = None) -> None:
    """ValueError where ``max |H - H^T|`` exceeds ``rtol`` (default: sqrt(eps) of the dtype) of ``max |H|``."""
    rtol = torch.finfo(matrix.dtype).eps ** 0.5 if rtol is None else rtol
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    asym = float((matrix - matrix.T).abs().max()) if matrix.numel() else 0.0
    if asym > rtol * scale:
        raise ValueError(f"{what} must be symmetric: max |H - H^T| = {asym:.3e} against max |H| = {scale:.3e} "
                         f"(more than {rtol:.2g} of it): the matrix is not symmetric, or its entries are "
                         "mostly rounding (a Hessian far smaller than the terms it is computed from, as a very "
                         "confident model's in float32: compute it in float64)")


def as_operator(
    H: Any,
    dim: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    name: str = "the gradient",
) -> SolverOperator:
    """Validate ``H`` and wrap it as a :class:`SolverOperator`.

    Args:
        H: a dense symmetric (d, d) torch matrix; an object with ``matvec(v)``, ``shape``, ``dtype``
            and ``device`` (and optionally ``matmat(V)``, a ``num_products`` counter and
            ``fixed_weights()``, a context manager the solvers enter around each iteration), such as a
            ``CurvatureOperator`` or a :class:`DenseOperator`; a :class:`SolverOperator` (rewrapped so
            its count starts at 0); or a function ``v -> H v``, which needs ``dim``, ``dtype`` and
            ``device``.
        dim: the expected dimension d (e.g. that of the gradient); checked when given.
        dtype, device: the vectors' dtype and device (e.g. the gradient's); checked when given.
        name: what gave ``dim``, ``dtype`` and ``device``, for the messages (e.g. ``"v0"``).

    Raises:
        ValueError: a non-square, non-symmetric or non-finite matrix, a dimension, device or shape
            mismatch, a device that is not one (an operator or function is not checked for symmetry:
            see the module docstring). TypeError: an unsupported object (a sparse matrix, a
            non-callable ``matvec``, a ``shape`` that is not a pair of ints) or a dtype mismatch.
    """
    if isinstance(H, SolverOperator):
        H = H.base
    if isinstance(H, torch.Tensor):
        H = DenseOperator(H)
    if hasattr(H, "matvec"):
        shape = getattr(H, "shape", None)
        if not (isinstance(shape, tuple) and len(shape) == 2
                and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in shape)):
            raise TypeError(f"the operator must have a (d, d) tuple `shape` of ints, got {shape!r}")
        shape = (int(shape[0]), int(shape[1]))  # numpy ints too
        if shape[0] != shape[1] or shape[0] < 0:
            raise ValueError(f"the operator must be square, (d, d) with d >= 0, got shape {shape}")
        op_dtype, op_device = getattr(H, "dtype", None), getattr(H, "device", None)
        if not isinstance(op_dtype, torch.dtype) or op_device is None:
            raise TypeError("the operator must have `dtype` (a torch.dtype) and `device` attributes")
        matmat = getattr(H, "matmat", None)
        if not callable(H.matvec) or not (matmat is None or callable(matmat)):
            raise TypeError(f"the operator's matvec (and matmat, if any) must be callable, got matvec "
                            f"{type(H.matvec).__name__}, matmat {type(matmat).__name__}")
        op = SolverOperator(H, shape, op_dtype, _device("the operator's device", op_device), H.matvec, matmat)
    elif callable(H):
        if dim is None or dtype is None or device is None:
            raise ValueError("a function v -> H v needs dim, dtype and device (those of the gradient)")
        op = SolverOperator(H, (dim, dim), dtype, _device("device", device), H, None)
    else:
        raise TypeError(
            "H must be a dense torch matrix, an operator with matvec/shape/dtype/device, or a function "
            f"v -> H v; got {type(H).__name__}"
        )
    if not op.dtype.is_floating_point:
        raise TypeError(f"the operator must have a floating point dtype, got {op.dtype}")
    if dim is not None and op.shape[0] != dim:
        raise ValueError(f"the operator has dimension {op.shape[0]} but {name} has {dim}")
    if dtype is not None and op.dtype != dtype:
        raise TypeError(f"the operator has dtype {op.dtype} but {name} has {dtype}")
    if device is not None and op.device != _device("device", device):
        raise ValueError(f"the operator is on {op.device} but {name} is on {device}")
    return op


def _device(name: str, value: Any) -> torch.device:
    device = as_device(name, value, "is not a torch device (e.g. 'cpu', 'cuda:0')")
    if device.type == "meta":  # its products would have shapes but no values for the solvers to read
        raise ValueError(f"{name} is the meta device (shapes without values): the solvers need an operator on cpu or "
                         "cuda")
    return device


def check_vector(g: Any, name: str = "g") -> torch.Tensor:
    """``g`` as a validated 1-D finite floating point tensor, detached (the solvers never
    differentiate through it; raises TypeError/ValueError)."""
    check_has_values(name, check_tensor(name, g))
    if g.dim() != 1:
        raise ValueError(f"{name} must be a 1-D (d,) vector, got shape {tuple(g.shape)}")
    if not g.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {g.dtype}")
    if g.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not all_finite(g):
        raise ValueError(f"{name} contains NaN or Inf")
    return g.detach()


def operator_and_vector(H: Any, g: Any, name: str = "g") -> tuple[SolverOperator, torch.Tensor]:
    """Validate a (H, g) pair: g a finite vector whose float64 norm is finite (the solvers scale by it:
    an overflowing one turns their iterates to NaN, or a residual of Inf into "converged") and, unless
    g = 0, with an entry of at least 1.5e-154, the square root of float64's smallest normal number
    (below that every square underflows, and CG, MINRES, pinv's Lanczos and the Krylov cubic solver
    returned wrong steps reported converged); H an operator of g's dimension, dtype and device."""
    g = check_vector(g, name)
    gnorm = norm64(g)
    largest = float(g.abs().max()) if g.numel() else 0.0
    if not math.isfinite(gnorm):
        raise ValueError(f"{name}'s squared norm overflows float64 (largest |entry| {largest:.3e}): scale the problem "
                         "down")
    if 0.0 < largest < SMALLEST_SQUARED:
        raise ValueError(f"{name}'s entries are all below {SMALLEST_SQUARED:.1e} (largest |entry| {largest:.3e}), "
                         "where their squares underflow float64: scale the problem up")
    return as_operator(H, g.shape[0], dtype=g.dtype, device=g.device, name=name), g
