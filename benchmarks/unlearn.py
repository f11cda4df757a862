"""Cost of unlearning against retraining as the data grows: ``python -m benchmarks unlearn``.

Data: the digits train split grown to n rows (a source image drawn at random, shifted by -1, 0 or
+1 pixel in each direction with the background shifted in, plus Gaussian noise of standard
deviation ``NOISE`` in the standardised pixel units). 10% of the source images get a uniformly
drawn wrong label (the mislabeled protocol, stratified, seeded), and so do all rows grown from
them (about 10% of the rows): corrupting rows one by one instead would leave each wrong label among
many near-copies of its image with the right one, and at n = 32k the original no longer learns
them (forget accuracy 0.4% in a trial run: no gap to close). The original model, the package's
digits MLP, trains on all n rows with the study's MLP recipe; the request forgets the mislabeled
rows (D_f, with their wrong labels) and keeps the rest (D_r).

Methods, each timed by its ``unlearn`` (the original's training is not counted) in ``REPEATS`` rounds (one on a
GPU) that take the three methods in turn, so that each meets the machine's slow and fast spells alike; a row's time
is the median of its calls (seeded: ``calls_identical`` in each row says whether every call returned the first one's
weights):

* ``retrain``: the oracle, the same recipe on D_r from a fresh initialisation;
* ``cure_newton``: CureNewton with the Hessian on a subsample of ``HESSIAN_SAMPLES`` rows of D_r
  and the recipe's weight decay in its objective (as the study runs it);
* ``finetune``: fine-tuning on D_r with its defaults.

Each row of the table: ``n``, ``retrain_seconds``, ``cure_newton_seconds``, ``finetune_seconds``,
``speedup`` (retrain / CureNewton) and ``gap_closed``: the part of the original's forget-accuracy gap
to the oracle that CureNewton closes, ``1 - |acc_f(CureNewton) - acc_f(retrain)| / |acc_f(original) -
acc_f(retrain)|`` (the study's ``gap_closed``), accuracy on D_f with its wrong labels
(``finetune_gap_closed`` likewise).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from unlearn_kernels.checks import check_int
from unlearn_kernels.data import LabeledData, load_dataset
from unlearn_kernels.data.protocols import index_forget, mislabel
from unlearn_kernels.eval.metrics import accuracy, predict_logits
from unlearn_kernels.methods import METHODS, Retrain
from unlearn_kernels.models import build_model
from unlearn_kernels.study import DEFAULT_RECIPES, gap_closed
from unlearn_kernels.training import init_model, train

from .common import Measurement, peak_memory, set_time

BASELINE = "retrain"
SIZES = (2_000, 8_000, 32_000)
REPEATS = 3
MIN_SIZE = 100
QUICK = {"sizes": (500, 1_000), "epochs": 3, "repeats": 1}
"""What the runner passes for ``--quick``: small data and a short recipe (a smoke test)."""
NOISE = 0.1
CORRUPTED = 0.1
HESSIAN_SAMPLES = 512
SEED = 0


def grown_digits(base: LabeledData, n: int, seed: int = SEED) -> tuple[LabeledData, torch.Tensor]:
    """n rows made from the (N, 1, 8, 8) images of ``base`` by random one-pixel shifts and Gaussian
    noise, with their source's label; and the source row of each."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(base), (n,), generator=gen)
    shifts = torch.randint(-1, 2, (2, n), generator=gen)
    background = float(base.x.min())
    padded = F.pad(base.x[rows], (1, 1, 1, 1), value=background)  # (n, 1, 10, 10)
    h, w = base.x.shape[-2:]
    x = torch.empty_like(base.x[rows])
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            pick = (shifts[0] == dy) & (shifts[1] == dx)
            x[pick] = padded[pick, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    x += NOISE * torch.randn(x.shape, generator=gen)
    return LabeledData(x, base.y[rows].clone()), rows


def _accuracy(model: torch.nn.Module, data: LabeledData) -> float:
    return accuracy(predict_logits(model, data), data.y)


def run(device: torch.device, *, sizes: tuple[int, ...] = SIZES, epochs: int | None = None,
        repeats: int | None = None) -> tuple[list[Measurement], dict]:
    """Original, then retrain, CureNewton and fine-tuning at each n (see the module docstring).

    Args:
        device: where the models train and unlearn.
        sizes: the training-set sizes n, each >= ``MIN_SIZE`` (fewer rows may hold no mislabeled one).
        epochs: override the recipe's epochs (None: the study's MLP recipe as it is).
        repeats: the rounds of calls (>= 1); None: ``REPEATS`` on the CPU, 1 on a GPU (whose calls vary less, and
            the GPU check's time for this suite holds one round: three took about 148 s of its 120).

    Returns:
        Measurements per (n, method) (``median_s`` and ``iqr_s`` of its calls; ``extra``: ``seconds``, every
        call's, ``calls_identical``, ``acc_forget``, ``acc_test`` and, for the methods, ``gap_closed``;
        ``peak_memory_bytes`` of the first call), and the config with ``rows``, the table of the module
        docstring.
    """
    # before any training: a bad value would otherwise fail after the first n's original was trained
    sizes = tuple(check_int(f"unlearn: sizes[{i}]", n, MIN_SIZE) for i, n in enumerate(sizes))
    repeats = check_int("unlearn: repeats", (REPEATS if device.type == "cpu" else 1) if repeats is None else repeats)
    recipe = DEFAULT_RECIPES["mlp"] if epochs is None else dataclasses.replace(DEFAULT_RECIPES["mlp"], epochs=epochs)
    recipe = dataclasses.replace(recipe, seed=SEED)
    digits = load_dataset("digits")
    test = LabeledData(digits.test.x.to(device), digits.test.y.to(device))

    def factory() -> torch.nn.Module:
        return init_model(lambda: build_model("mlp", digits.input_shape, digits.num_classes), SEED)

    methods = {
        "retrain": Retrain(factory, recipe),
        "cure_newton": METHODS["cure_newton"](hessian_samples=HESSIAN_SAMPLES, weight_decay=recipe.weight_decay),
        "finetune": METHODS["finetune"](),
    }
    results, rows = [], []
    corruption = mislabel(digits.train.y, CORRUPTED, seed=SEED, num_classes=digits.num_classes)
    wrong = torch.zeros(len(digits.train), dtype=torch.bool)
    wrong[corruption.corrupted_idx] = True
    for n in sizes:
        corrupted, source = grown_digits(corruption.apply(digits.train), n)
        request = index_forget(n, wrong[source].nonzero().squeeze(1))
        forget, retain = (LabeledData(s.x.to(device), s.y.to(device)) for s in request.apply(corrupted))
        original = factory().to(device)
        train(original, LabeledData(corrupted.x.to(device), corrupted.y.to(device)), recipe, device=device)
        original.eval()
        case = f"n={n}"
        acc_f = {"original": _accuracy(original, forget)}
        calls: dict[str, list[float]] = {name: [] for name in methods}
        first: dict[str, tuple[torch.nn.Module, int | None]] = {}
        identical = dict.fromkeys(methods, True)  # every call's weights equal to the first's
        for _ in range(repeats):
            for name, method in methods.items():
                with peak_memory(device) as peak:
                    result = method.unlearn(original, forget, retain, seed=SEED)
                calls[name].append(result.seconds)
                model, _ = first.setdefault(name, (result.model, peak.bytes))
                identical[name] &= all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                          result.model.state_dict().values()))
        seconds = {}
        for name, (model, peak_bytes) in first.items():
            acc_f[name] = _accuracy(model, forget)
            m = set_time(Measurement(case, name, None, None, None, peak_memory_bytes=peak_bytes,
                                     extra={"seconds": calls[name], "calls_identical": identical[name],
                                            "acc_forget": acc_f[name], "acc_test": _accuracy(model, test)}),
                         calls[name])
            seconds[name] = m.median_s
            results.append(m)
        closed = {name: gap_closed(acc_f[name] - acc_f["retrain"], acc_f["original"] - acc_f["retrain"])
                  for name in ("cure_newton", "finetune")}
        for m in results[-len(methods):]:
            if m.candidate in closed:
                m.extra["gap_closed"] = closed[m.candidate]
        rows.append({"n": n, "retrain_seconds": seconds["retrain"], "cure_newton_seconds": seconds["cure_newton"],
                     "finetune_seconds": seconds["finetune"], "speedup": seconds["retrain"] / seconds["cure_newton"],
                     "gap_closed": closed["cure_newton"], "finetune_gap_closed": closed["finetune"],
                     "acc_forget_original": acc_f["original"], "acc_forget_retrain": acc_f["retrain"],
                     "forget_rows": len(forget), "retain_rows": len(retain)})
    config = {"rows": rows, "recipe": recipe.to_dict(), "model": "build_model('mlp', (1, 8, 8), 10), seed 0",
              "data": f"digits train split grown by +-1 pixel shifts and N(0, {NOISE}^2) noise; {CORRUPTED:.0%} of "
                      "the source images mislabeled (stratified, seed 0) with every row grown from them; "
                      "D_f = the mislabeled rows",
              "cure_newton": {"hessian_samples": HESSIAN_SAMPLES, "weight_decay": recipe.weight_decay},
              "finetune": "defaults",
              "timing": (f"median of {repeats} calls per method (Unlearner.unlearn's seconds), in rounds taking the "
                         "methods in turn" if repeats > 1 else "one call per method (Unlearner.unlearn's seconds)")}
    return results, config
