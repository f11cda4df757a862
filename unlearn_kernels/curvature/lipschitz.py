"""An estimate of the Lipschitz constant of a model's Hessian (the M of cubic-regularised Newton)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checks import (
    check_finite_model,
    check_int,
    check_not_meta,
    check_number,
    check_seed,
    norm64,
    refusing_uncopyable,
)
from .batches import DataSpec
from .probes import LossFn
from .factory import hessian_operator
from .params import ParamSelection, get_flat_parameters, resolve_curvature_parameters, set_flat_parameters


@dataclass(frozen=True)
class LipschitzEstimate:
    """What :func:`estimate_hessian_lipschitz` returns.

    Attributes:
        value: the estimate (the ``quantile`` of ``ratios``).
        ratios: ``||H(w + r d) v - H(w) v|| / r`` for each direction d (v after the power iteration).
        radius: r.
        num_hvps: Hessian-vector products used, the operator's construction probes included.
        num_gradients: the gradients its operator's construction took (its probes, and the finite-difference
            check of a model whose double backward it tests).
    """

    value: float
    ratios: tuple[float, ...]
    radius: float
    num_hvps: int
    num_gradients: int


def check_lipschitz_options(owner: str = "", *, num_directions: Any = 3, radius: Any = 0.1,
                            power_iterations: Any = 4, quantile: Any = 1.0) -> dict[str, Any]:
    """The numeric options of :func:`estimate_hessian_lipschitz`, checked and normalised (ValueError
    naming ``"<owner>: <option>"``; a method that passes them on checks them when it is built)."""
    prefix = f"{owner}: " if owner else ""
    return {"num_directions": check_int(f"{prefix}num_directions", num_directions),
            "radius": check_number(f"{prefix}radius", radius, 0.0, strict=True),
            "power_iterations": check_int(f"{prefix}power_iterations", power_iterations, low=0),
            "quantile": check_number(f"{prefix}quantile", quantile, 0.0, 1.0, strict=True)}


def estimate_hessian_lipschitz(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSpec,
    *,
    params: ParamSelection = None,
    num_directions: int = 3,
    radius: float = 0.1,
    power_iterations: int = 4,
    quantile: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    path: str = "auto",
) -> LipschitzEstimate:
    """Estimate the Lipschitz constant of the Hessian of the mean loss near the current weights w.

    For each of ``num_directions`` random unit directions d (Gaussian, normalised, from ``seed``) in
    the space of the chosen parameters, the finite difference ``D = (H(w + r d) - H(w)) / r`` is
    applied to a random unit vector v: ``||D v||`` is a lower bound of the local Lipschitz constant
    ``sup ||H(w') - H(w)|| / ||w' - w||`` over the ball of radius r. A random v sees a tiny part of
    D in high dimension, so v is then refined by ``power_iterations`` steps of power iteration on
    the symmetric D (``v <- D v / ||D v||``), which tends to ``||D||_2``, the largest change along
    d. The estimate is the ``quantile`` of the final ratios (1.0: their maximum). Cost:
    ``2 (power_iterations + 1)`` products per direction, and those of the operator's construction
    probes (none on the fused paths, one or two on the generic one); ``power_iterations=0`` is the
    plain random-pair estimate. One operator is built; the perturbed weights are written into a
    private copy of the model, which the operator reads live.

    The radius sets the scale: choose it near the step lengths expected (a ReLU network's Hessian
    jumps where activation patterns change, so a tiny r sees few of the jumps and a large one
    averages over many). On a quadratic loss (constant Hessian) every ratio is rounding noise,
    about ``eps ||H|| / r``.

    Args:
        model: any nn.Module (in eval mode if it has BatchNorm or dropout). Not modified.
        loss_fn, data, params, batch_size, path: as in :func:`~unlearn_kernels.curvature.hessian_operator`.
        num_directions: number of directions d, >= 1.
        radius: r > 0, in the units of the parameters, large enough that the parameters' dtype
            resolves the step: each ``w + r d`` must move w by r to within 10%.
        power_iterations: power-iteration steps on v per direction, >= 0.
        quantile: in (0, 1].
        seed: seeds the random vectors, an int in [0, 2**63).

    Raises:
        ValueError: a bad ``num_directions``, ``radius`` (also one the weights' dtype cannot resolve, and
            one so large that the products at ``w + radius d`` are not finite: the loss overflows there),
            ``power_iterations``, ``quantile`` or ``seed`` (out of range), a bad ``params`` selection,
            a model with a parameter or buffer on the meta device, or a NaN/Inf weight (named), or what the
            operator raises.
        TypeError: a ``seed`` that is not an int; a model that cannot be copied (a layer pruned by
            torch.nn.utils.prune, an attribute that cannot be pickled such as a lock), or one the
            operators refuse as such (a TorchScript module, a DataParallel wrapper).
    """
    num_directions, radius, power_iterations, quantile = check_lipschitz_options(
        "estimate_hessian_lipschitz", num_directions=num_directions, radius=radius,
        power_iterations=power_iterations, quantile=quantile).values()
    seed = check_seed("estimate_hessian_lipschitz: seed", seed)
    # on the caller's model (its tensors are not the copy's), refused as the operator would refuse it
    names = tuple(resolve_curvature_parameters(model, params))
    check_not_meta("estimate_hessian_lipschitz", model)  # before its weights are read
    check_finite_model("estimate_hessian_lipschitz", model)  # else read below as a radius the weights cannot resolve
    w = get_flat_parameters(model, names)
    generator = torch.Generator().manual_seed(seed)

    def unit_vector() -> torch.Tensor:
        z = torch.randn(w.numel(), generator=generator, dtype=torch.float64)
        return (z / torch.linalg.vector_norm(z)).to(w.device, w.dtype)

    directions = [(unit_vector(), unit_vector()) for _ in range(num_directions)]  # (d, v) pairs
    for d, _ in directions:
        # a radius the weights' dtype cannot resolve moves w by another step (or none: a ratio of 0 or
        # NaN); compared in units of the radius, where a tiny step's squared entries do not underflow
        off = norm64(((w + radius * d).double() - w.double()) / radius - d.double())
        if not off <= 0.1:
            raise ValueError(
                f"estimate_hessian_lipschitz: radius={radius!r} is too small for the {w.dtype} weights: w + radius * d "
                f"moves them by a step off by {off:.1%} of the radius (over 10%); use a larger radius"
            )
    with refusing_uncopyable("estimate_hessian_lipschitz", "the estimate moves the weights of a private copy (the "
                             "given model stays as it is)"):
        work = copy.deepcopy(model)
    op = hessian_operator(work, loss_fn, data, names, path=path, batch_size=batch_size)
    ratios = []
    for d, v in directions:
        for _ in range(power_iterations + 1):
            at_w = op.matvec(v)
            set_flat_parameters(work, w + radius * d, names)  # the operator reads the weights live
            moved = op.matvec(v)
            set_flat_parameters(work, w, names)
            change = (moved - at_w) / radius
            ratio = norm64(change)
            if not math.isfinite(ratio):  # NaN fed to the next product, or the estimate, with no word
                raise ValueError(f"estimate_hessian_lipschitz: the Hessian products at w + radius * d are not finite "
                                 f"(radius={radius!r}): the loss overflows that far from the weights; use a smaller "
                                 "radius")
            if ratio == 0.0:  # H does not change along d (a quadratic loss in exact arithmetic)
                break
            v = change / ratio
        ratios.append(ratio)
    return LipschitzEstimate(float(np.quantile(ratios, quantile)), tuple(ratios), radius, op.num_products,
                             op.num_gradients)
