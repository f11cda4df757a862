"""Membership-inference attacks (MIA): the three incompatible conventions of the literature.

Every number must say which convention produced it (docs/methods.md, "Membership inference"):

* :func:`mia_entropy` - (a) the entropy MIA of Bad Teacher / SSD / LoTUS: fraction of D_f that an
  attacker trained on D_r (members) vs test (non-members) calls *member*. Lower means more
  forgotten; compare with f_gold's value.
* :func:`mia_loss` - (b) the loss MIA of SCRUB / the NeurIPS 2023 unlearning challenge:
  cross-validated accuracy of an attacker telling D_f from test by the loss. 0.5 = chance; the
  ideal is the oracle's value.
* :func:`mia_salun_efficacy` - (c) SalUn's "MIA-efficacy": fraction of D_f that an SVC trained on
  D_r vs test calls *non-member*. Higher means more forgotten (the opposite direction of (a)).

All three are pure functions of logits (and labels), fit scikit-learn models, and are reproducible
for a given ``seed`` (class balancing and the cross-validation split are its only randomness).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import SVC

from ..checks import check_choice, check_int, check_sklearn_seed
from .metrics import check_labels, check_logits


# The features are read with .detach(): logits straight from a model's forward (requires_grad) are valid
# input, and numpy() refuses them ("Can't call numpy() on Tensor that requires grad").
def _entropy(logits: torch.Tensor) -> np.ndarray:
    """Prediction entropy -sum_c p_c ln p_c of each row, (N, 1) float64 (0 ln 0 = 0: a class whose softmax
    underflows, logits 1e308 apart, gave 0 * -inf = NaN and sklearn's "Input X contains NaN")."""
    log_p = torch.log_softmax(logits.detach().double(), dim=1)
    terms = torch.where(torch.isinf(log_p), torch.zeros_like(log_p), log_p.exp() * log_p)
    return (-terms.sum(dim=1)).cpu().numpy().reshape(-1, 1)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-sample loss -ln softmax(logits)_y, (N, 1) float64."""
    log_p = torch.log_softmax(logits.detach().double(), dim=1)
    return (-log_p.gather(1, y.to(logits.device).long().view(-1, 1))).cpu().numpy()


def _true_class_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """softmax(logits)_y of each row, (N, 1) float64."""
    probs = torch.softmax(logits.detach().double(), dim=1)
    return probs.gather(1, y.to(logits.device).long().view(-1, 1)).cpu().numpy()


def _check_classes(op: str, **logits: torch.Tensor) -> None:
    """ValueError unless every one of ``logits`` has the same number of classes (columns): one model's
    outputs on the sets; else the features would silently compare distributions over different classes."""
    classes = {name: value.shape[1] for name, value in logits.items()}
    if len(set(classes.values())) > 1:
        raise ValueError(f"{op}: the logits must have the same number of classes, got {classes}")


def _balanced(members: np.ndarray, non_members: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features X and labels (1 = member) with the larger group subsampled (without replacement)
    to the size of the smaller one."""
    n = min(len(members), len(non_members))
    members = members[np.sort(rng.choice(len(members), n, replace=False))]
    non_members = non_members[np.sort(rng.choice(len(non_members), n, replace=False))]
    x = np.concatenate([members, non_members])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    return x, labels


def mia_entropy(
    retain_logits: torch.Tensor,
    test_logits: torch.Tensor,
    forget_logits: torch.Tensor,
    seed: int = 0,
    balance: Literal["subsample", "class_weight"] = "subsample",
) -> float:
    """Entropy MIA, convention (a) (Bad Teacher, SSD, LoTUS).

    Feature: the prediction entropy H(x) = -sum_c p_c ln p_c, p = softmax(f(x)). Attacker: a
    scikit-learn ``LogisticRegression`` (default settings, ``random_state=seed``) fit on D_r
    (label 1, member) vs test (label 0, non-member). Score = fraction of D_f predicted member,
    in [0, 1]; f_orig typically scores high, a good unlearner about f_gold's value.

    Balancing: ``"subsample"`` (default) subsamples the larger of D_r / test to the size of the
    smaller with ``seed``; ``"class_weight"`` uses all samples with ``class_weight="balanced"``
    (what the LoTUS code does). Logits that require grad (straight from a forward pass) are read detached.

    The default settings are the convention's, and their limit too: where every retain and test entropy is below
    ~1e-3 (a model confident on every row), lbfgs stops at a zero slope and predicts no member, a score of 0
    however the entropies separate (the exact C = 1 optimum there: 1.0); one less confident row in a hundred is
    enough to avoid it. :func:`mia_loss`, which is ours, fits to the optimum.

    Raises:
        TypeError: logits that are not floating-point tensors, or a ``seed`` that is not an int.
        ValueError: logits that are not 2-D, empty, or hold NaN or Inf, logits with different numbers of
            classes, a ``seed`` outside [0, 2**32), or an unknown ``balance``.
    """
    for name, logits in (("retain_logits", retain_logits), ("test_logits", test_logits),
                         ("forget_logits", forget_logits)):
        check_logits(f"mia_entropy: {name}", logits)
    _check_classes("mia_entropy", retain_logits=retain_logits, test_logits=test_logits, forget_logits=forget_logits)
    seed = check_sklearn_seed("mia_entropy: seed", seed)
    check_choice("mia_entropy: balance", balance, ("subsample", "class_weight"))
    members, non_members = _entropy(retain_logits), _entropy(test_logits)
    if balance == "subsample":
        x, labels = _balanced(members, non_members, np.random.default_rng(seed))
        attacker = LogisticRegression(random_state=seed)
    else:
        x = np.concatenate([members, non_members])
        labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
        attacker = LogisticRegression(class_weight="balanced", random_state=seed)
    attacker.fit(x, labels)
    return float(attacker.predict(_entropy(forget_logits)).mean())


def mia_loss(
    forget_logits: torch.Tensor,
    forget_y: torch.Tensor,
    test_logits: torch.Tensor,
    test_y: torch.Tensor,
    seed: int = 0,
    folds: int = 5,
) -> float:
    """Loss MIA, convention (b) (SCRUB, NeurIPS 2023 unlearning challenge).

    Feature: the per-sample cross-entropy loss -ln softmax(f(x))_y. The larger of D_f (label 1) /
    test (label 0) is subsampled to the size of the smaller with ``seed``; the score is the mean
    accuracy of a scikit-learn ``LogisticRegression`` over a stratified, shuffled ``folds``-fold
    cross-validation (``StratifiedKFold(folds, shuffle=True, random_state=seed)``), in [0, 1]. It is fit
    on the losses divided by their largest, s, with ``C = s^2``: the optimum of the default ``C = 1`` in
    the loss's units, where the solver stops early on large losses.
    0.5 = the attacker cannot tell D_f from test. The ideal is f_gold's value, not 0.5 (the
    challenge kit uses 10 ``StratifiedShuffleSplit`` splits; k-fold uses every sample once).
    Each group needs at least ``folds`` samples. Logits that require grad are read detached.

    Raises:
        TypeError: logits that are not floating-point tensors, labels that are not 1-D integer tensors,
            or a ``seed`` that is not an int.
        ValueError: logits that are not 2-D, empty, or hold NaN or Inf, forget and test logits with
            different numbers of classes, labels of the wrong length or outside [0, C), ``folds`` not an
            int >= 2, fewer than ``folds`` forget or test samples, or a ``seed`` outside [0, 2**32).
    """
    check_logits("mia_loss: forget_logits", forget_logits)
    forget_y = check_labels("mia_loss: forget_y", forget_y, forget_logits)
    check_logits("mia_loss: test_logits", test_logits)
    test_y = check_labels("mia_loss: test_y", test_y, test_logits)
    _check_classes("mia_loss", forget_logits=forget_logits, test_logits=test_logits)
    folds = check_int("mia_loss: folds", folds, low=2)
    seed = check_sklearn_seed("mia_loss: seed", seed)
    n = min(len(forget_y), len(test_y))
    if n < folds:
        raise ValueError(f"mia_loss: {folds}-fold cross-validation needs >= {folds} forget and test samples, got {n}")
    x, labels = _balanced(_cross_entropy(forget_logits, forget_y), _cross_entropy(test_logits, test_y),
                          np.random.default_rng(seed))
    # The fit in the loss's own units stopped early where losses are large (from about 1e7: every row predicted a
    # member, exactly 0.5, for sets one threshold separates): it runs on losses / s with C = s^2 instead (s their
    # largest), the same optimum in other units, within [1e-150, 1e150] so that C stays a normal float; a loss
    # beyond 1e150 (an infinite one too: finite logits 1e308 apart) counts as 1e150, the order kept (an infinite
    # loss failed every fold's fit, which cross_val_score turned into a NaN score)
    # Newton's method to a tight tolerance: with small losses (all below ~1e-3) C = s^2 is tiny, the decision values
    # ~1e-6, and lbfgs at its default tol left the intercept off by more than that: every row on one side, 0.5
    # for sets one threshold separates (the exact optimum scores 1.0)
    x = np.minimum(x, 1e150)
    scale = min(max(float(x.max()), 1e-150), 1e150)
    attacker = LogisticRegression(C=scale * scale, solver="newton-cholesky", tol=1e-12, max_iter=1000,
                                  random_state=seed)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(attacker, x / scale, labels, cv=cv, scoring="accuracy", error_score="raise")
    return float(scores.mean())


def mia_salun_efficacy(
    retain_logits: torch.Tensor,
    retain_y: torch.Tensor,
    test_logits: torch.Tensor,
    test_y: torch.Tensor,
    forget_logits: torch.Tensor,
    forget_y: torch.Tensor,
    seed: int = 0,
) -> float:
    """SalUn "MIA-efficacy", convention (c) (Jia et al. 2023, SalUn, Fan et al. 2024).

    Feature: the true-class confidence softmax(f(x))_y. Attacker: ``sklearn.svm.SVC(C=3,
    gamma="auto", kernel="rbf")`` fit on D_r (label 1) vs test (label 0), the larger subsampled to
    the size of the smaller with ``seed`` (SalUn takes the first len(test) retain samples).
    Score = fraction of D_f predicted *non-member*, in [0, 1]: higher = more forgotten. When the
    confidence does not separate D_r from test, the SVC tends to predict one class almost
    everywhere, so the score is then unstable (far from 0.5, varying with ``seed``). The SVC costs
    O(n^2) in the number of shadow samples: pass subsets for very large test sets. Logits that
    require grad are read detached.

    Raises:
        TypeError: logits that are not floating-point tensors, labels that are not 1-D integer tensors,
            or a ``seed`` that is not an int.
        ValueError: logits that are not 2-D, empty, or hold NaN or Inf, logits with different numbers of
            classes, labels of the wrong length or outside [0, C), or a ``seed`` outside [0, 2**32).
    """
    checked = {}
    for name, logits, y in (("retain", retain_logits, retain_y), ("test", test_logits, test_y),
                            ("forget", forget_logits, forget_y)):
        check_logits(f"mia_salun_efficacy: {name}_logits", logits)
        checked[name] = check_labels(f"mia_salun_efficacy: {name}_y", y, logits)
    retain_y, test_y, forget_y = checked["retain"], checked["test"], checked["forget"]
    _check_classes("mia_salun_efficacy", retain_logits=retain_logits, test_logits=test_logits,
                   forget_logits=forget_logits)
    seed = check_sklearn_seed("mia_salun_efficacy: seed", seed)
    x, labels = _balanced(_true_class_confidence(retain_logits, retain_y),
                          _true_class_confidence(test_logits, test_y), np.random.default_rng(seed))
    attacker = SVC(C=3, gamma="auto", kernel="rbf", random_state=seed)
    attacker.fit(x, labels)
    return float(1.0 - attacker.predict(_true_class_confidence(forget_logits, forget_y)).mean())
