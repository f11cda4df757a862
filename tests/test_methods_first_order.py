"""First-order unlearning methods and the reference points (Retrain, Original) on a tiny problem:
an MLP trained on 600 sklearn digits, asked to forget one whole class."""
import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from sklearn.datasets import load_digits

from pathlike import EmptyPath
from unlearn_kernels.data import LabeledData
from unlearn_kernels.labeled import wrong_labels
from unlearn_kernels.methods import (
    METHODS, SCRUB, SSD, UNSIR, BadTeacher, Finetune, GradientAscent, NegGradPlus, RandomLabels, Retrain,
    RetrainReseeded, SalUn, Unlearner,
)
from unlearn_kernels.methods.first_order import TrainedUnlearner, _random_teacher, flagged_mix
from unlearn_kernels.models import MLP, SmallViT
from unlearn_kernels.training import TrainConfig, init_model, train

CONFIG = TrainConfig(epochs=10, batch_size=32, lr=0.05, seed=0)
FORGETTING = ["gradient_ascent", "neggrad_plus", "random_labels", "salun", "scrub", "bad_teacher", "ssd", "unsir"]


def factory() -> MLP:
    return MLP(64, hidden=(32,), num_classes=10)


@pytest.fixture(scope="module")
def problem():
    digits = load_digits()
    x = torch.tensor(digits.images[:600], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target[:600], dtype=torch.long)
    is_forget = y == 0
    forget, retain = LabeledData(x[is_forget], y[is_forget]), LabeledData(x[~is_forget], y[~is_forget])
    model = init_model(factory, 0)
    train(model, LabeledData(x, y), CONFIG)
    return model, forget, retain


# The ascent-style methods take a step count from the size of D_f; with only 60 forget samples their
# defaults (tuned for a few hundred) take a handful of steps, so this tiny problem turns them up.
TINY_PROBLEM_KWARGS = {
    "gradient_ascent": {"lr": 0.02, "epochs": 10},
    "neggrad_plus": {"alpha": 0.8},
    "scrub": {"lr": 0.05},
    "bad_teacher": {"epochs": 3},
}


# the methods of this file's subject (the Newton family has its own tests)
FIRST_ORDER = sorted(n for n, c in METHODS.items() if c.__module__.rsplit(".", 1)[-1] in ("first_order", "reference"))


def make(name: str) -> Unlearner:
    if name == "retrain":
        return Retrain(factory, CONFIG)
    if name == "retrain_reseeded":
        return RetrainReseeded(factory, CONFIG)
    return METHODS[name](**TINY_PROBLEM_KWARGS.get(name, {}))


@pytest.fixture(scope="module")
def results(problem):
    """Every first-order/reference method, run twice with defaults and seed 0 (for the determinism check)."""
    model, forget, retain = problem
    state = copy.deepcopy(model.state_dict())
    out = {}
    for name in FIRST_ORDER:
        out[name] = [make(name).unlearn(model, forget, retain, seed=0) for _ in range(2)]
        # the caller's model is never modified, whatever the method
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), name
    return out


@torch.no_grad()
def evaluate(model, data):
    logits = model.eval()(data.x)
    return (logits.argmax(1) == data.y).float().mean().item(), F.cross_entropy(logits, data.y).item()


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_registry_names_match():
    assert set(METHODS) >= {"retrain", "original", "finetune", "gradient_ascent", "neggrad_plus", "random_labels",
                            "salun", "scrub", "bad_teacher", "ssd", "unsir"}
    assert all(cls.name == name for name, cls in METHODS.items())


def expected_gradients(method: Unlearner, n_f: int, n_r: int) -> int:
    """Batch gradient evaluations each method's documented loop takes on n_f forget and n_r retain rows."""
    def batches(n: int, size: int | None = None) -> int:
        return math.ceil(n / (size or method.batch_size))

    name = method.name
    if name == "original":
        return 0
    if name in ("retrain", "retrain_reseeded"):
        return method.config.epochs * batches(n_r, method.config.batch_size)
    if name == "finetune":
        return method.epochs * batches(n_r)
    if name == "gradient_ascent":
        return method.epochs * batches(n_f)
    if name == "neggrad_plus":
        return 2 * method.epochs * batches(n_r)  # one D_r and one D_f batch per step
    if name == "random_labels":
        return method.epochs * batches(n_r + n_f)
    if name == "salun":
        return batches(n_f) + method.epochs * batches(n_r + n_f)  # the saliency pass, then RL training
    if name == "scrub":
        max_passes = min(method.max_steps, method.epochs)
        return max_passes * batches(n_f, method.forget_batch_size) + method.epochs * batches(n_r)
    if name == "bad_teacher":
        return method.epochs * batches(n_f + round(method.retain_fraction * n_r))
    if name == "ssd":
        return batches(n_f) + batches(n_f + n_r)  # the two importance passes
    if name == "unsir":  # the noise's steps per forget batch, the impair passes, the repair passes (all of D_r here)
        return (method.noise_steps * batches(n_f) + method.epochs * batches(n_f + n_r)
                + method.repair_epochs * batches(n_r))
    raise AssertionError(f"no expected count for {name}")


@pytest.mark.parametrize("name", FIRST_ORDER)
def test_deterministic_and_well_formed(results, problem, name):
    _, forget, retain = problem
    first, second = results[name]
    assert torch.equal(flat(first.model), flat(second.model))
    assert first.model is not problem[0]
    assert first.seconds > 0 and first.hvps == 0  # timed by unlearn()
    assert first.gradients == second.gradients == expected_gradients(make(name), len(forget), len(retain))


@pytest.mark.parametrize("name", FORGETTING)
def test_forgetting_methods_forget_and_keep_the_rest(results, problem, name):
    model, forget, retain = problem
    acc_f0, loss_f0 = evaluate(model, forget)
    acc_r0, _ = evaluate(model, retain)
    acc_f, loss_f = evaluate(results[name][0].model, forget)
    acc_r, _ = evaluate(results[name][0].model, retain)
    assert acc_f0 > 0.95
    assert loss_f > loss_f0 + 0.2 and acc_f < acc_f0 - 0.05
    assert acc_r > 0.8 and acc_r > acc_r0 - 0.15


def test_other_seed_gives_other_result(problem):
    model, forget, retain = problem
    a = RandomLabels(epochs=1).unlearn(model, forget, retain, seed=0).model
    b = RandomLabels(epochs=1).unlearn(model, forget, retain, seed=1).model
    assert not torch.equal(flat(a), flat(b))


def test_original_returns_identical_weights(results, problem):
    assert torch.equal(flat(results["original"][0].model), flat(problem[0]))


def test_finetune_keeps_retain_accuracy_and_moves(results, problem):
    model, _, retain = problem
    tuned = results["finetune"][0].model
    assert evaluate(tuned, retain)[1] < evaluate(model, retain)[1]
    assert not torch.equal(flat(tuned), flat(model))


def test_retrain_never_sees_the_forget_set(results, problem):
    model, forget, retain = problem
    oracle = results["retrain"][0].model
    reference = init_model(factory, CONFIG.seed)
    train(reference, retain, CONFIG)
    assert torch.equal(flat(oracle), flat(reference))
    other_forget = LabeledData(torch.rand_like(forget.x), forget.y)  # D_f's content cannot matter
    assert torch.equal(flat(Retrain(factory, CONFIG).unlearn(model, other_forget, retain).model), flat(oracle))
    assert evaluate(oracle, forget)[0] < 0.05  # class 0 was never seen
    assert results["retrain"][0].gradients == CONFIG.epochs * -(-len(retain) // CONFIG.batch_size)


def test_retrain_reseeded_is_the_oracle_from_another_seed(results, problem):
    model, forget, retain = problem
    second = results["retrain_reseeded"][0].model
    reference = init_model(factory, CONFIG.seed + 1000)
    train(reference, retain, dataclasses.replace(CONFIG, seed=CONFIG.seed + 1000))
    assert torch.equal(flat(second), flat(reference))
    assert not torch.equal(flat(second), flat(results["retrain"][0].model))
    assert evaluate(second, forget)[0] < 0.05  # it never saw class 0 either
    other = RetrainReseeded(factory, CONFIG, seed_offset=7).unlearn(model, forget, retain).model
    assert not torch.equal(flat(other), flat(second))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="seed_offset"):
            RetrainReseeded(factory, CONFIG, seed_offset=bad)


def test_retrain_cache_and_architecture_check(problem, tmp_path):
    model, forget, retain = problem
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    first = Retrain(factory, config, cache_dir=tmp_path).unlearn(model, forget, retain)
    second = Retrain(factory, config, cache_dir=tmp_path).unlearn(model, forget, retain)
    assert not first.diagnostics["cached"] and second.diagnostics["cached"]
    assert torch.equal(flat(first.model), flat(second.model)) and first.gradients == second.gradients
    # another recipe on the same retain set gets a file of its own: the two no longer overwrite each other in turn
    other = TrainConfig(epochs=2, batch_size=64, lr=0.05)
    assert not Retrain(factory, other, cache_dir=tmp_path).unlearn(model, forget, retain).diagnostics["cached"]
    assert Retrain(factory, config, cache_dir=tmp_path).unlearn(model, forget, retain).diagnostics["cached"]
    assert Retrain(factory, other, cache_dir=tmp_path).unlearn(model, forget, retain).diagnostics["cached"]
    assert len(list(tmp_path.glob("retrain-*.pt"))) == 2
    with pytest.raises(ValueError, match=r"^retrain: model_factory builds a different architecture from the model to "
                                         r"unlearn: the factory's model has module '1': Linear\(in_features=64, "
                                         r"out_features=16, bias=True\), the model to unlearn module '1': "
                                         r"Linear\(in_features=64, out_features=32"):
        Retrain(lambda: MLP(64, hidden=(16,), num_classes=10), config).unlearn(model, forget, retain)
    # a module without parameters is part of the architecture too
    with pytest.raises(ValueError, match=r"^retrain_reseeded: .* the factory's model has module '2': Tanh\(\), the "
                                         r"model to unlearn module '2': ReLU\(\)$"):
        RetrainReseeded(lambda: MLP(64, hidden=(32,), num_classes=10, activation="tanh"), config).unlearn(
            model, forget, retain)
    with pytest.raises(ValueError, match=r"the factory's model has state '1.weight' of shape \(32, 64\) and dtype "
                                         r"torch.float64, the model to unlearn state '1.weight' of shape \(32, 64\) "
                                         r"and dtype torch.float32$"):
        Retrain(lambda: factory().double(), config).unlearn(model, forget, retain)


@pytest.mark.parametrize("kwargs, message", [
    ({"cache_dir": 3}, "cache_dir must be None or a folder as a str or os.PathLike (e.g. a pathlib.Path), got int"),
    ({"cache_dir": b"cache"}, "cache_dir must be None or a folder as a str or os.PathLike (e.g. a pathlib.Path), "
                              "got bytes"),
    ({"model_info": 3}, "model_info must be None or a mapping (e.g. a dict), got int"),
    ({"model_info": "mlp"}, "model_info must be None or a mapping (e.g. a dict), got str"),
])
def test_retrain_names_a_cache_dir_or_model_info_of_the_wrong_type(kwargs, message, tmp_path):
    """pathlib's and dict's own TypeErrors named neither the argument nor the method."""
    with pytest.raises(TypeError, match=f"^Retrain: {re.escape(message)}$"):
        Retrain(factory, CONFIG, **kwargs)
    if "model_info" in kwargs:
        with pytest.raises(TypeError, match=f"^RetrainReseeded: {re.escape(message)}$"):
            RetrainReseeded(factory, CONFIG, **kwargs)
    assert Retrain(factory, CONFIG, cache_dir=str(tmp_path)).cache_dir == tmp_path
    assert Retrain(factory, CONFIG, cache_dir=tmp_path, model_info={"name": "mlp"}).model_info == {"name": "mlp"}


@pytest.mark.parametrize("name, kwargs", [
    ("gradient_ascent", {"lr": 1.0, "epochs": 50}),
    ("finetune", {"lr": 1e30, "epochs": 1}),
    ("neggrad_plus", {"lr": 1e6, "epochs": 2}),
    ("random_labels", {"lr": 1e30, "epochs": 1}),
    ("scrub", {"lr": 1e30, "epochs": 1}),
    ("bad_teacher", {"lr": 1e30}),
    ("unsir", {"lr": 1e30}),  # the impair diverges: said before the repair trains
])
def test_a_diverging_method_raises_and_leaves_the_model(problem, name, kwargs):
    """A step size that blows the weights up to NaN/Inf is an error naming the method, not a NaN model."""
    model, forget, retain = problem
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"^{name}: the unlearned model has NaN or Inf in its parameter '1.weight' "
                                         r"\(the method diverged: lower its learning rate or step size\); the "
                                         r"caller's model is unchanged$"):
        METHODS[name](**kwargs).unlearn(model, forget, retain)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_gradient_ascent_step_is_plain_ascent(problem):
    """One full-batch step without momentum: w + lr * grad CE(D_f), computed independently."""
    model, forget, retain = problem
    reference = copy.deepcopy(model)
    grads = torch.autograd.grad(F.cross_entropy(reference(forget.x), forget.y), list(reference.parameters()))
    out = GradientAscent(epochs=1, lr=0.1, batch_size=1000, momentum=0.0).unlearn(model, forget, retain).model
    for p, p0, g in zip(out.parameters(), model.parameters(), grads):
        torch.testing.assert_close(p, p0 + 0.1 * g, rtol=1e-5, atol=1e-6)


def test_neggrad_plus_step_descends_the_combined_loss_in_float64(problem):
    """One full-batch step without momentum or decay: w - lr * grad(alpha CE_r - (1 - alpha) CE_f)."""
    model, forget, retain = problem
    model64 = copy.deepcopy(model).double()
    f64, r64 = LabeledData(forget.x.double(), forget.y), LabeledData(retain.x.double(), retain.y)
    loss = 0.8 * F.cross_entropy(model64(r64.x), r64.y) - 0.2 * F.cross_entropy(model64(f64.x), f64.y)
    grads = torch.autograd.grad(loss, list(model64.parameters()))
    method = NegGradPlus(alpha=0.8, epochs=1, lr=0.5, batch_size=10_000, momentum=0.0, weight_decay=0.0)
    result = method.unlearn(model64, f64, r64)
    assert result.gradients == 2
    for p, p0, g in zip(result.model.parameters(), model64.parameters(), grads):
        torch.testing.assert_close(p, p0 - 0.5 * g, rtol=1e-12, atol=1e-12)


def test_finetune_is_sgd_with_momentum_and_decay_on_the_retain_set_in_float64(problem):
    """Two full-batch steps on D_r alone, by hand: d_t = grad CE_r(w_t) + wd w_t, b_1 = d_0,
    b_2 = mu b_1 + d_1, w_{t+1} = w_t - lr b_{t+1} (the lr, momentum and decay Finetune was given)."""
    model, forget, retain = problem
    model64 = copy.deepcopy(model).double()
    f64, r64 = LabeledData(forget.x.double(), forget.y), LabeledData(retain.x.double(), retain.y)
    lr, mu, wd = 0.3, 0.9, 0.01
    reference, buffers = copy.deepcopy(model64), None
    for _ in range(2):
        grads = torch.autograd.grad(F.cross_entropy(reference(r64.x), r64.y), list(reference.parameters()))
        d = [g + wd * p.detach() for g, p in zip(grads, reference.parameters())]
        buffers = d if buffers is None else [mu * b + di for b, di in zip(buffers, d)]
        with torch.no_grad():
            for p, b in zip(reference.parameters(), buffers):
                p -= lr * b
    result = Finetune(epochs=2, lr=lr, batch_size=10_000, momentum=mu, weight_decay=wd).unlearn(model64, f64, r64)
    assert result.gradients == 2
    for p, q in zip(result.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_salun_trains_only_the_salient_weights(results, problem):
    model, forget, retain = problem
    out = results["salun"][0]
    moved = flat(out.model) != flat(model)
    assert 0.3 < moved.float().mean() <= 0.5 + 1e-3  # weight decay included: unmasked weights never move
    assert out.diagnostics["mask_fraction"] == pytest.approx(0.5, abs=1e-3)
    # the mask keeps round(fraction x weights) of them (int() kept one fewer)
    total = flat(model).numel()
    assert 0.77 * total % 1 > 0.5  # where round and int differ
    kept = SalUn(mask_fraction=0.77, epochs=1).unlearn(model, forget, retain, seed=3).diagnostics["mask_fraction"]
    assert round(kept * total) == round(0.77 * total)
    # with the mask covering everything, SalUn is random labelling, with every optimizer's own weight decay
    # (AdamW's decoupled decay was once folded into the gradient as coupled L2: 7.6e-2 apart)
    for optimizer in ("sgd", "adam", "adamw"):
        full = SalUn(mask_fraction=1.0, epochs=2, optimizer=optimizer).unlearn(model, forget, retain, seed=3).model
        plain = RandomLabels(epochs=2, optimizer=optimizer).unlearn(model, forget, retain, seed=3).model
        torch.testing.assert_close(flat(full), flat(plain), rtol=1e-5, atol=1e-6)
        # and the unmasked weights never move, whatever the optimizer does with its decay
        half = SalUn(epochs=2, optimizer=optimizer).unlearn(model, forget, retain, seed=3)
        moved = flat(half.model) != flat(model)
        assert moved.float().mean() <= half.diagnostics["mask_fraction"] + 1e-6, optimizer


def test_scrub_moves_the_student_away_from_the_teacher_on_forget(results, problem):
    model, forget, retain = problem
    student = results["scrub"][0].model
    with torch.no_grad():
        kl_f = F.kl_div(F.log_softmax(student(forget.x), 1), F.softmax(model(forget.x), 1), reduction="batchmean")
        kl_r = F.kl_div(F.log_softmax(student(retain.x), 1), F.softmax(model(retain.x), 1), reduction="batchmean")
    assert kl_f > 1.0 and kl_f > 10 * kl_r
    assert results["scrub"][0].diagnostics["forget_kl_last_max_pass"] > 0


def _kl_times_t2(student_logits, teacher_logits, temperature):
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, the mean over rows, written out."""
    p = (teacher_logits / temperature).softmax(1)
    return (p * (p.log() - (student_logits / temperature).log_softmax(1))).sum(1).mean() * temperature**2


def test_scrub_matches_hand_computed_max_and_min_steps(problem):
    """Two epochs of full-batch plain SGD: a max step -KL_T(teacher || student) on D_f, then a min step
    gamma CE + alpha KL_T(teacher || student) on D_r, each epoch. (The min step without its KL term, or the KL
    the other way round, passed the qualitative SCRUB test.) At the start student and teacher agree, so the
    first max step moves nothing; the min step's CE then separates them and the KL terms act from there."""
    model, forget, retain = problem
    model64 = copy.deepcopy(model).double()
    f64, r64 = LabeledData(forget.x.double(), forget.y), LabeledData(retain.x.double(), retain.y)
    lr, T, alpha, gamma = 0.5, 2.0, 0.5, 0.7
    names = [n for n, _ in model64.named_parameters()]
    weights = [p.detach().clone() for p in model64.parameters()]
    with torch.no_grad():
        teacher_f, teacher_r = model64(f64.x), model64(r64.x)

    def step(loss_of):
        params = [w.clone().requires_grad_() for w in weights]
        out = lambda x: torch.func.functional_call(model64, dict(zip(names, params)), (x,))  # noqa: E731
        grads = torch.autograd.grad(loss_of(out), params)
        return [w - lr * g for w, g in zip(weights, grads)]

    for _ in range(2):
        weights = step(lambda out: -_kl_times_t2(out(f64.x), teacher_f, T))
        weights = step(lambda out: gamma * F.cross_entropy(out(r64.x), r64.y)
                       + alpha * _kl_times_t2(out(r64.x), teacher_r, T))
    result = SCRUB(epochs=2, max_steps=2, lr=lr, batch_size=10_000, forget_batch_size=10_000, temperature=T,
                   alpha=alpha, gamma=gamma, momentum=0.0, weight_decay=0.0).unlearn(model64, f64, r64)
    for p, w in zip(result.model.parameters(), weights):
        torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-12)


def test_bad_teacher_matches_a_hand_computed_step_at_a_temperature(problem):
    """One full-batch plain SGD step at T = 4: KL(target || softmax(student / T)), the target the incompetent
    teacher's softmax(z / T) on D_f rows and the original's on the D_r sample (no test ran another T: the
    student's logits left undivided passed)."""
    model, forget, retain = problem
    model64 = copy.deepcopy(model).double()
    f64, r64 = LabeledData(forget.x.double(), forget.y), LabeledData(retain.x.double(), retain.y)
    lr, T = 0.5, 4.0
    mixed, _ = flagged_mix(f64, r64, 0.3, 0)
    with torch.no_grad():
        bad, good = _random_teacher(model64, 0)(mixed.x), model64(mixed.x)
        flag = mixed.y.double().unsqueeze(1)
        target = flag * (bad / T).softmax(1) + (1 - flag) * (good / T).softmax(1)
    student = copy.deepcopy(model64)
    loss = (target * (target.log() - (student(mixed.x) / T).log_softmax(1))).sum(1).mean()
    grads = torch.autograd.grad(loss, list(student.parameters()))
    result = BadTeacher(epochs=1, lr=lr, batch_size=10_000, temperature=T, optimizer="sgd", momentum=0.0,
                        weight_decay=0.0).unlearn(model64, f64, r64, seed=0)
    for p, p0, g in zip(result.model.parameters(), model64.parameters(), grads):
        torch.testing.assert_close(p.detach(), p0 - lr * g, rtol=1e-9, atol=1e-12)


def test_ssd_matches_hand_computed_dampening(problem):
    """Full-batch importances (one batch each): I = g^2; w *= min(lam I_D / I_f, 1) where I_f > alpha I_D."""
    model, forget, retain = problem
    model64 = copy.deepcopy(model).double().eval()
    f64, r64 = LabeledData(forget.x.double(), forget.y), LabeledData(retain.x.double(), retain.y)
    full = LabeledData(torch.cat([r64.x, f64.x]), torch.cat([r64.y, f64.y]))
    params = list(model64.parameters())
    g_f = torch.autograd.grad(F.cross_entropy(model64(f64.x), f64.y), params)
    g_d = torch.autograd.grad(F.cross_entropy(model64(full.x), full.y), params)
    result = SSD(alpha=2.0, lam=0.5, batch_size=10_000).unlearn(model64, f64, r64)
    dampened = 0
    for p, p0, gf, gd in zip(result.model.parameters(), params, g_f, g_d):
        i_f, i_d = gf.square(), gd.square()
        selected = i_f > 2.0 * i_d
        factor = torch.where(selected, (0.5 * i_d / i_f).clamp(max=1.0), torch.ones_like(i_f))
        torch.testing.assert_close(p, p0 * factor, rtol=1e-9, atol=1e-12)
        dampened += int(selected.sum())
    assert dampened == result.diagnostics["dampened_weights"] > 0


def test_bad_teacher_random_teacher_is_fresh_and_frozen():
    model = SmallViT(8, 4, 1, 10, dim=8, depth=1, heads=2)
    teacher = _random_teacher(model, seed=0)
    for (name, p), q in zip(model.named_parameters(), teacher.parameters()):
        assert not q.requires_grad
        if "norm" not in name:  # LayerNorm resets to the constants (1, 0) it starts from
            assert not torch.equal(p, q), name
    assert not teacher.training
    assert torch.equal(flat(_random_teacher(model, seed=0)), flat(teacher))


def test_bad_teacher_draws_its_random_teacher_from_the_seed(problem, monkeypatch):
    """The incompetent teacher of an unlearning call is drawn from its seed (a fixed draw for every seed passed
    the determinism tests: the shuffles differ by seed)."""
    import unlearn_kernels.methods.first_order as first_order

    model, forget, retain = problem
    teachers, draw = [], first_order._random_teacher

    def recording(model_, seed):
        teachers.append(flat(draw(model_, seed)))
        return draw(model_, seed)

    monkeypatch.setattr(first_order, "_random_teacher", recording)
    for seed in (0, 1, 0):
        BadTeacher(epochs=1).unlearn(model, forget, retain, seed=seed)
    assert not torch.equal(teachers[0], teachers[1]) and torch.equal(teachers[0], teachers[2])


def test_scrub_reports_the_mean_retain_loss_of_its_last_pass(problem):
    """retain_loss_last_pass is the min pass's loss averaged over its batches (no test read it: the sum passed).
    With a vanishing lr the student stays the teacher: the loss is gamma x the cross entropy, the KL term 0."""
    model, forget, retain = problem
    retain = retain.subset(torch.arange(512))  # 8 full batches of 64: the mean of batch means is the mean
    result = SCRUB(epochs=1, max_steps=0, lr=1e-12, batch_size=64).unlearn(model, forget, retain, seed=0)
    with torch.no_grad():
        expected = 0.99 * float(F.cross_entropy(model(retain.x), retain.y))
    assert result.diagnostics["retain_loss_last_pass"] == pytest.approx(expected, rel=1e-5)


def test_bad_teacher_reports_the_retain_rows_it_mixed_in(problem):
    model, forget, retain = problem
    method = BadTeacher(epochs=1)
    result = method.unlearn(model, forget, retain, seed=0)
    assert result.diagnostics["retain_samples"] == round(method.retain_fraction * len(retain)) > 0


def test_finetune_reports_its_accuracy_on_the_retain_batches(problem):
    """train_accuracy is the accuracy on the batches of the last epoch; with a vanishing lr the model does not
    move, so it is the model's accuracy on D_r."""
    model, forget, retain = problem
    result = Finetune(epochs=1, lr=1e-12).unlearn(model, forget, retain, seed=0)
    with torch.no_grad():
        expected = int((model(retain.x).argmax(1) == retain.y).sum()) / len(retain)
    assert result.diagnostics["train_accuracy"] == pytest.approx(expected, abs=1e-12)


def test_wrong_labels_are_always_wrong():
    y = torch.arange(1000) % 7
    wrong = wrong_labels(y, 7, torch.Generator().manual_seed(0))
    assert (wrong != y).all() and wrong.min() >= 0 and wrong.max() <= 6
    assert set(wrong[y == 3].tolist()) == {0, 1, 2, 4, 5, 6}


# every method that trains for a number of epochs (the first-order ones, LoTUS, RFA)
TRAINED = sorted(name for name, cls in METHODS.items() if issubclass(cls, TrainedUnlearner))


@pytest.mark.parametrize("name", TRAINED)
def test_zero_epochs_are_refused_by_name(name):
    """0 epochs would return the model unchanged from an unlearning call: refused in the constructor."""
    assert len(TRAINED) >= 9
    with pytest.raises(ValueError, match=f"^{name}: epochs must be an int >= 1, got 0$"):
        METHODS[name](epochs=0)


def batch_norm_factory() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 10))


@pytest.fixture(scope="module")
def batch_norm_problem(problem):
    """A BatchNorm1d model, 17 forget rows, 41 retain rows (both 1 more than a multiple of 8), and
    unseen rows."""
    _, forget, retain = problem
    forget = LabeledData(forget.x[:17], forget.y[:17])
    retain, unseen = (LabeledData(retain.x[a:b], retain.y[a:b]) for a, b in ((0, 41), (41, 81)))
    model = init_model(batch_norm_factory, 0)
    train(model, LabeledData(torch.cat([forget.x, retain.x]), torch.cat([forget.y, retain.y])),
          dataclasses.replace(CONFIG, epochs=2, batch_size=16))
    return model, forget, retain, unseen


# (method, gradients): batch sizes that leave a last batch of one row in every set the method batches
# (forget 17 and retain 41 rows by 8; the union of random_labels/salun, 58 rows, by 57; D_f and 30% of
# D_r, 29 rows, by 28), joined to the batch before it; 2 epochs each
ONE_ROW_LAST = {
    "finetune": ({"batch_size": 8}, 2 * 5),
    "gradient_ascent": ({"batch_size": 8}, 2 * 2),
    "neggrad_plus": ({"batch_size": 8}, 2 * 5 * 2),
    "random_labels": ({"batch_size": 57}, 2 * 1),
    "salun": ({"batch_size": 57}, 1 + 2 * 1),
    "scrub": ({"batch_size": 8, "forget_batch_size": 8}, 2 * (2 + 5)),
    "bad_teacher": ({"batch_size": 28}, 2 * 1),
    # the noise over D_f (eval mode: plain batches), the impair set (58 rows) joined, then the repair over D_r
    "unsir": ({"batch_size": 57, "noise_steps": 1}, 1 + 2 * 1 + 1),
    "lotus": ({"batch_size": 28, "lr": 1e-4}, 2 * 1),
    # keeps batch norm in eval mode: its batches are the plain ones; a D_r and a D_f batch per step
    "rfa": ({"batch_size": 8}, 2 * 6 * 2),
}


@pytest.mark.parametrize("name", [*ONE_ROW_LAST, "retrain"])
def test_a_last_batch_of_one_row_joins_the_one_before_it_for_a_batch_norm_model(batch_norm_problem, name):
    """torch raised "Expected more than 1 value per channel when training" mid-training."""
    model, forget, retain, unseen = batch_norm_problem
    if name == "retrain":
        method, gradients = Retrain(batch_norm_factory, dataclasses.replace(CONFIG, epochs=2, batch_size=8)), 2 * 5
    else:
        kwargs, gradients = ONE_ROW_LAST[name]
        method = METHODS[name](epochs=2, **kwargs)
    result = method.unlearn(model, forget, retain, unseen=unseen, seed=0)
    assert result.gradients == gradients


RELABELLED = r"training \(D_r and D_f with random labels\) set \(58 rows\)"


@pytest.mark.parametrize("method, rows, message", [
    (GradientAscent(batch_size=1), (17, 41), r"batch_size 1 makes every batch of the forget set \(17 rows\) one row"),
    (SCRUB(forget_batch_size=4), (1, 41), r"the forget set has 1 row \(batch_size 4\)"),
    (Retrain(batch_norm_factory, CONFIG), (17, 1), r"the retain set has 1 row \(batch_size 32\)"),
    # these train through train(), which named itself ("train: ... the training set")
    (Finetune(batch_size=1), (17, 41), r"batch_size 1 makes every batch of the retain set \(41 rows\) one row"),
    (Retrain(batch_norm_factory, dataclasses.replace(CONFIG, batch_size=1)), (17, 41),
     r"batch_size 1 makes every batch of the retain set \(41 rows\) one row"),
    (RandomLabels(batch_size=1), (17, 41), rf"batch_size 1 makes every batch of the {RELABELLED} one row"),
    (SalUn(batch_size=1), (17, 41), rf"batch_size 1 makes every batch of the {RELABELLED} one row"),
])
def test_batches_of_one_row_no_joining_helps_are_refused_by_name(batch_norm_problem, method, rows, message):
    model, forget, retain, _ = batch_norm_problem
    forget, retain = (LabeledData(d.x[:n], d.y[:n]) for d, n in zip((forget, retain), rows))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"^{method.name}: {message}, and the model's batch-norm layer '2' cannot "
                                         r"train on a batch of one row \(one value per channel in training mode\)"):
        method.unlearn(model, forget, retain)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    if isinstance(method, SCRUB):  # no max pass: the forget set is never batched
        assert SCRUB(max_steps=0, epochs=1).unlearn(model, forget, retain).gradients == 1



def _single_class(data: LabeledData) -> LabeledData:
    rows = data.y == data.y[0]
    return LabeledData(data.x[rows], data.y[rows])


@pytest.mark.parametrize("method, work, single_class_retain, message", [
    (UNSIR(batch_size=1), "_noise", False,
     r"batch_size 1 makes every batch of the impair \(noise and a retain subset\) set \(58 rows\) one row"),
    (UNSIR(retain_per_class=1), "_noise", True, r"the repair \(the retain subset\) set has 1 row \(batch_size 64\)"),
    (SalUn(batch_size=1), "_saliency_mask", False, rf"batch_size 1 makes every batch of the {RELABELLED} one row"),
])
def test_sets_no_joining_helps_are_refused_before_the_first_phase(batch_norm_problem, monkeypatch, method, work,
                                                                  single_class_retain, message):
    """UNSIR optimised its noise (1,200 Adam steps here) and trained the impair epoch before train() refused the
    repair's one-row subset; SalUn ran its saliency pass before train() refused its set. The first phase now
    fails the test if it runs."""
    model, forget, retain, _ = batch_norm_problem
    retain = _single_class(retain) if single_class_retain else retain

    def fail(*args, **kwargs):
        raise AssertionError(f"{work} ran before the refusal")

    monkeypatch.setattr(type(method), work, fail)
    with pytest.raises(ValueError, match=rf"^{method.name}: {message}, and the model's batch-norm layer '2' cannot "
                                         r"train on a batch of one row"):
        method.unlearn(model, forget, retain)

def test_methods_that_train_through_train_do_not_check_the_retain_set_again(problem):
    """unlearn() checks the sets (finite, fitting the model, labels among its classes); train() ran the
    same checks again, one more forward pass over the retain set each call."""
    model, forget, retain = problem
    hooked, calls = copy.deepcopy(model), []
    hooked.register_forward_hook(lambda *args: calls.append(1))  # the private copy keeps the hook
    result = Finetune(epochs=1).unlearn(hooked, forget, retain)
    assert len(calls) == 4 + result.gradients  # unlearn()'s check of each set (eval and training mode), then the steps

    def counted() -> MLP:
        fresh = factory()
        fresh.register_forward_hook(lambda *args: calls.append(1))
        return fresh

    calls.clear()
    result = Retrain(counted, dataclasses.replace(CONFIG, epochs=1)).unlearn(model, forget, retain)
    assert len(calls) == result.gradients  # the oracle's forward passes: its steps only


def test_retrain_refuses_an_empty_cache_dir(tmp_path, monkeypatch):
    """Path("") is the working folder: an empty cache_dir cached the oracles there silently."""
    monkeypatch.chdir(tmp_path)
    for empty in ("", EmptyPath()):
        with pytest.raises(ValueError, match=r"^Retrain: cache_dir is an empty path, which would cache the oracles in "
                                             r'the working folder; name a folder \("\." for the working folder\), or '
                                             r"None for no cache$"):
            Retrain(factory, CONFIG, cache_dir=empty)
    assert Retrain(factory, CONFIG, cache_dir=".").cache_dir == Path(".")
    assert not list(tmp_path.iterdir())


def no_running_statistics_factory() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16),
                               torch.nn.BatchNorm1d(16, track_running_stats=False), torch.nn.ReLU(),
                               torch.nn.Linear(16, 10))


@pytest.mark.parametrize("name, kwargs, gradients", [
    ("finetune", {"batch_size": 8}, 2 * 5),
    ("random_labels", {"batch_size": 57}, 2 * 1),
    ("salun", {"batch_size": 8}, 2 + 2 * 8),  # saliency over D_f in eval mode, its last row joined too
    ("gradient_ascent", {"batch_size": 8}, 2 * 2),
    ("neggrad_plus", {"batch_size": 8}, 2 * 5 * 2),
    ("scrub", {"batch_size": 8, "forget_batch_size": 8}, 2 * (2 + 5)),
    ("bad_teacher", {"batch_size": 28}, 2 * 1),
    ("ssd", {"batch_size": 8}, 2 + 8),
    ("unsir", {"batch_size": 8, "noise_steps": 1}, 2 + 2 * 8 + 5),  # noise over D_f in eval mode, its last row joined
    ("retrain", {"batch_size": 8}, 2 * 5),
])
def test_a_batch_norm_layer_without_running_statistics_trains_end_to_end(batch_norm_problem, name, kwargs, gradients):
    """A BatchNorm1d(track_running_stats=False) takes the batch's statistics in eval mode too: every
    method refused it ("the forget samples ... do not fit the model"), from one row run in eval mode.
    Forget 17 and retain 41 rows leave a last batch of one row, joined in training and eval passes."""
    _, forget, retain, unseen = batch_norm_problem
    model = init_model(no_running_statistics_factory, 0)
    train(model, LabeledData(torch.cat([forget.x, retain.x]), torch.cat([forget.y, retain.y])),
          dataclasses.replace(CONFIG, epochs=2, batch_size=16))
    state = copy.deepcopy(model.state_dict())
    if name == "retrain":
        method = Retrain(no_running_statistics_factory, dataclasses.replace(CONFIG, epochs=2, **kwargs))
    else:
        method = METHODS[name](**kwargs) if name == "ssd" else METHODS[name](epochs=2, **kwargs)
    result = method.unlearn(model, forget, retain, unseen=unseen, seed=0)
    assert result.gradients == gradients and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert math.isfinite(evaluate(result.model, retain)[1])
    one = LabeledData(forget.x[:1], forget.y[:1])
    if name in ("finetune", "retrain", "random_labels", "bad_teacher"):  # a forget row never batched alone
        assert method.unlearn(model, one, retain, seed=0).gradients > 0
    elif name in ("salun", "ssd", "unsir"):  # their pass over D_f in eval mode cannot take it
        with pytest.raises(ValueError, match=rf"^{name}: the forget set has 1 row \(batch_size 8\), and the model's "
                                             r"batch-norm layer '2' cannot take a batch of one row, in eval mode"):
            method.unlearn(model, one, retain, seed=0)


@pytest.mark.parametrize("cls", [Retrain, RetrainReseeded])
def test_an_oracle_of_zero_epochs_is_refused(cls):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: config.epochs must be an int >= 1, got 0$"):
        cls(factory, dataclasses.replace(CONFIG, epochs=0))


def test_ssd_counts_only_the_weights_it_dampens(problem):
    """With lam > alpha some weights with I_f > alpha I_D get the factor min(lam I_D / I_f, 1) = 1:
    they are not dampened and not counted."""
    model, forget, retain = problem
    for lam, alpha in ((1.0, 2.0), (50.0, 2.0), (1e6, 2.0)):
        result = SSD(alpha=alpha, lam=lam).unlearn(model, forget, retain)
        changed = sum(int((p != q).sum()) for p, q in zip(model.parameters(), result.model.parameters()))
        assert result.diagnostics["dampened_weights"] == changed, lam
    assert changed == 0  # lam 1e6: no factor below 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_empty_sets_raise(problem, name):
    model, forget, retain = problem
    empty = LabeledData(forget.x[:0], forget.y[:0])
    with pytest.raises(ValueError, match="forget set is empty"):
        make(name).unlearn(model, empty, retain)
    with pytest.raises(ValueError, match="retain set is empty"):
        make(name).unlearn(model, forget, empty)


@pytest.mark.parametrize("call, message", [
    (lambda: NegGradPlus(alpha=1.5), "alpha"),
    (lambda: SalUn(mask_fraction=0.0), "mask_fraction"),
    (lambda: SCRUB(temperature=0.0), "temperature"),
    (lambda: BadTeacher(retain_fraction=2.0), "retain_fraction"),
    (lambda: SSD(alpha=0.0), "alpha"),
    (lambda: Finetune(lr=-1.0), "lr"),
    (lambda: GradientAscent(optimizer="rmsprop"), "optimizer"),
    (lambda: Retrain(factory, {"epochs": 1}), "TrainConfig"),
])
def test_bad_hyper_parameters_raise(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


NAN = float("nan")


@pytest.mark.parametrize("cls, kwargs, message", [
    *[(cls, {"weight_decay": NAN}, "weight_decay must be a finite number >= 0")
      for cls in (Finetune, GradientAscent, NegGradPlus, RandomLabels, SalUn, SCRUB, BadTeacher)],
    (SCRUB, {"alpha": NAN}, "alpha must be a finite number >= 0"),
    (SCRUB, {"gamma": NAN}, "gamma must be a finite number >= 0"),
    (SCRUB, {"max_steps": 1.5}, "max_steps must be an int >= 0"),
    # returned the model unchanged (or only weight-decayed), though methods.md refuses such values
    *[(SCRUB, {"max_steps": 0, "alpha": alpha, "gamma": 0.0}, "max_steps=0 runs no max pass, and with gamma=0")
      for alpha in (0.0, 1.0)],
    (SCRUB, {"forget_batch_size": 2.0}, "forget_batch_size must be an int >= 1"),
    (Finetune, {"epochs": 1.5}, "epochs must be an int >= 1"),
    (Finetune, {"epochs": NAN}, "epochs must be an int >= 1"),
    (GradientAscent, {"epochs": True}, "epochs must be an int >= 1"),
    (Finetune, {"batch_size": 1.5}, "batch_size must be an int >= 1"),
    (NegGradPlus, {"batch_size": NAN}, "batch_size must be an int >= 1"),
    (Finetune, {"lr": "0.1"}, "lr must be a finite number > 0"),
    (RandomLabels, {"momentum": NAN}, r"momentum must be a finite number in \[0, 1\)"),
    (RandomLabels, {"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\)"),
    (GradientAscent, {"optimizer": "rmsprop"}, "optimizer must be one of"),
    (NegGradPlus, {"alpha": NAN}, r"alpha must be a finite number in \[0, 1\]"),
    (SalUn, {"mask_fraction": "half"}, r"mask_fraction must be a finite number in \(0, 1\]"),
    (BadTeacher, {"temperature": NAN}, "temperature must be a finite number > 0"),
    (SSD, {"lam": NAN}, "lam must be a finite number > 0"),
    (SSD, {"batch_size": 8.0}, "batch_size must be an int >= 1"),
])
def test_bad_hyper_parameters_are_refused_in_the_constructor_by_name(cls, kwargs, message):
    """Non-finite or wrongly typed values fail in the constructor, naming the method, rather than
    inside unlearn (a raw torch error, or a NaN model)."""
    with pytest.raises(ValueError, match=f"^{cls.name}: {message}"):
        cls(**kwargs)


class _CastsItsInputs(nn.Module):
    """A model that takes bool inputs and casts them itself."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float())


@pytest.mark.parametrize("name", [n for n in FORGETTING if n != "unsir"] + ["finetune"])
def test_bool_inputs_that_the_model_casts_itself(name):
    """BadTeacher built its forget/retain flag in the inputs' dtype and failed with torch's "Subtraction ...
    with a bool tensor is not supported", where the other methods run."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 12, generator=gen) > 0.5, torch.randint(0, 3, (60,), generator=gen)
    model = init_model(_CastsItsInputs, 0).eval()
    saved = flat(model).clone()
    method = METHODS[name]() if name == "ssd" else METHODS[name](epochs=1)
    out = method.unlearn(model, LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:]))
    assert torch.isfinite(flat(out.model)).all() and torch.equal(flat(model), saved)


@pytest.mark.parametrize(("name", "options"), [("finetune", {"optimizer": "adam"}), ("bad_teacher", {}),
                                               ("lotus", {}), ("rfa", {"targets": ["0"]})])
def test_adam_on_a_float16_model_is_refused_by_name(name, options):
    """Adam's eps (1e-8) is 0 in float16: the methods returned NaN and blamed the learning rate ("lower its
    learning rate"), at any rate (1e-7 too)."""
    gen = torch.Generator().manual_seed(0)
    model = init_model(lambda: nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)), 0).half().eval()
    x, y = torch.randn(60, 12, generator=gen).half(), torch.randint(0, 3, (60,), generator=gen)
    saved = flat(model).clone()
    extra = {"unseen": LabeledData(torch.randn(5, 12, generator=gen).half(), y[:5])} if name == "lotus" else {}
    with pytest.raises(ValueError, match=rf"^{name}: optimizer 'adamw?' cannot train float16 parameters: its eps"):
        METHODS[name](**options).unlearn(model, LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:]), **extra)
    assert torch.equal(flat(model), saved)
    with pytest.raises(ValueError, match=r"^train: optimizer 'adam' cannot train float16"):
        train(model, LabeledData(x, y), TrainConfig(epochs=1, optimizer="adam"))
    # a frozen float16 layer takes no step: no refusal
    mixed = nn.Sequential(nn.Linear(12, 8).half().requires_grad_(False), _ToFloat(), nn.Linear(8, 3))
    train(mixed, LabeledData(x, y), TrainConfig(epochs=1, optimizer="adam"))
    assert torch.isfinite(flat(mixed)).all()


@pytest.mark.parametrize("name", ["finetune", "neggrad_plus", "rfa"])
def test_a_learning_rate_beyond_the_parameters_dtype_is_refused_by_name(name):
    """A finite lr of 1e39 passed every check and failed at the first step with torch's "value cannot be
    converted to type float without overflow" (a traceback from the command line's --lr). Refused by name now;
    in float64, where it fits, the step runs (and diverges as such)."""
    gen = torch.Generator().manual_seed(0)
    model = init_model(lambda: nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)), 0).eval()
    x, y = torch.randn(60, 12, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    saved = flat(model).clone()
    options = {"targets": ["0"]} if name == "rfa" else {}
    with pytest.raises(ValueError, match=rf"^{name}: lr = 1e\+39 does not fit the parameters' torch.float32 \(largest "
                                         r"3.403e\+38\)$"):
        METHODS[name](lr=1e39, **options).unlearn(model, LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:]))
    assert torch.equal(flat(model), saved)
    for what in ("lr", "weight_decay"):
        config = TrainConfig(epochs=1, **{what: 1e39})
        with pytest.raises(ValueError, match=rf"^train: {what} = 1e\+39 does not fit the parameters' torch.float32"):
            train(model, LabeledData(x, y), config)
    wide = copy.deepcopy(model).double()  # where it fits, it is no refusal's business (one step of it: 5e37 weights)
    train(wide, LabeledData(x.double(), y), TrainConfig(epochs=1, lr=1e39))
    assert float(flat(wide).abs().max()) > 1e30


class _ToFloat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


@pytest.mark.parametrize("dtype, rows, scale", [(torch.float16, 6000, 1000.0), (torch.bfloat16, 20000, 1.0)],
                         ids=["float16", "bfloat16"])
def test_salun_saliency_is_summed_wide_in_half_precision(dtype, rows, scale):
    """The saliency summed the forget batches' gradients in the model's .grad: in float16 it overflowed
    to Inf on a large forget set (entries tied at Inf, the top-k among them arbitrary: 66 of 650 mask
    entries wrong here) and in bfloat16 it lost the small increments (4 wrong here). It is held to the
    same batch gradients summed in float64."""
    digits = load_digits()
    gen = torch.Generator().manual_seed(0)
    model = init_model(lambda: nn.Linear(64, 10), 0).to(dtype)
    index = torch.randint(0, len(digits.data), (rows,), generator=gen)
    x = (torch.tensor(digits.data[index], dtype=torch.float32) * scale / 16).to(dtype)
    forget = LabeledData(x, (torch.tensor(digits.target[index]) + 1) % 10)
    method = SalUn()
    masks, batches = method._saliency_mask(model, forget)
    reference = 0
    for xb, yb in forget.loader(method.batch_size):
        model.zero_grad()
        F.cross_entropy(model(xb), yb, reduction="sum").backward()
        reference = reference + torch.cat([p.grad.double().flatten() for p in model.parameters()])
    assert batches == math.ceil(rows / method.batch_size)
    top = torch.zeros(reference.numel(), dtype=torch.bool)
    top[torch.topk(reference.abs(), round(0.5 * reference.numel())).indices] = True
    mask = torch.cat([masks[name].flatten() for name, _ in model.named_parameters()])
    assert int((mask != top).sum()) <= 1  # float32 against float64 sums: at most a tie at the threshold


def test_ssd_importance_is_summed_wide_in_half_precision():
    """SSD's importances (mean squared batch gradients) were summed in the model's dtype: in float16 the
    squares of small gradients underflowed to 0 (every one of 640 here), so no weight could be dampened
    (I_f = 0). They are held to the same batch gradients squared and summed in float64."""
    digits = load_digits()
    model = init_model(lambda: nn.Linear(64, 10), 0).half()
    x = (torch.tensor(digits.data[:640], dtype=torch.float32) / 16 * 0.002).half()  # small gradients
    data = LabeledData(x, torch.tensor(digits.target[:640]))
    method = SSD()
    importance, batches = method._importance(model, data, "forget", 0)
    reference = 0
    for xb, yb in data.loader(method.batch_size, shuffle=True, seed=0):
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        reference = reference + torch.cat([p.grad.double().square().flatten() for p in model.parameters()])
    got = torch.cat([v.double().flatten() for v in importance.values()])
    assert all(v.dtype == torch.float32 for v in importance.values())
    torch.testing.assert_close(got, reference / batches, rtol=1e-6, atol=0)


def test_salun_and_ssd_count_their_fractions_over_the_trainable_weights(problem):
    """SalUn's mask and SSD's dampening touch trainable weights only; their diagnostics are shares of
    those (SSD's dampened_fraction divided by every parameter, frozen ones included: with the first
    layer frozen it read a fraction of what it dampened)."""
    model, forget, retain = problem
    frozen = copy.deepcopy(model)
    first = next(p for p in frozen.parameters() if p.dim() == 2)
    first.requires_grad_(False)
    trainable = sum(p.numel() for p in frozen.parameters() if p.requires_grad)
    assert trainable < sum(p.numel() for p in frozen.parameters())
    for method in (SalUn(epochs=1), SSD(alpha=1.0)):
        out = method.unlearn(frozen, forget, retain, seed=0)
        assert torch.equal(dict(out.model.named_parameters())[next(n for n, p in frozen.named_parameters()
                                                                    if p is first)], first)
        if isinstance(method, SSD):
            assert out.diagnostics["dampened_weights"] > 0
            assert out.diagnostics["dampened_fraction"] == out.diagnostics["dampened_weights"] / trainable
        else:
            assert out.diagnostics["mask_fraction"] == pytest.approx(0.5, abs=1e-2)
            moved = sum(int((p != q).sum()) for p, q in zip(out.model.parameters(), frozen.parameters()))
            assert 0 < moved <= round(0.5 * trainable)


def test_distillation_kl_is_computed_in_float32_at_least():
    """In bfloat16 the KL of two equal distributions came out -0.003 (the size of SCRUB's real values, ~0.005): the
    loss and its diagnostic are now taken in float32 for half-precision logits, as SSD's and SalUn's sums are."""
    from unlearn_kernels.methods.first_order import _distill_kl

    z = torch.randn(30, 10, generator=torch.Generator().manual_seed(0)) * 3
    for dtype in (torch.bfloat16, torch.float16):
        half = z.to(dtype)
        assert abs(float(_distill_kl(half, half, 4.0))) < 1e-6
        assert _distill_kl(half, half, 4.0).dtype == torch.float32
    assert _distill_kl(z.double(), z.double(), 4.0).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# UNSIR


def test_unsir_noise_takes_the_documented_first_adam_step(problem):
    """One noise step from the seeded N(0, 1) draw is Adam's first step, lr * g / (|g| + eps), on
    -CE(f(n), y) + noise_l2 * ||n||^2 summed over the forget rows, here from a float64 autograd gradient."""
    model, forget, _ = problem
    method = UNSIR(noise_steps=1, noise_lr=0.05, noise_l2=0.3, batch_size=16)
    noise, batches = method._noise(copy.deepcopy(model), forget, seed=7)
    assert batches == math.ceil(len(forget) / 16)
    start = torch.randn(forget.x.shape, generator=torch.Generator().manual_seed(7)).double().requires_grad_(True)
    reference = copy.deepcopy(model).double().eval()
    objective = -F.cross_entropy(reference(start), forget.y, reduction="sum") + 0.3 * start.square().sum()
    grad, = torch.autograd.grad(objective, start)
    expected = start.detach() - 0.05 * grad / (grad.abs() + 1e-8)
    clear = grad.abs() > 1e-4  # where float32 and float64 agree on the gradient's sign
    assert clear.float().mean() > 0.9
    torch.testing.assert_close(noise.double()[clear], expected[clear], rtol=0, atol=1e-5)
    assert ((noise.double() - start.detach()).abs() <= 0.05 + 1e-6).all()


def test_unsir_noise_raises_the_loss_on_the_forget_labels_and_ignores_the_batching(problem):
    model, forget, _ = problem
    initial = torch.randn(forget.x.shape, generator=torch.Generator().manual_seed(0))
    by_16, _ = UNSIR(batch_size=16)._noise(copy.deepcopy(model), forget, seed=0)
    by_64, _ = UNSIR(batch_size=64)._noise(copy.deepcopy(model), forget, seed=0)
    torch.testing.assert_close(by_16, by_64, rtol=0, atol=1e-4)  # each row's objective is its own
    with torch.no_grad():
        losses = [F.cross_entropy(model.eval()(x), forget.y).item() for x in (forget.x, initial, by_16)]
    assert losses[2] > losses[1] + 1.0 and losses[2] > losses[0] + 1.0
    # the L2 term keeps the noise small: a heavier one gives smaller noise
    heavy, _ = UNSIR(noise_l2=10.0)._noise(copy.deepcopy(model), forget, seed=0)
    assert heavy.norm() < 0.5 * by_16.norm()


def test_unsir_retain_subset_keeps_at_most_the_cap_per_class_by_seed():
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate((3, 9, 20))])[torch.randperm(32, generator=gen)]
    retain = LabeledData(torch.arange(32.0).unsqueeze(1), y)
    subsets = [UNSIR(retain_per_class=5)._retain_subset(retain, seed) for seed in (0, 0, 1)]
    for subset in subsets:
        assert torch.bincount(subset.y, minlength=3).tolist() == [3, 5, 5]
        rows = subset.x.squeeze(1).long()
        assert torch.equal(retain.y[rows], subset.y) and bool((rows.diff() > 0).all())  # rows of D_r, in order
    assert torch.equal(subsets[0].x, subsets[1].x) and not torch.equal(subsets[0].x, subsets[2].x)
    assert UNSIR(retain_per_class=None)._retain_subset(retain, 0) is retain


def test_unsir_refuses_inputs_that_are_not_floating_point():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 12, generator=gen) > 0.5, torch.randint(0, 3, (60,), generator=gen)
    model = init_model(_CastsItsInputs, 0).eval()
    saved = flat(model).clone()
    with pytest.raises(ValueError, match=r"^unsir: needs floating-point inputs \(its noise is optimised in input "
                                         r"space\); the forget set's inputs are torch.bool$"):
        UNSIR().unlearn(model, LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:]))
    assert torch.equal(flat(model), saved)


@pytest.mark.parametrize("kwargs, message", [
    ({"noise_steps": -1}, "noise_steps must be an int >= 0"),
    ({"noise_lr": 0.0}, "noise_lr must be a finite number > 0"),
    ({"noise_l2": NAN}, "noise_l2 must be a finite number >= 0"),
    ({"repair_lr": NAN}, "repair_lr must be a finite number > 0"),
    ({"repair_epochs": 1.5}, "repair_epochs must be an int >= 0"),
    ({"retain_per_class": 0}, "retain_per_class must be an int >= 1"),
])
def test_unsir_bad_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=f"^unsir: {message}"):
        UNSIR(**kwargs)
