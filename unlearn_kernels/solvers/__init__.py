"""Second-order solvers over any symmetric operator (a dense matrix, a ``CurvatureOperator``, any
object with ``matvec``/``shape``/``dtype``/``device``, or a function ``v -> H v``):

* :func:`lanczos`: extreme eigenpairs (full/selective/no reorthogonalisation, two-pass mode);
* :func:`adaptive_cubic_newton`: minimise a function by adaptive cubic regularisation (ARC), each
  step a Krylov cubic solve accepted or rejected on the actual decrease;
* :func:`cubic_newton_step`: the cubic-regularised Newton subproblem (CureNewton), by the dense
  float64 oracle, Krylov/Lanczos (:class:`KrylovCubicSolver`, reusable when only M changes) or
  gradient descent (:func:`cubic_gd`, :func:`stochastic_cubic_gd`);
* baselines: :func:`pinv_newton_step`, :func:`damped_newton_step`, and the inverse-HVP solvers
  :func:`conjugate_gradient`, :func:`minres`, :func:`lissa`.

Argument checks and the float64 norm they share live in :mod:`unlearn_kernels.checks` (the
foundation layer: the training recipe uses them too).
"""
from .arc import KRYLOV_DEFAULTS, ARCResult, ARCTrial, adaptive_cubic_newton, check_arc_options
from .baselines import (
    DENSE_MAX_DIM,
    DENSE_SOLVE_MAX_DIM,
    LinearSolve,
    NewtonStep,
    conjugate_gradient,
    damped_newton_step,
    damped_solver,
    lissa,
    minres,
    pinv_newton_step,
    pinv_solver,
)
from .cubic import (
    CubicStep,
    KrylovCubicSolver,
    StepOverflow,
    cubic_gd,
    cubic_model_value,
    cubic_newton_step,
    dense_cubic_step,
    sphere_noise,
    stochastic_cubic_gd,
)
from .lanczos import LanczosResult, lanczos
from .operators import DenseOperator, NonFiniteProduct, SolverOperator, as_operator

__all__ = [
    "ARCResult",
    "ARCTrial",
    "CubicStep",
    "DENSE_MAX_DIM",
    "DENSE_SOLVE_MAX_DIM",
    "DenseOperator",
    "KRYLOV_DEFAULTS",
    "KrylovCubicSolver",
    "LanczosResult",
    "LinearSolve",
    "NewtonStep",
    "NonFiniteProduct",
    "SolverOperator",
    "StepOverflow",
    "adaptive_cubic_newton",
    "check_arc_options",
    "as_operator",
    "conjugate_gradient",
    "cubic_gd",
    "cubic_model_value",
    "cubic_newton_step",
    "damped_newton_step",
    "damped_solver",
    "pinv_solver",
    "dense_cubic_step",
    "lanczos",
    "lissa",
    "minres",
    "pinv_newton_step",
    "sphere_noise",
    "stochastic_cubic_gd",
]
