"""Curvature operators: the Hessian or GGN of a model's mean loss over data, as linear operators.

Build one with :func:`hessian_operator` or :func:`ggn_operator`; all speak the
:class:`CurvatureOperator` interface (``matvec``, ``matmat`` with K vectors per data pass,
``gradient``, ``to_scipy``, ``to_dense``, product counters). :mod:`.params` maps a model's
parameters to and from the flat vectors the operators act on.
"""
from .base import CurvatureOperator
from .batches import BatchSource
from .distributed import DistributedObjective, DistributedOperator
from .fused_conv import FusedConvHessian
from .fused_mlp import FusedMLPHessian
from .factory import PATHS, ggn_operator, hessian_operator
from .generic import MODES, GenericHessian, GGNOperator
from .lipschitz import LipschitzEstimate, check_lipschitz_options, estimate_hessian_lipschitz
from .objective import Objective
from .params import (
    ModelChanged,
    flatten_tensors,
    get_flat_parameters,
    resolve_curvature_parameters,
    resolve_parameters,
    set_flat_parameters,
    unflatten_vector,
)
from .regularized import RegularizedOperator

__all__ = [
    "MODES",
    "PATHS",
    "BatchSource",
    "CurvatureOperator",
    "DistributedObjective",
    "DistributedOperator",
    "FusedConvHessian",
    "FusedMLPHessian",
    "GGNOperator",
    "GenericHessian",
    "LipschitzEstimate",
    "ModelChanged",
    "Objective",
    "RegularizedOperator",
    "check_lipschitz_options",
    "estimate_hessian_lipschitz",
    "flatten_tensors",
    "get_flat_parameters",
    "ggn_operator",
    "hessian_operator",
    "resolve_curvature_parameters",
    "resolve_parameters",
    "set_flat_parameters",
    "unflatten_vector",
]
