"""Newton-family unlearning methods (CureNewton, its stochastic variant and the baselines).

Two small problems: L2-regularised multinomial logistic regression on 200 sklearn digits in float64
(strongly convex: the retrained optimum is known to high precision from L-BFGS, and every step is held
to a dense float64 solve with an independently built Hessian), and a tiny float32 ReLU MLP on 300
digits, unlearned in float64; plus a small CNN, whose steps through the fused conv path must equal the
generic path's.
"""
import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from custom_functions import square_function
from torch import nn

from unlearn_kernels.curvature import estimate_hessian_lipschitz, get_flat_parameters
from unlearn_kernels.data import load_dataset
from unlearn_kernels.data import LabeledData
from unlearn_kernels.eval import gradient_norm
from unlearn_kernels.methods import (
    METHODS, CureNewton, DampedNewton, DampedNewtonCG, InfluenceNewton, LiSSANewton, NewtonPinv, StochasticCureNewton,
)
from unlearn_kernels.methods import newton
from unlearn_kernels.curvature.base import PROBE_GRADIENTS
from unlearn_kernels.methods.newton import MIN_AUTO_M
from unlearn_kernels.models import MLP
from unlearn_kernels.solvers import ARCResult, StepOverflow
from unlearn_kernels.training import TrainConfig, init_model, train

LAM = 1e-2  # weight decay of the logistic regression (its strong convexity)
NEWTON = ("cure_newton", "stochastic_cure_newton", "newton_pinv", "damped_newton", "damped_newton_cg", "influence",
          "lissa")
#: one exact cubic step: the whole D_r for H, a tight Krylov tolerance
ONE_STEP = {"max_iterations": 1, "hessian_samples": None, "solver_options": {"kappa": 1e-10}}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0).train


def objective(model: nn.Module, data: LabeledData) -> torch.Tensor:
    return F.cross_entropy(model(data.x), data.y) + LAM / 2 * sum(p.square().sum() for p in model.parameters())


def lbfgs(model: nn.Module, data: LabeledData) -> nn.Module:
    """The minimiser of ``objective`` to about 1e-9 in gradient norm, from ``model``'s weights."""
    model = copy.deepcopy(model)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(model, data)
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    return model


def flat_objective(model: nn.Module, data: LabeledData):
    """``objective`` as a function of the flat parameter vector (for autograd Hessians)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(w: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(w, [math.prod(s) for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        out = torch.func.functional_call(model, params, (data.x,))
        return F.cross_entropy(out, data.y) + LAM / 2 * w.square().sum()

    return f


@pytest.fixture(scope="module")
def logreg(digits):
    """(original optimum on D, forget, retain, retrained optimum on D_r, dense H and g of D_r at the original)."""
    data = digits.subset(torch.arange(200))
    data = LabeledData(data.x.double(), data.y)
    forget, retain = data.subset(torch.arange(12)), data.subset(torch.arange(12, 200))
    torch.manual_seed(0)
    original = lbfgs(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double(), data)
    gold = lbfgs(original, retain)
    f = flat_objective(original, retain)
    w = get_flat_parameters(original)
    H = torch.autograd.functional.hessian(f, w)
    g = torch.func.grad(f)(w)
    return original, forget, retain, gold, H, g


def dist(model_a: nn.Module, model_b: nn.Module) -> float:
    return float((get_flat_parameters(model_a).double() - get_flat_parameters(model_b).double()).norm())


def step_of(result, model: nn.Module) -> torch.Tensor:
    return get_flat_parameters(result.model).double() - get_flat_parameters(model).double()


def test_registry_has_the_newton_family():
    assert all(METHODS[name].name == name for name in NEWTON)


# ---------------------------------------------------------------------------------------------
# strongly convex: logistic regression


def test_cure_newton_lands_on_the_retrained_optimum(logreg):
    original, forget, retain, gold, _, _ = logreg
    start = dist(original, gold)
    # one step: the convex check (at least 10x closer to the retrained optimum)
    first = CureNewton(M=1e-3, weight_decay=LAM, **ONE_STEP).unlearn(original, forget, retain)
    assert first.diagnostics["hessian_path"] == "fused"  # Sequential(Flatten, Linear) + CE: the fused kernel
    assert first.diagnostics["steps"] == 1
    assert dist(first.model, gold) < 0.1 * start
    # the adaptive iteration with its defaults (H on all 188 rows: fewer than hessian_samples) converges onto it
    adaptive = CureNewton(M=1e-3, weight_decay=LAM, tol=1e-9, max_iterations=10).unlearn(original, forget, retain)
    assert dist(adaptive.model, gold) < 1e-5 * start
    # it stops on the gradient, or where F can no longer resolve the predicted decrease (float64 rounding)
    assert adaptive.diagnostics["stop_reason"] in ("tolerance", "no_progress")


def test_newton_steps_equal_dense_solves(logreg):
    original, forget, retain, _, H, g = logreg
    eye = torch.eye(H.shape[0], dtype=H.dtype)

    def close(result, reference, rtol):
        s = step_of(result, original)
        assert float((s - reference).norm()) <= rtol * float(reference.norm())

    newton_step = -torch.linalg.solve(H, g)
    cure = CureNewton(M=1e-3, weight_decay=LAM, **ONE_STEP).unlearn(original, forget, retain)
    accepted = cure.diagnostics["iterations"][-1]
    assert accepted["accepted"] and accepted["M"] == 1e-3
    sigma = 1e-3 / 2 * cure.diagnostics["step_norm"]
    close(cure, -torch.linalg.solve(H + sigma * eye, g), 1e-6)
    # M -> 0: the cubic step is Newton's step
    close(CureNewton(M=1e-12, weight_decay=LAM, **ONE_STEP).unlearn(original, forget, retain), newton_step, 1e-6)
    close(NewtonPinv(weight_decay=LAM).unlearn(original, forget, retain), newton_step, 1e-8)
    close(NewtonPinv(weight_decay=LAM, solver="lanczos", rank=H.shape[0]).unlearn(original, forget, retain),
          newton_step, 1e-6)
    for damped in (DampedNewton(damping=0.1, weight_decay=LAM),
                   DampedNewton(damping=0.1, solver="ldl", weight_decay=LAM),
                   DampedNewton(damping=0.1, solver="minres", weight_decay=LAM),
                   DampedNewtonCG(damping=0.1, weight_decay=LAM)):
        close(damped.unlearn(original, forget, retain), -torch.linalg.solve(H + 0.1 * eye, g), 1e-7)
    lissa = LiSSANewton(damping=0.5, depth=60, weight_decay=LAM).unlearn(original, forget, retain)
    close(lissa, -torch.linalg.solve(H + 0.5 * eye, g), 1e-7)
    assert lissa.diagnostics["solver"] == "lissa"  # a LinearSolve names no solver: it was None
    # at the optimum of the training objective the influence update is the Newton step on D_r
    close(InfluenceNewton(damping=0.0, weight_decay=LAM).unlearn(original, forget, retain), newton_step, 1e-5)
    # and with damping, (n_f / n_r) (H + lambda I)^{-1} grad F_f, F_f the objective over D_f (a solve with any
    # other damping passed every test: H + lambda/2 I was 73% off this)
    g_forget = torch.func.grad(flat_objective(original, forget))(get_flat_parameters(original))
    influence = len(forget) / len(retain) * torch.linalg.solve(H + 0.1 * eye, g_forget)
    for solver in ("auto", "ldl", "minres"):
        close(InfluenceNewton(damping=0.1, solver=solver, weight_decay=LAM).unlearn(original, forget, retain),
              influence, 1e-7)


# ---------------------------------------------------------------------------------------------
# non-convex: a ReLU MLP


@pytest.fixture(scope="module")
def mlp(digits):
    data = digits.subset(torch.arange(300))
    model = init_model(lambda: MLP(64, (8,), 10), 0)
    train(model, data, TrainConfig(epochs=20, batch_size=32, lr=0.05, seed=0))
    return model.eval(), data.subset(torch.arange(30)), data.subset(torch.arange(30, 300))


def retain_hessian(model: nn.Module, retain: LabeledData) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 Hessian and gradient of the mean retain CE (no weight decay) by autograd."""
    model64 = copy.deepcopy(model).double()
    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for p in model64.parameters()]
    x = retain.x.double()

    def f(w):
        chunks = torch.split(w, [math.prod(s) for s in shapes])
        out = torch.func.functional_call(model64, {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}, (x,))
        return F.cross_entropy(out, retain.y)

    w = get_flat_parameters(model64)
    return torch.autograd.functional.hessian(f, w), torch.func.grad(f)(w)


def test_cure_newton_on_an_mlp_meets_the_global_optimality_conditions(mlp):
    model, forget, retain = mlp
    state = copy.deepcopy(model.state_dict())
    M = 1.0
    exact = {"max_iterations": 1, "hessian_samples": None,
             "solver_options": {"kappa": 1e-10, "guard": True, "k_max": 700, "probe_steps": 700}}
    one = CureNewton(M=M, dtype=torch.float64, **exact).unlearn(model, forget, retain)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the caller's model is untouched
    assert all(p.dtype == torch.float32 for p in one.model.parameters())  # computed in float64, returned in float32
    d = one.diagnostics
    trial = d["iterations"][-1]
    assert trial["accepted"] and trial["M"] == M  # accepted at the given M
    H, g = retain_hessian(model, retain)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    assert lam_min < 0  # the test is about an indefinite Hessian
    s = step_of(one, model)
    sigma = M / 2 * d["step_norm"]
    # (H + sigma I) s = -g, sigma = (M/2) ||s||, H + sigma I PSD: the global minimiser of the cubic model
    assert float((s.norm() - d["step_norm"]).abs()) < 1e-5 * d["step_norm"]
    assert float((H @ s + sigma * s + g).norm()) < 1e-3 * float(g.norm())
    assert lam_min + sigma >= -1e-8
    gnorm = float(g.norm())
    assert d["grad_norm_retain_before"] == pytest.approx(gnorm, rel=1e-6)
    neg = min(lam_min, 0.0)
    assert d["step_norm"] <= (-neg + math.sqrt(neg**2 + 2 * M * gnorm)) / M * (1 + 1e-9)
    # the retain gradient goes down, and the reported values are the returned model's
    assert d["grad_norm_retain_after"] < 0.8 * d["grad_norm_retain_before"]
    assert d["grad_norm_retain_after"] == pytest.approx(gradient_norm(one.model, F.cross_entropy, retain), rel=1e-4)
    assert d["objective_after"] == pytest.approx(float(F.cross_entropy(one.model(retain.x), retain.y)), rel=1e-5)
    # the paper's claim in miniature: pseudo-inverse and barely damped Newton take far larger steps
    for baseline in (NewtonPinv(dtype=torch.float64), DampedNewton(damping=1e-6, dtype=torch.float64)):
        assert baseline.unlearn(model, forget, retain).diagnostics["step_norm"] > 10 * d["step_norm"]


def test_baselines_equal_dense_float64_solves_on_an_indefinite_hessian(mlp):
    model, forget, retain = mlp
    H, g = retain_hessian(model, retain)
    lam = torch.linalg.eigvalsh(H)
    damping = 0.5 * float(-lam[0])  # H + damping I stays indefinite
    eye = torch.eye(H.shape[0], dtype=torch.float64)

    def step(method):
        return step_of(method.unlearn(model, forget, retain), model)

    def close(got, expected, rtol):
        assert float((got - expected).norm()) <= rtol * float(expected.norm())

    # the pseudo-inverse with the same cutoff as the method's (rcond 1e-6 of the largest |eigenvalue|)
    pinv = -torch.linalg.pinv(H, hermitian=True, rtol=1e-6) @ g
    close(step(NewtonPinv(dtype=torch.float64)), pinv, 1e-6)
    damped = -torch.linalg.solve(H + damping * eye, g)
    close(step(DampedNewton(damping=damping, dtype=torch.float64)), damped, 1e-5)
    ldl = DampedNewton(damping=damping, solver="ldl", dtype=torch.float64).unlearn(model, forget, retain)
    close(step_of(ldl, model), damped, 1e-5)
    assert ldl.diagnostics["negative_eigenvalues"] == int((lam + damping < 0).sum()) > 0
    # MINRES cut short falls back to the factorisation (the method passes its maxiter to the attempt)
    fallback = DampedNewton(damping=damping, solver="minres-ldl", maxiter=3, dtype=torch.float64).unlearn(
        model, forget, retain)
    assert fallback.diagnostics["solver"] == "damped-ldl" and fallback.diagnostics["minres_iterations"] == 3
    close(step_of(fallback, model), damped, 1e-5)
    close(step(DampedNewton(damping=damping, solver="minres", tol=1e-12, dtype=torch.float64)), damped, 1e-5)
    # CG stops at the first negative curvature of H + damping I: not the damped step
    cg = DampedNewtonCG(damping=damping, dtype=torch.float64).unlearn(model, forget, retain)
    assert cg.diagnostics["negative_curvature"] and not cg.diagnostics["converged"]


def objective_of(model: nn.Module, data: LabeledData, weight_decay: float) -> float:
    """F of the returned model, computed here independently of the method (float64)."""
    model64 = copy.deepcopy(model).double()
    loss = F.cross_entropy(model64(data.x.double()), data.y)
    return float(loss) + weight_decay / 2 * sum(float(p.double().square().sum()) for p in model64.parameters())


@pytest.mark.parametrize("M", [1e-6, 1e-2, 1.0, 1e3])
def test_cure_newton_never_returns_a_worse_objective(mlp, M):
    model, forget, retain = mlp
    wd = 5e-4
    result = CureNewton(M=M, weight_decay=wd).unlearn(model, forget, retain)
    d = result.diagnostics
    before, after = objective_of(model, retain, wd), objective_of(result.model, retain, wd)
    assert after <= before
    assert d["objective_before"] == pytest.approx(before, rel=1e-5)
    assert d["objective_after"] == pytest.approx(after, rel=1e-5)
    # the records follow the rules: accepted iff ratio >= eta1; M x2 after a rejection, /2 after ratio >= eta2
    trials = d["iterations"]
    assert trials and d["steps"] == sum(t["accepted"] for t in trials) >= 1
    for t, nxt in zip(trials, trials[1:]):
        assert t["accepted"] == (t["ratio"] >= 0.1)
        expected = 2 * t["M"] if not t["accepted"] else (max(t["M"] / 2, 1e-6) if t["ratio"] >= 0.9 else t["M"])
        assert nxt["M"] == pytest.approx(expected, rel=1e-12)
        if not t["accepted"]:
            assert nxt["hvps"] == 0  # a re-solve on the same tridiagonal
    assert d["step_norms"] == [t["step_norm"] for t in trials if t["accepted"]]
    assert result.hvps == sum(t["hvps"] for t in trials)
    # M is the constant the next step would use (the last trial's after its update), not the one given
    last = trials[-1]
    expected = (max(last["M"] / 2, 1e-6) if last["ratio"] >= 0.9 else last["M"]) if last["accepted"] else last["M"]
    assert d["M"] == pytest.approx(expected, rel=1e-12) and d["M_initial"] == M


def test_cure_newton_rejects_a_step_that_the_sample_misjudges(mlp):
    # A tiny M with the Hessian of a handful of rows: the cubic model of the sample promises decreases
    # that D_r does not deliver, so trials are rejected and M raised until one is accepted.
    model, forget, retain = mlp
    result = CureNewton(M=1e-6, hessian_samples=3, max_iterations=2).unlearn(model, forget, retain, seed=1)
    trials = result.diagnostics["iterations"]
    assert any(not t["accepted"] for t in trials)
    assert result.diagnostics["objective_after"] < result.diagnostics["objective_before"]


def test_cure_newton_stops_after_max_rejections_with_the_model_unchanged(mlp):
    """max_rejections reaches the ARC loop: a tiny M on the Hessian of 3 rows (a step of norm 1.6e28 that D_r
    does not bear) with gamma just above 1 is rejected again and again; after 3 in a row the call stops and
    returns the given weights."""
    model, forget, retain = mlp
    result = CureNewton(M=1e-30, hessian_samples=3, gamma=1.0001, max_rejections=3).unlearn(model, forget, retain,
                                                                                          seed=1)
    d = result.diagnostics
    assert d["stop_reason"] == "max_rejections" and d["steps"] == 0 and d["step_norm"] == 0.0
    assert len(d["iterations"]) == 3 and not any(t["accepted"] for t in d["iterations"])
    assert dist(result.model, model) == 0.0 and d["objective_after"] == d["objective_before"]


def test_hessian_subsample(mlp, monkeypatch):
    model, forget, retain = mlp
    made, build = [], newton.hessian_operator

    def spy(model_, loss_fn, data, *args, **kwargs):
        made.append((len(data), build(model_, loss_fn, data, *args, **kwargs)))
        return made[-1][1]

    monkeypatch.setattr(newton, "hessian_operator", spy)
    a = CureNewton(hessian_samples=64, max_iterations=2).unlearn(model, forget, retain, seed=0)
    b = CureNewton(hessian_samples=64, max_iterations=2).unlearn(model, forget, retain, seed=0)
    c = CureNewton(hessian_samples=64, max_iterations=2).unlearn(model, forget, retain, seed=5)
    full = CureNewton(hessian_samples=None, max_iterations=2).unlearn(model, forget, retain, seed=0)
    monkeypatch.undo()
    assert [n for n, _ in made] == [64, 64, 64, len(retain)]  # one operator per call, built once
    assert a.diagnostics["hessian_samples"] == 64 and full.diagnostics["hessian_samples"] == len(retain)
    assert torch.equal(get_flat_parameters(a.model), get_flat_parameters(b.model))  # seeded
    assert not torch.equal(get_flat_parameters(a.model), get_flat_parameters(c.model))
    # the gradient and the accept test use all of D_r
    assert a.diagnostics["grad_norm_retain_before"] == pytest.approx(gradient_norm(model, F.cross_entropy, retain),
                                                                     rel=1e-5)
    assert a.diagnostics["objective_after"] == pytest.approx(objective_of(a.model, retain, 0.0), rel=1e-5)


def test_stop_rules(mlp):
    model, forget, retain = mlp
    one = CureNewton(max_iterations=1).unlearn(model, forget, retain)
    assert one.diagnostics["steps"] == 1 and one.diagnostics["stop_reason"] == "max_iterations"
    assert one.diagnostics["hessian_samples"] == len(retain)  # the rows used: all 270, fewer than the default 512
    budget = CureNewton(max_iterations=50, hvp_budget=12).unlearn(model, forget, retain)
    assert budget.diagnostics["stop_reason"] == "hvp_budget" and budget.hvps <= 12
    # the budget is the call's: the M="auto" estimate's and the generic path's probe products count too
    for options in ({"M": "auto", "hvp_budget": 40}, {"path": "generic", "hvp_budget": 6}):
        capped = CureNewton(max_iterations=50, **options).unlearn(model, forget, retain)
        assert capped.diagnostics["stop_reason"] == "hvp_budget" and capped.hvps <= options["hvp_budget"]
    spent = CureNewton(M="auto", hvp_budget=1).unlearn(model, forget, retain)  # the estimate used it all
    assert spent.diagnostics["steps"] == 0 and spent.diagnostics["stop_reason"] == "hvp_budget"
    assert torch.equal(get_flat_parameters(spent.model), get_flat_parameters(model))
    loose = CureNewton(tol=1.0).unlearn(model, forget, retain)  # ||g|| < 1 at the start: nothing to do
    assert loose.diagnostics["stop_reason"] == "tolerance" and loose.diagnostics["steps"] == 0
    assert torch.equal(get_flat_parameters(loose.model), get_flat_parameters(model))


@pytest.mark.parametrize("budget, solver_options", [(1, {}), (12, {}), (40, {}),
                                                    (12, {"guard": True, "probe_steps": 4})],
                         ids=["1", "12", "40", "12-guard"])
def test_the_hvp_budget_holds_the_products_counted_at_the_operator(mlp, monkeypatch, budget, solver_options):
    """The products CureNewton makes, counted by the test at its Hessian operator's ``matvec`` and ``matmat`` (a
    block of K counts K; the fused path's construction makes none), are its ``hvps`` and the sum of its trials'
    ``hvps``, and the budget is used exactly: not exceeded, nor left unused by the call it stops. With the hard-case
    probe on, the overshoot is at most ``probe_steps`` (12 + 4 here: the bound itself)."""
    model, forget, retain = mlp
    counted, build = [], newton.hessian_operator

    def counting(*args, **kwargs):
        op = build(*args, **kwargs)
        matvec, matmat = op.matvec, op.matmat

        def counted_matvec(v):
            counted.append(1)
            return matvec(v)

        def counted_matmat(V):
            counted.append(V.shape[1])
            return matmat(V)

        op.matvec, op.matmat = counted_matvec, counted_matmat
        return op

    monkeypatch.setattr(newton, "hessian_operator", counting)
    result = CureNewton(max_iterations=50, hvp_budget=budget, solver_options=solver_options).unlearn(
        model, forget, retain)
    d = result.diagnostics
    assert d["stop_reason"] == "hvp_budget" and d["hessian_path"] == "fused"
    assert sum(counted) == result.hvps == sum(t["hvps"] for t in d["iterations"])
    assert budget <= sum(counted) <= budget + solver_options.get("probe_steps", 0)


def test_params_subset_updates_only_those_parameters(mlp):
    model, forget, retain = mlp
    out = CureNewton(params=["3.weight", "3.bias"], dtype=torch.float64).unlearn(model, forget, retain)
    after, before = dict(out.model.named_parameters()), dict(model.named_parameters())
    assert torch.equal(after["1.weight"], before["1.weight"]) and torch.equal(after["1.bias"], before["1.bias"])
    assert not torch.equal(after["3.weight"], before["3.weight"])
    assert out.diagnostics["num_params"] == 8 * 10 + 10


class _WithUnusedHead(nn.Module):
    """The MLP and a second head that ``forward`` never calls (training gives it no gradient, so no decay)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.unused_head = body, nn.Linear(64, 10)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("name", ["cure_newton", "newton_pinv", "damped_newton"])
def test_parameters_the_loss_does_not_use_are_left_alone(mlp, name):
    """With weight decay, F's decay term covered every trainable parameter, also those the loss never
    uses: newton_pinv set such a head to zero and the others shrank it, where training (which skips
    parameters without a gradient) and the oracle leave it as it is. params=None now leaves them out."""
    model, forget, retain = mlp
    torch.manual_seed(0)
    wrapped = _WithUnusedHead(copy.deepcopy(model)).eval()
    out = METHODS[name](weight_decay=5e-4, dtype=torch.float64).unlearn(wrapped, forget, retain)
    assert torch.equal(out.model.unused_head.weight, wrapped.unused_head.weight)
    assert torch.equal(out.model.unused_head.bias, wrapped.unused_head.bias)
    assert not torch.equal(out.model.body[3].weight, wrapped.body[3].weight)
    assert out.diagnostics["num_params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_unlearned_in_float32(mlp, half):
    """The curvature kernels compute in float32/float64: dtype=None on a half model computes in
    float32 (as dtype=torch.float32 does) and returns the model in its own dtype."""
    model, forget, retain = (copy.deepcopy(mlp[0]).to(half), *(LabeledData(d.x.to(half), d.y) for d in mlp[1:]))
    auto = CureNewton().unlearn(model, forget, retain)
    explicit = CureNewton(dtype=torch.float32).unlearn(model, forget, retain)
    assert all(p.dtype == half for p in auto.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(auto.model.parameters(), explicit.model.parameters()))
    assert auto.diagnostics["steps"] >= 1


def test_a_loss_whose_chunks_do_not_combine_into_its_mean_is_refused():
    """A class-weighted loss with the default batch_size of 2,048 gave F 1.000024 where it is 1.007463 on 2,980 rows
    (each chunk's weighted mean divides by its own sum of weights) and a step 0.64 off the dense solve; with
    reduction='sum', F was neither the sum nor the mean. Refused, but class weights over one chunk."""
    weights = torch.tensor([0.2, 1.0, 2.0, 4.0])
    for name in ("cure_newton", "damped_newton", "influence"):
        for loss in (nn.CrossEntropyLoss(weight=weights), functools.partial(F.cross_entropy, weight=weights)):
            with pytest.raises(ValueError, match=rf"^{name}: loss_fn has class weights, whose mean over a chunk .* "
                                                 r"\(2048\): pass batch_size=None"):
                METHODS[name](loss_fn=loss)
            METHODS[name](loss_fn=loss, batch_size=None)  # one chunk: the weighted mean over all rows
            # but each rank's shard is a chunk of its own (a step 16% off the one-process step, F 1.141 for 1.126)
            with pytest.raises(ValueError, match=rf"^{name}: loss_fn has class weights, whose mean over each rank's "
                                                 r"shard .* with a process_group the loss must be a plain mean"):
                METHODS[name](loss_fn=loss, batch_size=None, process_group=object())  # refused before it is read
        for loss in (nn.CrossEntropyLoss(reduction="sum"), functools.partial(F.cross_entropy, reduction="sum")):
            with pytest.raises(ValueError, match=rf"^{name}: loss_fn has reduction='sum': the Newton methods take"):
                METHODS[name](loss_fn=loss, batch_size=None)
        # a partial of a weighted module; a loss of the user's own with a `weight` of its own is taken at its word
        with pytest.raises(ValueError, match=rf"^{name}: loss_fn has class weights"):
            METHODS[name](loss_fn=functools.partial(nn.CrossEntropyLoss(weight=weights)))

        class Focal(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = weights

            def forward(self, out, target):
                return (self.weight[target] * F.cross_entropy(out, target, reduction="none")).mean()

        METHODS[name](loss_fn=Focal())


def test_an_ignore_index_that_is_a_class_is_refused_as_class_weights_are(mlp):
    """nn.CrossEntropyLoss(ignore_index=3) with class-3 rows: each chunk's mean divides by its own count of rows
    kept, so damped_newton's step moved by 0.96 of its size between batch_size 7 and 2,048 and by 0.77 between two
    shardings, without a word (class weights were refused for the same reason). Refused now, but over one chunk;
    a negative ignore_index (the default -100) matches no label the methods take."""
    model, forget, retain = mlp
    for name in ("cure_newton", "damped_newton"):
        for loss in (nn.CrossEntropyLoss(ignore_index=3), functools.partial(F.cross_entropy, ignore_index=3)):
            with pytest.raises(ValueError, match=rf"^{name}: loss_fn has ignore_index=3, a class label: .*"
                                                 r"batch_size \(2048\)"):
                METHODS[name](loss_fn=loss)
            with pytest.raises(ValueError, match=rf"^{name}: loss_fn has ignore_index=3, .* sharded"):
                METHODS[name](loss_fn=loss, batch_size=None, process_group=object())  # refused before it is read
            METHODS[name](loss_fn=loss, batch_size=None)  # one chunk: the mean over the rows kept
        METHODS[name](loss_fn=nn.CrossEntropyLoss(ignore_index=-1))
    # over one chunk the ignored rows are left out of F: the step is the one on the rows kept
    kept = retain.y != 3
    one_chunk = METHODS["damped_newton"](loss_fn=nn.CrossEntropyLoss(ignore_index=3), batch_size=None,
                                         dtype=torch.float64).unlearn(model, forget, retain)
    without = METHODS["damped_newton"](batch_size=None, dtype=torch.float64).unlearn(
        model, forget, LabeledData(retain.x[kept], retain.y[kept]))
    for a, b in zip(one_chunk.model.parameters(), without.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_gradients_count_every_gradient_an_operator_takes_at_construction(mlp, monkeypatch):
    """``gradients`` added a constant 2 per operator (its probes): the finite-difference check of a loss without
    a forward-mode derivative took more, which the count left out."""
    model, forget, retain = mlp

    square = square_function(differentiable_backward=True)  # no forward-mode derivative: checked by differences

    def loss(out, target):
        return square.apply(out - F.one_hot(target, out.shape[1]).to(out.dtype)).mean()

    made = []
    build = newton.hessian_operator
    monkeypatch.setattr(newton, "hessian_operator", lambda *args, **kwargs: made.append(build(*args, **kwargs))
                        or made[-1])
    checked = DampedNewton(loss_fn=loss, damping=1.0).unlearn(model, forget, retain)
    plain = DampedNewton(loss_fn=lambda out, t: (out - F.one_hot(t, out.shape[1]).to(out.dtype)).square().mean(),
                         damping=1.0).unlearn(model, forget, retain)
    assert made[0].num_gradients > PROBE_GRADIENTS == made[1].num_gradients
    assert checked.gradients - plain.gradients == made[0].num_gradients - PROBE_GRADIENTS


@pytest.mark.parametrize("name", ["cure_newton", "damped_newton"])
def test_a_compute_dtype_narrower_than_the_parameters_is_refused(mlp, name):
    """dtype=float32 on a float64 model rounded every chosen weight to float32: with no step taken (tol
    reached at once) all 460 weights moved and F rose, while the diagnostics said step_norm 0."""
    model, forget, retain = (copy.deepcopy(mlp[0]).double(), *(LabeledData(d.x.double(), d.y) for d in mlp[1:]))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"^{name}: dtype=torch.float32 is narrower than the chosen parameters' "
                                         r"torch.float64"):
        METHODS[name](dtype=torch.float32).unlearn(model, forget, retain)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_the_gradient_after_is_that_of_the_returned_weights(mlp, half):
    """On a half model the loop runs in float32 and the returned weights are rounded: grad_norm_retain_after
    was the float32 iterate's (2.2e-4 where the returned model's is 4.0e-3, bfloat16); it is now taken at the
    returned weights, as objective_after is (the model's weights and data read in float32, exactly; on this MLP
    the objective sums each row's loss in float64 from the float32 logits, to float32's rounding of the row's
    exponentials: float32's cross entropy is 5e-5 off at a loss of 7e-5)."""
    model, forget, retain = (copy.deepcopy(mlp[0]).to(half), *(LabeledData(d.x.to(half), d.y) for d in mlp[1:]))
    out = CureNewton().unlearn(model, forget, retain)
    returned = copy.deepcopy(out.model).float()
    loss = F.cross_entropy(returned(retain.x.float()).double(), retain.y)
    grads = torch.autograd.grad(loss, list(returned.parameters()))
    expected = float(torch.sqrt(sum(g.double().square().sum() for g in grads)))
    assert out.diagnostics["grad_norm_retain_after"] == pytest.approx(expected, rel=1e-4)
    assert out.diagnostics["objective_after"] == pytest.approx(float(loss), rel=1e-6)



@pytest.mark.parametrize("name", ["damped_newton", "damped_newton_cg", "influence", "lissa", "newton_pinv"])
def test_the_step_norm_of_a_one_step_baseline_is_how_far_the_model_moved(mlp, name):
    """The one-step baselines reported the norm of the float32 step, not of w_new - w: on a bfloat16
    model a step of 1.0e-3 moved the returned weights by 3.0e-4 (14 of 181 entries)."""
    model, forget, retain = (copy.deepcopy(mlp[0]).bfloat16(), *(LabeledData(d.x.bfloat16(), d.y) for d in mlp[1:]))
    options = {"damping": 300.0} if name != "newton_pinv" else {}
    out = METHODS[name](**options).unlearn(model, forget, retain)
    moved = float(torch.sqrt(sum((a.double() - b.double()).square().sum()
                                 for a, b in zip(out.model.parameters(), model.parameters()))))
    assert out.diagnostics["step_norm"] == pytest.approx(moved, rel=1e-12)


class _ArgmaxScores(nn.Module):
    """Logits made from an argmax: the loss has no gradient with respect to any parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.a(x.flatten(1)).argmax(1), 10).float()


@pytest.mark.parametrize("name", ["cure_newton", "damped_newton", "stochastic_cure_newton"])
def test_a_loss_without_a_gradient_is_refused_by_name(mlp, name):
    """torch's "element 0 of tensors does not require grad" came out of the probe for the parameters the loss
    uses, where the method's own refusal was meant to."""
    _, forget, retain = mlp
    with pytest.raises(ValueError, match=f"^{name}: the loss depends on none of the model's trainable parameters"):
        METHODS[name]().unlearn(_ArgmaxScores().eval(), forget, retain)


def test_a_loss_without_a_gradient_on_parameters_named_explicitly(mlp):
    """With params= given there is no probe for the parameters the loss uses: the objective's gradient of a
    loss with no graph raised torch's "does not require grad" inside the first step; it is zero, as the
    curvature operator's (torch.func.grad) is, so CureNewton stops at once and returns the model as given."""
    _, forget, retain = mlp
    model = _ArgmaxScores().eval()
    out = CureNewton(params=["a.weight"]).unlearn(model, forget, retain)
    assert out.diagnostics["stop_reason"] == "tolerance" and out.diagnostics["grad_norm_retain_before"] == 0.0
    assert torch.equal(out.model.a.weight, model.a.weight)


def test_a_solvers_refusal_names_the_method(mlp):
    """A retain row whose loss overflows (input 3e38 beyond the probe batch): CureNewton's error was the
    solver's "adaptive_cubic_newton: f(w0) is not finite", StoCuReNU's a bare NonFiniteProduct; both name
    the method now and say that the caller's model is unchanged, as the other methods' errors do."""
    model, forget, retain = mlp
    x = retain.x.clone()
    x[-1, 0] = 3e38
    bad = LabeledData(x, retain.y)
    for method in (CureNewton(batch_size=16), StochasticCureNewton(batch_size=16, grad_batch_size=len(bad))):
        with pytest.raises(ValueError, match=f"^{method.name}: .*not finite.*; the caller's model is unchanged$"):
            method.unlearn(model, forget, bad)


def test_a_step_beyond_the_dtype_names_the_method_and_keeps_its_figures(mlp, monkeypatch):
    """damped_newton_step raises StepOverflow where a float32 step does not fit (it returned +-Inf before): the
    method passed such subclasses of ValueError on without its name, since rebuilding one from its message alone
    loses its fields. The same exception now comes with the method's name and its step norm kept."""
    model, forget, retain = mlp

    def overflow(*args, **kwargs):
        raise StepOverflow("damped_newton_step (solver 'eigh'): the step, of norm 1e+40, does not fit torch.float32",
                           1e40, -1e30, 0)

    monkeypatch.setattr(newton, "damped_newton_step", overflow)
    with pytest.raises(StepOverflow, match="^damped_newton: damped_newton_step .*; the caller's model is unchanged$") \
            as raised:
        DampedNewton().unlearn(model, forget, retain)
    assert raised.value.step_norm == 1e40


def test_batch_streaming_gives_the_same_step_and_counts_batches(mlp):
    model, forget, retain = mlp
    whole = CureNewton(dtype=torch.float64, max_iterations=2).unlearn(model, forget, retain)
    streamed = CureNewton(dtype=torch.float64, max_iterations=2, batch_size=100).unlearn(model, forget, retain)
    assert dist(whole.model, streamed.model) < 1e-6 * whole.diagnostics["step_norm"]
    steps = whole.diagnostics["steps"]
    assert steps == 2
    # a gradient at the start and after each accepted step (270 rows in batches of 100), one at the returned
    # weights rounded to the float32 model, the operator probe's two, and one on at most a batch of rows for
    # the parameters the loss uses
    assert whole.gradients == (1 + steps + 1) + PROBE_GRADIENTS + 1
    assert streamed.gradients == (1 + steps + 1) * 3 + PROBE_GRADIENTS + 1


@pytest.mark.parametrize("name", NEWTON)
def test_hvps_are_the_operators_products(mlp, monkeypatch, name):
    model, forget, retain = mlp
    made, build = [], newton.hessian_operator

    def spy(*args, **kwargs):
        made.append(build(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(newton, "hessian_operator", spy)
    kwargs = {"grad_batch_size": 64, "hess_batch_size": 32, "T": 3} if name == "stochastic_cure_newton" else {}
    result = METHODS[name](**kwargs).unlearn(model, forget, retain)
    monkeypatch.undo()
    assert result.hvps > 0
    assert result.hvps == sum(op.num_products for op in made)
    assert result.gradients >= PROBE_GRADIENTS * len(made)
    d = result.diagnostics
    for key in ("step_norm", "M", "grad_norm_retain_before", "grad_norm_retain_after", "objective_before",
                "objective_after", "num_params", "hessian_path"):
        assert key in d
    assert math.isfinite(d["step_norm"]) and d["step_norm"] > 0


def test_m_auto_on_a_quadratic_loss_starts_from_the_floor():
    """A quadratic loss of a linear model has a constant Hessian: its Lipschitz estimate is 0, and M="auto"
    starts from MIN_AUTO_M (an M of 0 would be refused as out of range) and solves the problem."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=gen, dtype=torch.float64), torch.arange(60) % 3

    def squared(outputs, targets):
        return 0.5 * (outputs - F.one_hot(targets, 3).to(outputs.dtype)).square().sum(1).mean()

    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    result = CureNewton(M="auto", loss_fn=squared).unlearn(model, LabeledData(x[:10], y[:10]),
                                                           LabeledData(x[10:], y[10:]), seed=0)
    d = result.diagnostics
    assert d["lipschitz_estimate"] == pytest.approx(0.0, abs=1e-6) and d["M_initial"] == MIN_AUTO_M
    assert d["grad_norm_retain_after"] < 1e-8 * d["grad_norm_retain_before"]


def test_m_auto_uses_the_lipschitz_estimate(mlp):
    model, forget, retain = mlp
    result = CureNewton(M="auto", dtype=torch.float64, lipschitz_options={"num_directions": 2}).unlearn(
        model, forget, retain, seed=3)
    estimate = estimate_hessian_lipschitz(copy.deepcopy(model).double(), F.cross_entropy,
                                          LabeledData(retain.x.double(), retain.y), num_directions=2, seed=3)
    assert result.diagnostics["lipschitz_estimate"] == pytest.approx(estimate.value, rel=1e-9)
    assert result.diagnostics["M_initial"] == max(estimate.value, MIN_AUTO_M)
    assert result.diagnostics["iterations"][0]["M"] == result.diagnostics["M_initial"]
    assert result.hvps > estimate.num_hvps
    # the same iteration from that M given: "auto" costs the estimate's products and its probe's gradients more
    given = CureNewton(M=result.diagnostics["M_initial"], dtype=torch.float64).unlearn(model, forget, retain, seed=3)
    assert torch.equal(get_flat_parameters(given.model), get_flat_parameters(result.model))
    assert result.hvps - given.hvps == estimate.num_hvps
    assert result.gradients - given.gradients == PROBE_GRADIENTS


@pytest.mark.parametrize("cls", [CureNewton, StochasticCureNewton])
def test_the_largest_seed_is_taken(mlp, cls):
    """Every seed in [0, 2**63) is accepted: the solvers' per-step seeds (seed + step, seed + round) are
    folded back into torch's range at the top, and unchanged below it."""
    model, forget, retain = mlp
    method = cls(**({"max_iterations": 2} if cls is CureNewton else {"T": 2}))
    top = method.unlearn(model, forget, retain, seed=2**63 - 1)
    assert all(math.isfinite(n) for n in top.diagnostics["step_norms" if cls is CureNewton else "round_step_norms"])
    assert newton._offset_seed(5, 8) == 5 and newton._offset_seed(2**63 - 1, 8) + 7 < 2**63


def test_stochastic_cure_newton_is_seeded_and_builds_only_mini_batch_operators(mlp, monkeypatch):
    model, forget, retain = mlp
    batches, build = [], newton.hessian_operator

    def spy(model_, loss_fn, data, *args, **kwargs):
        batches.append(data.x)
        return build(model_, loss_fn, data, *args, **kwargs)

    grad_batches, Objective = [], newton.Objective

    class Recording(Objective):
        def __init__(self, model_, loss_fn, data, *args, **kwargs):
            if len(data) == 64:
                grad_batches.append(data.x)
            super().__init__(model_, loss_fn, data, *args, **kwargs)

    monkeypatch.setattr(newton, "hessian_operator", spy)
    monkeypatch.setattr(newton, "Objective", Recording)
    method = StochasticCureNewton(T=3, grad_batch_size=64, hess_batch_size=32)
    a, b = method.unlearn(model, forget, retain, seed=0), method.unlearn(model, forget, retain, seed=0)
    c = method.unlearn(model, forget, retain, seed=1)
    monkeypatch.undo()
    assert [len(x) for x in batches] == [32] * 9  # H on the mini-batches only; gradients need no operator
    # every round draws new rows, for g and for H, and H's are not g's first rows (one generator seeded with the
    # seed in every round drew the same rows each time, H's the first 32 of g's)
    for drawn in (batches[:3], grad_batches[:3]):
        assert not any(torch.equal(drawn[i], drawn[j]) for i, j in ((0, 1), (1, 2), (0, 2)))
    assert len(grad_batches) == 9 and not torch.equal(batches[0], grad_batches[0][:32])
    # the batches come from the seed (a generator seeded with 0 whatever the seed drew the same rows)
    assert all(torch.equal(x, y) for x, y in zip(batches[:3], batches[3:6]))
    assert not any(torch.equal(x, y) for x, y in zip(batches[:3], batches[6:]))
    assert torch.equal(get_flat_parameters(a.model), get_flat_parameters(b.model))
    assert not torch.equal(get_flat_parameters(a.model), get_flat_parameters(c.model))
    assert len(a.diagnostics["round_step_norms"]) == 3
    assert a.diagnostics["step_norm"] <= sum(a.diagnostics["round_step_norms"]) * (1 + 1e-6)


def test_stochastic_cure_newton_rounds_and_diagnostics(mlp, monkeypatch):
    """Each round's g is on its grad_batch_size mini-batch (not on all of D_r) and its noise has a seed of its own
    (one seed for every round repeated the direction); objective_after is F on D_r at the returned weights (it was
    once objective_before) and step_norm the displacement ||w_T - w_0|| (not the sum of the rounds' norms)."""
    model, forget, retain = mlp
    rows, seeds, Objective, cubic_gd = [], [], newton.Objective, newton.cubic_gd

    class Recording(Objective):
        def __init__(self, model_, loss_fn, data, *args, **kwargs):
            rows.append(len(data))
            super().__init__(model_, loss_fn, data, *args, **kwargs)

    steps = []

    def recording_gd(*args, **kwargs):
        seeds.append(kwargs["seed"])
        steps.append(cubic_gd(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(newton, "Objective", Recording)
    monkeypatch.setattr(newton, "cubic_gd", recording_gd)
    out = StochasticCureNewton(T=3, grad_batch_size=64, hess_batch_size=32).unlearn(model, forget, retain, seed=0)
    monkeypatch.undo()
    assert rows == [len(retain), 64, 64, 64]  # F on all of D_r for the diagnostics, then each round's g
    assert len(seeds) == len(set(seeds)) == 3
    d = out.diagnostics
    # the last round's subproblem, as the docstring says (no test read them: 2 sigma and -model_value passed)
    last = steps[-1]
    assert d["sigma"] == last.sigma == pytest.approx(0.5 * out.diagnostics["M"] * last.step_norm, rel=1e-12)
    assert d["model_value"] == last.model_value < 0 and d["hard_case"] == last.hard_case
    assert d["residual"] == last.residual and d["solver_iterations"] == sum(step.iterations for step in steps)
    assert d["objective_before"] == pytest.approx(objective_of(model, retain, 0.0), rel=1e-5)
    assert d["objective_after"] == pytest.approx(objective_of(out.model, retain, 0.0), rel=1e-5)
    assert d["step_norm"] == pytest.approx(dist(out.model, model), rel=1e-5)


def test_stochastic_cure_newton_stops_where_its_step_size_diverges():
    """Inputs of size 1e3 make the curvature ~1e6 times larger, so the default eta = 0.01 is far above
    1 / ||H||: the gradient steps on the cubic model ran away and the method met the operator's
    "vector contains NaN or Inf" or, where the weights stayed finite, returned a destroyed model (retain
    accuracy 0.38, step norm 9e15) without a word. The run-away is now an error naming eta (the caller's model
    unchanged); a small enough eta runs."""
    torch.manual_seed(0)
    x = torch.randn(600, 12) * 1e3
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1e3).long()
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    forget, retain = LabeledData(x[:30], (y[:30] + 1) % 3), LabeledData(x[30:], y[30:])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"cubic_gd: at gradient step \d the model value rose .*\(the step size "
                                         r"eta = 0.01 is too large for H and M = 5"):
        StochasticCureNewton().unlearn(model, forget, retain, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert math.isfinite(StochasticCureNewton(eta=1e-7).unlearn(model, forget, retain, seed=0).diagnostics["step_norm"])


# ---------------------------------------------------------------------------------------------
# the Lipschitz estimate


class Cubic(nn.Module):
    """L(w) = sum(w^3) / 6 through a loss on the model's output: H(w) = diag(w), Lipschitz constant 1."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, k, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


def cubic_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.pow(3).sum(1).mean() / 6


def test_lipschitz_estimate_on_known_hessians(mlp):
    data = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4))
    one = estimate_hessian_lipschitz(Cubic(1), cubic_loss, data, radius=0.3)
    assert one.value == pytest.approx(1.0, rel=1e-9)  # 1-D: |H(w + r d) - H(w)| / r = |d| = 1 exactly
    three = estimate_hessian_lipschitz(Cubic(3), cubic_loss, data, radius=0.3)
    assert 0.5 < three.value <= 1.0 + 1e-9  # max_i |d_i| of a unit d, at least 1/sqrt(3)
    # a quadratic loss has a constant Hessian: the estimate is rounding noise
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    t = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    linear = nn.Linear(6, 3).double()
    quad = estimate_hessian_lipschitz(linear, lambda out, y: 0.5 * (out - y).pow(2).sum(1).mean(), (x, t))
    assert quad.value < 1e-9
    # a network: positive, finite, seeded, and larger with power iteration than with random pairs alone
    model, _, retain = mlp
    state = copy.deepcopy(model.state_dict())
    first = estimate_hessian_lipschitz(model, F.cross_entropy, retain, seed=1)
    again = estimate_hessian_lipschitz(model, F.cross_entropy, retain, seed=1)
    plain = estimate_hessian_lipschitz(model, F.cross_entropy, retain, seed=1, power_iterations=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert 0 < first.value < math.inf and first.value == again.value
    assert first.num_hvps == 3 * 2 * 5 and plain.num_hvps == 3 * 2
    assert first.value > plain.value > 0
    # the estimate is the quantile of the ratios (default 1: their maximum), numpy's linear interpolation
    five = estimate_hessian_lipschitz(model, F.cross_entropy, retain, seed=1, num_directions=5)
    assert five.value == max(five.ratios) and len(set(five.ratios)) == 5
    ordered = sorted(five.ratios)
    for q in (0.2, 0.5, 0.9):
        at = estimate_hessian_lipschitz(model, F.cross_entropy, retain, seed=1, num_directions=5, quantile=q)
        assert at.ratios == five.ratios
        low, frac = int(q * 4), q * 4 - int(q * 4)
        expected = ordered[low] + frac * (ordered[min(low + 1, 4)] - ordered[low])
        assert at.value == pytest.approx(expected, rel=1e-12) and at.value < five.value


@pytest.mark.parametrize("kwargs, message", [
    ({"num_directions": 0}, "num_directions"),
    ({"radius": 0.0}, "radius"),
    ({"power_iterations": -1}, "power_iterations"),
    ({"quantile": 1.5}, "quantile"),
])
def test_lipschitz_estimate_rejects_bad_arguments(kwargs, message):
    data = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2))
    with pytest.raises(ValueError, match=rf"^estimate_hessian_lipschitz: {message}"):  # the option's name alone before
        estimate_hessian_lipschitz(Cubic(2), cubic_loss, data, **kwargs)


def test_lipschitz_estimate_names_overflow_and_non_finite_weights():
    """A radius too large for the model (its loss overflows at w + radius * d) returned a NaN estimate (no power
    iteration), or met "vector contains NaN or Inf" in the next product, and CureNewton's M='auto' then read
    "M must be a finite number > 0.0, got nan"; a NaN weight was taken for a radius too small to resolve."""
    class Exp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(x)

    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    model = nn.Sequential(nn.Linear(3, 4), Exp(), nn.Linear(4, 3))
    overflow = r"estimate_hessian_lipschitz: the Hessian products at w \+ radius \* d are not finite \(radius=200.0\)"
    for iterations in (0, 4):
        with pytest.raises(ValueError, match="^" + overflow):
            estimate_hessian_lipschitz(model, F.cross_entropy, (x, y), radius=200.0, power_iterations=iterations)
    with pytest.raises(ValueError, match=r"^cure_newton: M='auto' \(lipschitz_options \{'num_directions': 3, 'radius': "
                                         r"200.0.*\}\): " + overflow):
        CureNewton(M="auto", lipschitz_options={"radius": 200.0}).unlearn(model, LabeledData(x[:5], y[:5]),
                                                                         LabeledData(x[5:], y[5:]))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^estimate_hessian_lipschitz: the model's parameter '2.weight' has "
                                         r"NaN or Inf values"):
        estimate_hessian_lipschitz(model, F.cross_entropy, (x, y))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call, error, message", [
    (lambda: CureNewton(M=0.0), ValueError, "^cure_newton: M must be a finite number > 0"),
    (lambda: CureNewton(M=-1.0), ValueError, "^cure_newton: M must be a finite number > 0"),
    (lambda: CureNewton(M=float("nan")), ValueError, "^cure_newton: M must be a finite number > 0"),
    (lambda: CureNewton(M="large"), ValueError, "^cure_newton: M must be a number > 0 or 'auto', got 'large'"),
    (lambda: CureNewton(M="Auto"), ValueError, "^cure_newton: M must be a number > 0 or 'auto', got 'Auto'"),
    # check_number's "a finite number > 0.0" hid the one word it takes, its default
    (lambda: LiSSANewton(scale="bogus"), ValueError, "^lissa: scale must be a number > 0 or 'auto', got 'bogus'"),
    (lambda: CureNewton(max_iterations=0), ValueError, "max_iterations"),
    (lambda: CureNewton(tol=-1.0), ValueError, "tol"),
    (lambda: CureNewton(hvp_budget=-1), ValueError, "hvp_budget"),
    (lambda: CureNewton(hessian_samples=0), ValueError, "hessian_samples"),
    (lambda: CureNewton(eta1=1.0), ValueError, "eta1"),
    (lambda: CureNewton(eta1=0.5, eta2=0.4), ValueError, "eta2"),
    (lambda: CureNewton(gamma=1.0), ValueError, "gamma"),
    (lambda: CureNewton(M_min=0.0), ValueError, "M_min"),
    (lambda: CureNewton(max_rejections=0), ValueError, "^cure_newton: max_rejections must be an int >= 1"),
    (lambda: CureNewton(solver_options={"seed": 3}), ValueError, "seed"),
    (lambda: CureNewton(solver_options={"two_pass": True}), ValueError, "two_pass"),
    (lambda: CureNewton(M="auto", process_group=object()), TypeError, "process_group"),
    (lambda: DampedNewton(solver="cg"), ValueError, "solver"),
    (lambda: StochasticCureNewton(M=0), ValueError, "^stochastic_cure_newton: M must be a finite number > 0"),
    (lambda: StochasticCureNewton(T=0), ValueError, "^stochastic_cure_newton: T must be an int >= 1"),
    (lambda: DampedNewton(damping=-1e-3), ValueError, "damping"),
    (lambda: InfluenceNewton(damping=-1.0), ValueError, "damping"),
    (lambda: LiSSANewton(damping=-1.0), ValueError, "damping"),
    (lambda: LiSSANewton(scale=0.0), ValueError, "scale"),
    # one step gives one Ritz value: scale="auto" (both ends) failed at every call, after the operator was built
    (lambda: LiSSANewton(lanczos_steps=1), ValueError, r"^lissa: lanczos_steps must be an int >= 2, got 1"),
    (lambda: NewtonPinv(solver="qr"), ValueError, "solver"),
    (lambda: CureNewton(weight_decay=-1.0), ValueError, "weight_decay"),
    (lambda: CureNewton(params=[torch.zeros(2)]), TypeError, "names"),
    (lambda: CureNewton(dtype=torch.int64), TypeError, "dtype"),
    (lambda: CureNewton(dtype=torch.float16), TypeError, "^cure_newton: dtype must be None, torch.float32 or"),
    (lambda: LiSSANewton(dtype=torch.bfloat16), TypeError, "^lissa: dtype must be"),
    (lambda: CureNewton(solver_options={"bogus": 1}), TypeError,
     r"^cure_newton: solver_options: unknown option\(s\) \['bogus'\]; accepted: \['guard', 'k_max'"),
    (lambda: CureNewton(solver_options={"kappa": "x"}), ValueError, "^cure_newton: solver_options: kappa must be"),
    (lambda: CureNewton(solver_options={"reorth": "some"}), ValueError, "^cure_newton: solver_options: reorth"),
    (lambda: CureNewton(M="auto", lipschitz_options={"radii": 1}), TypeError,
     r"^cure_newton: lipschitz_options: unknown option\(s\) \['radii'\]"),
    (lambda: CureNewton(M="auto", lipschitz_options={"quantile": 5}), ValueError,  # checked when built, not at unlearn
     r"^cure_newton: lipschitz_options: quantile must be a finite number in \(0, 1\], got 5"),
    (lambda: CureNewton(M="auto", lipschitz_options={"num_directions": -1}), ValueError,
     r"^cure_newton: lipschitz_options: num_directions must be an int >= 1"),
    # given with a number for M: accepted and never used
    (lambda: CureNewton(M=0.5, lipschitz_options={"radius": 1e-3}), ValueError,
     r"^cure_newton: lipschitz_options configure the estimate M='auto' makes; with M=0.5 there is none"),
    (lambda: CureNewton(batch_size=0), ValueError, "batch_size"),
    (lambda: CureNewton(path="fast"), ValueError, "path"),
    # rcond >= 1 drops every eigenvalue: a zero step
    (lambda: NewtonPinv(rcond=1.0), ValueError, r"^newton_pinv: rcond must be a finite number in \[0, 1\), got 1.0"),
    (lambda: NewtonPinv(rcond=5.0), ValueError, r"^newton_pinv: rcond must be a finite number in \[0, 1\)"),
    (lambda: NewtonPinv(solver="minres", rcond=0.3), ValueError,  # was silently ignored
     r"^newton_pinv: rcond applies to solver 'eigh' and 'lanczos' only"),
    # a set's order (and the seeded draws over the flat vector) would change between processes
    (lambda: CureNewton(params={"0.weight", "0.bias"}), TypeError,
     r"^cure_newton: params must be None, a parameter name or an ordered sequence \(list, tuple\) of names, got set"),
    (lambda: DampedNewton(params=frozenset({"0.bias"})), TypeError, "^damped_newton: params must be .* got frozenset"),
    (lambda: CureNewton(params=3), TypeError, "^cure_newton: params must be .* got int"),
    (lambda: CureNewton(solver_options="k_max"), TypeError,
     "^cure_newton: solver_options must be None or a mapping of option names to values, got str"),
    (lambda: CureNewton(M="auto", lipschitz_options=[("radius", 1e-3)]), TypeError,
     "^cure_newton: lipschitz_options must be None or a mapping of option names to values, got list"),
])
def test_bad_hyper_parameters_raise(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_non_finite_step_raises_and_leaves_the_model_alone(mlp, monkeypatch):
    model, forget, retain = mlp
    state = copy.deepcopy(model.state_dict())

    def nan_step(value, gradient, hessian, w0, **options):
        return ARCResult(torch.full_like(w0, math.nan), math.nan, w0, 1, 0, 1.0, "max_iterations")

    monkeypatch.setattr(newton, "adaptive_cubic_newton", nan_step)
    with pytest.raises(ValueError, match="not finite"):
        CureNewton().unlearn(model, forget, retain)
    monkeypatch.undo()
    bad = LabeledData(retain.x.clone(), retain.y)
    bad.x[-1, 0, 0, 0] = math.nan  # in the last of three batches
    with pytest.raises(ValueError, match="NaN|not finite"):
        CureNewton(batch_size=100).unlearn(model, forget, bad)
    with pytest.raises(ValueError, match="no parameter named"):
        CureNewton(params="head.weight").unlearn(model, forget, retain)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_diverging_lissa_step_is_blamed_on_the_step():
    """A BatchNorm model with statistics from one batch: LiSSA's recursion grows (its residual
    exceeds ||g||), and its step would take the weights where the gradient overflows. The error says
    so before any step is applied (the inputs were checked finite) and what to change."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.tensor(digits.data[:400], dtype=torch.float32) / 16, torch.tensor(digits.target[:400])
    model = init_model(lambda: nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)), 0)
    model(x)  # train mode: the running statistics move once
    model.eval()
    with pytest.raises(ValueError, match=r"^lissa: the LiSSA recursion diverged \(H \+ damping I has negative "
                                         r"curvature, smallest Ritz value -0\.\d+ below -damping -0\.01, along "
                                         r"which it grows: raise damping above 0\.\d+ at least \(a Ritz value: the "
                                         r"smallest eigenvalue may be lower\)\); the caller's model is unchanged"):
        LiSSANewton().unlearn(model, LabeledData(x[:40], y[:40]), LabeledData(x[40:], y[40:]))


def test_lissa_on_an_indefinite_hessian_says_so(mlp):
    """Curvature below -damping makes the recursion grow slowly: at depth 100 its residual stayed under
    ||g|| (no error) and the step came back with converged True (on a digits MLP, 43% of its norm along
    the negative eigenvectors). The auto scale's Lanczos run sees it: converged False, its smallest Ritz value (never
    below the true smallest eigenvalue) as lambda_min."""
    model, forget, retain = mlp
    H, _ = retain_hessian(model, retain)
    smallest = float(torch.linalg.eigvalsh(H)[0])
    assert smallest < -0.004  # the problem: H + 0.001 I indefinite
    d = LiSSANewton(damping=1e-3, dtype=torch.float64).unlearn(model, forget, retain).diagnostics
    assert d["converged"] is False and smallest - 1e-9 <= d["lambda_min"] < -1e-3
    positive = LiSSANewton(damping=-smallest + 0.01, dtype=torch.float64).unlearn(model, forget, retain)
    assert positive.diagnostics["converged"] is True and positive.diagnostics["lambda_min"] > smallest - 1e-9
    given = LiSSANewton(damping=1e-3, scale=10.0, dtype=torch.float64).unlearn(model, forget, retain)
    assert given.diagnostics["lambda_min"] is None  # a given scale runs no Lanczos


def test_a_result_worse_after_rounding_is_not_returned(mlp, monkeypatch):
    # Computing in float64 for a float32 model, the result is rounded to float32 and F re-evaluated
    # there; if that is above F of the given weights, the given weights come back. Forced here with
    # a "result" that claims a decrease but moves uphill.
    model, forget, retain = mlp

    def uphill(value, gradient, hessian, w0, **options):
        f0, g0 = value(w0), gradient(w0)
        return ARCResult(w0 + 0.5 * g0 / g0.norm(), f0 - 1.0, g0, 1, 0, 1.0, "max_iterations",
                         initial_value=f0, initial_grad_norm=float(g0.norm()))

    monkeypatch.setattr(newton, "adaptive_cubic_newton", uphill)
    out = CureNewton(dtype=torch.float64).unlearn(model, forget, retain)
    monkeypatch.undo()
    assert out.diagnostics["rounding_reverted"] and out.diagnostics["step_norm"] == 0.0
    assert torch.equal(get_flat_parameters(out.model), get_flat_parameters(model))
    assert out.diagnostics["objective_after"] == out.diagnostics["objective_before"]


# ---------------------------------------------------------------------------------------------
# through the study runner


def test_study_runner_runs_cure_newton():
    from unlearn_kernels.study import StudyConfig, run_study

    config = StudyConfig(methods=("cure_newton",), seeds=(0,), model_kwargs={"hidden": (16,)},
                         recipe=TrainConfig(epochs=8, batch_size=64, lr=0.05), cache_dir=None)
    records = {r["method"]: r for r in run_study(config)["records"]}
    cure, gold = records["cure_newton"], records["retrain"]
    m = cure["metrics"]
    assert m["hvps"] > 0 and m["gradients"] > 0
    assert m["acc_retain"] > 0.9 and abs(m["acc_test"] - gold["metrics"]["acc_test"]) < 0.05
    assert cure["diagnostics"]["objective_after"] <= cure["diagnostics"]["objective_before"]
    assert cure["diagnostics"]["step_norm"] > 0 and cure["diagnostics"]["M_initial"] == 0.1
    assert cure["diagnostics"]["iterations"][0]["accepted"] in (True, False)  # the records reach the JSON


def test_cure_newton_on_a_cnn_takes_the_fused_conv_path_with_the_generic_result():
    """SmallCNN's products go through FusedConvHessian; the cubic steps match the generic path's."""
    from unlearn_kernels.models import SmallCNN

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 8, 8, generator=gen)
    y = torch.randint(0, 4, (60,), generator=gen)
    model = init_model(lambda: SmallCNN(1, 4, (3, 4)), 0).double()
    forget, retain = LabeledData(x[:8].double(), y[:8]), LabeledData(x[8:].double(), y[8:])
    options = {"M": 1.0, "max_iterations": 3, "weight_decay": 1e-3, "hessian_samples": None,
               "solver_options": {"kappa": 1e-12}}
    fused = CureNewton(**options).unlearn(model, forget, retain)
    generic = CureNewton(path="generic", **options).unlearn(model, forget, retain)
    assert fused.diagnostics["hessian_path"] == "fused" and generic.diagnostics["hessian_path"] == "generic"
    assert fused.diagnostics["steps"] == generic.diagnostics["steps"] >= 1
    torch.testing.assert_close(step_of(fused, model), step_of(generic, model), rtol=1e-9, atol=1e-12)
    assert step_of(fused, model).norm() > 1e-3  # it moved


@pytest.mark.parametrize("name", [*NEWTON, "cure_newton_lora"])
def test_a_batch_norm_layer_without_running_statistics_is_refused_up_front(digits, name):
    """Such a layer normalises with the batch's statistics in eval mode too, so a sample's loss depends on
    the rows batched with it: influence with a forget set of one row failed as "Objective: the model cannot
    run on the data ... Expected more than 1 value per channel"; the other methods ran on an objective and
    Hessian that changed with batch_size and the Hessian's subsample."""
    model = init_model(lambda: nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8, track_running_stats=False),
                                             nn.ReLU(), nn.Linear(8, 10)), 0)
    state = copy.deepcopy(model.state_dict())
    data = digits.subset(torch.arange(60))
    message = (rf"^{name}: the model's batch-norm layer '1' has no running statistics \(track_running_stats=False\) "
               r"and normalises with each batch's own, in eval mode too: the Newton methods take the loss, its "
               r"gradient and its Hessian as means over samples")
    for rows in (1, 10):
        with pytest.raises(ValueError, match=message):
            METHODS[name]().unlearn(model, data.subset(torch.arange(rows)), data.subset(torch.arange(rows, 60)))
    with pytest.raises(ValueError, match=message):  # what the study checks before any training
        METHODS[name]().check_model(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and model.training


@pytest.mark.parametrize("name", ["newton_pinv", "damped_newton", "damped_newton_cg", "influence", "lissa"])
def test_a_one_step_baseline_reports_the_quadratic_model_at_its_step(mlp, monkeypatch, name):
    """diagnostics["model_value"] is g^T s + 1/2 s^T H s at the step taken (no test read it: 1 s^T H s passed)."""
    model, forget, retain = mlp
    seen, quadratic = [], newton._NewtonFamily._quadratic_value

    def recording(self, H, g, s):
        value = quadratic(self, H, g, s)
        seen.append((float(g.double() @ s.double()), float(s.double() @ H.matvec(s).double()), value))
        return value

    monkeypatch.setattr(newton._NewtonFamily, "_quadratic_value", recording)
    result = METHODS[name]().unlearn(model, forget, retain, seed=0)
    (gs, sHs, value), = seen
    assert value == pytest.approx(gs + 0.5 * sHs, rel=1e-12, abs=1e-15) and sHs != 0
    assert result.diagnostics["model_value"] == value


def test_influence_reports_the_forget_gradient_norm(mlp):
    model, forget, retain = mlp
    result = METHODS["influence"](weight_decay=0.0).unlearn(model, forget, retain, seed=0)
    assert result.diagnostics["grad_norm_forget"] == pytest.approx(gradient_norm(model, F.cross_entropy, forget),
                                                                   rel=1e-5)


class _CountsCalls(nn.Module):
    """A forward that writes a buffer: the Newton family refuses it (its objective would change as it is read)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.first, self.second = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.second(torch.relu(self.first(x.flatten(1))))


@pytest.mark.parametrize("name", [*NEWTON, "cure_newton_lora"])
def test_a_refusal_at_run_time_names_the_method_called(digits, name):
    """cure_newton_lora's run-time refusals (its CureNewton's objective refusing the model) were raised under the
    name cure_newton, which the caller had not called."""
    model = init_model(_CountsCalls, 0)
    data = digits.subset(torch.arange(60))
    options = {"rank": 2} if name == "cure_newton_lora" else {}
    with pytest.raises(ValueError, match=rf"^{name}: Objective: the model's forward writes its buffer 'calls'"):
        METHODS[name](**options).unlearn(model, data.subset(torch.arange(10)), data.subset(torch.arange(10, 60)))


def test_the_options_fingerprint_is_of_values_not_their_types():
    # np.float64(0.5) and 0.5 made two ranks refuse each other; CE class weights (a buffer) and a partial's
    # label_smoothing were not compared at all
    def fingerprint(**options):
        return CureNewton(**options)._options_text()

    assert fingerprint(solver_options={"kappa": np.float64(0.5)}) == fingerprint(solver_options={"kappa": 0.5})
    assert fingerprint(max_iterations=np.int64(3)) == fingerprint(max_iterations=3)
    assert (fingerprint(solver_options={"guard": np.True_, "reorth": np.str_("full")})
            == fingerprint(solver_options={"guard": True, "reorth": "full"}))
    assert (fingerprint(loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0])), batch_size=None)
            != fingerprint(loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])), batch_size=None))
    assert (fingerprint(loss_fn=functools.partial(F.cross_entropy, label_smoothing=0.1))
            != fingerprint(loss_fn=functools.partial(F.cross_entropy, label_smoothing=0.3)))


def test_damped_minres_beyond_the_dense_sizes_has_a_budget(mlp, monkeypatch):
    """Beyond DENSE_SOLVE_MAX_DIM damped_newton and influence ran MINRES with scipy's 5 d iterations (two
    hours of products on a ResNet-18 at width 4): "auto"'s default is the most "minres-ldl" spends, d // 4
    at the largest dense size; a maxiter given is kept, and "minres" named keeps scipy's default."""
    model, forget, retain = mlp
    seen = []

    def recording(H, g, damping, *, solver, **options):
        seen.append((solver, options.get("maxiter")))
        return damped_newton_step(H, g, damping, solver=solver, **options)

    damped_newton_step = newton.damped_newton_step
    monkeypatch.setattr(newton, "damped_newton_step", recording)
    monkeypatch.setattr(newton, "damped_solver", lambda d, device: "minres")  # as beyond the dense sizes
    DampedNewton(dtype=torch.float64).unlearn(model, forget, retain)
    InfluenceNewton(dtype=torch.float64).unlearn(model, forget, retain)
    DampedNewton(maxiter=7, dtype=torch.float64).unlearn(model, forget, retain)
    DampedNewton(solver="minres", dtype=torch.float64).unlearn(model, forget, retain)  # named: scipy's 5 d
    assert newton.MINRES_BUDGET == 11585 // 4
    assert seen == [("minres", newton.MINRES_BUDGET), ("minres", newton.MINRES_BUDGET), ("minres", 7),
                    ("minres", None)]


class _HalfBackbone(nn.Module):
    """A frozen bfloat16 feature layer under a trainable float32 head (the usual fine-tuning set-up)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(10, 8), nn.ReLU()).to(torch.bfloat16).requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).float())


def test_a_frozen_half_precision_backbone_takes_the_data_as_given():
    """The Newton methods cast D_r's inputs to the chosen parameters' dtype also where they did not convert the
    model: a frozen bfloat16 backbone under a float32 head got float32 inputs and every method failed with torch's
    bare "mat1 and mat2 must have the same dtype". The step is the damped Newton step over the head."""
    torch.manual_seed(0)
    model = _HalfBackbone()
    x, y = torch.randn(60, 10).to(torch.bfloat16), torch.randint(0, 3, (60,))
    forget, retain = LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:])
    result = DampedNewton().unlearn(model, forget, retain, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(result.model.backbone.parameters(), model.backbone.parameters()))
    with torch.no_grad():
        features = model.backbone(retain.x).double()
    head = copy.deepcopy(model.head).double()
    shapes = [p.shape for p in head.parameters()]

    def loss(w: torch.Tensor) -> torch.Tensor:
        weight, bias = (c.view(s) for c, s in zip(torch.split(w, [math.prod(s) for s in shapes]), shapes))
        return F.cross_entropy(F.linear(features, weight, bias), retain.y)

    w0 = get_flat_parameters(head)
    H, g = torch.autograd.functional.hessian(loss, w0), torch.func.grad(loss)(w0)
    expected = -torch.linalg.solve(H + 0.01 * torch.eye(len(w0), dtype=torch.float64), g)
    step = get_flat_parameters(result.model.head).double() - w0
    assert float((step - expected).norm() / expected.norm()) <= 1e-5
    for name in ("cure_newton", "newton_pinv", "influence"):
        METHODS[name]().unlearn(model, forget, retain, seed=0)


def test_lissa_finds_its_scale_on_a_single_parameter():
    """scale='auto' asked Lanczos for both ends of the spectrum, two Ritz values: with one chosen parameter (a
    temperature) it was refused with a message about which='BE' and num_eigs. Its one eigenvalue is both ends:
    the step is the damped Newton step, as with a given scale."""
    class Tempered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.t = nn.Linear(4, 3), nn.Parameter(torch.tensor(1.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.t

    torch.manual_seed(0)
    model, x, y = Tempered().double(), torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    forget, retain = LabeledData(x[:5], y[:5]), LabeledData(x[5:], y[5:])
    auto = LiSSANewton(params="t").unlearn(model, forget, retain).diagnostics
    damped = DampedNewton(params="t").unlearn(model, forget, retain).diagnostics
    assert auto["converged"] and auto["step_norm"] == pytest.approx(damped["step_norm"], rel=1e-6)
