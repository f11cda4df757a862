"""Hessian-vector products on LoRA adapter parameters: double backward against forward-over-reverse.

The model of docs/rfa.md's adapter runs: the digits MLP as the RFA study trains it (the mislabeled scenario's
train split, seed 0), with rank-8 adapters on both layers (B drawn small, as after a first step), and the Hessian
of the mean cross entropy over the first ``rows`` retain rows in the adapters' parameters (d = 2,640), by the two
modes of ``hessian_operator``'s generic path:

* ``reverse-over-reverse`` (the baseline): double backward through the batch's gradient graph, kept at fixed
  weights;
* ``forward-over-reverse``: torch.func ``jvp`` of the gradient, through the LoRA op's forward-mode rule.

One product (``matvec``) and K = 8 (``matmat``), each gated against float64 double backward on a float64 copy of
the model, then timed interleaved. ``extra["relative_difference_to_double_backward"]`` is each row's relative
difference to the float32 double-backward products (a matmat's to those of its columns one at a time), as
docs/rfa.md quotes it. CPU only; docs/rfa.md's figures ran with one thread (``--threads 1``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from unlearn_kernels import lora
from unlearn_kernels.curvature import hessian_operator
from unlearn_kernels.data import load_dataset
from unlearn_kernels.models import build_model
from unlearn_kernels.study import StudyConfig, build_scenario
from unlearn_kernels.training import init_model, train

from .common import Measurement, check, check_plain, measure_interleaved, plain_error_tolerance

BASELINE = "reverse-over-reverse"
MODES = (BASELINE, "forward-over-reverse")
OURS = MODES  # both are the package's operators: a wrong product of either fails the run
DEVICES = ("cpu",)
QUICK = {"rows": 64, "min_time": 0.05}
SEED = 0
RANK = 8
K = 8
"""Vectors per matmat."""


def adapted_mlp(rows: int) -> tuple[torch.nn.Module, tuple[str, ...], tuple[torch.Tensor, torch.Tensor]]:
    """The RFA study's trained digits MLP (mislabeled scenario, seed 0) with rank-8 adapters on both layers and
    B ~ N(0, 0.01^2), its adapter parameters' names, and its first ``rows`` retain rows."""
    splits = load_dataset("digits", seed=SEED)
    config = StudyConfig(model="mlp", protocol="mislabeled", methods=("original",), seeds=(SEED,), cache_dir=None,
                         forget_fraction=0.1)
    train_split, (request,), _ = build_scenario(config, splits, SEED)
    _, retain = request.apply(train_split)
    model = init_model(lambda: build_model("mlp", splits.input_shape, splits.num_classes), SEED)
    train(model, train_split, config.train_recipe(SEED))
    lora.add_adapters(model, "*", rank=RANK)
    with torch.no_grad():  # B != 0, as after a first step
        for adapter in lora.adapter_modules(model).values():
            adapter.lora_b.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(SEED))
    return model, lora.adapter_parameter_names(model), (retain.x[:rows], retain.y[:rows])


def run(device: torch.device, *, rows: int = 512, min_time: float = 1.0) -> tuple[list[Measurement], dict]:
    """Both modes' matvec and matmat over K vectors, gated against float64, timed interleaved."""
    model, names, (x, y) = adapted_mlp(rows)
    operators = {mode: hessian_operator(model, F.cross_entropy, (x, y), params=names, mode=mode) for mode in MODES}
    model64 = copy.deepcopy(model).double()
    exact_op = hessian_operator(model64, F.cross_entropy, (x.double(), y), params=names, mode=BASELINE)
    d = operators[BASELINE].shape[0]
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(d, generator=generator)
    block = torch.randn(d, K, generator=generator)
    exact = {"matvec": exact_op.matvec(v.double()), f"matmat K={K}": exact_op.matmat(block.double())}
    # double backward's float32 products, one vector at a time: the gates (twice their error) and the differences
    plain = {"matvec": operators[BASELINE].matvec(v),
             f"matmat K={K}": torch.stack([operators[BASELINE].matvec(column) for column in block.T], dim=1)}
    calls = {"matvec": lambda op: (lambda: op.matvec(v)), f"matmat K={K}": lambda op: (lambda: op.matmat(block))}
    results, timed = [], []
    for product, call in calls.items():
        case = f"digits-mlp adapters r{RANK}, {rows} rows {product}"
        check_plain(plain[product], exact[product])
        floor = 16 * torch.finfo(torch.float32).eps * exact[product].abs().max().item()
        tol = plain_error_tolerance(plain[product], exact[product], floor)
        for mode, op in operators.items():
            fn = call(op)
            m = check(case, mode, fn, exact[product], tol)
            if m.status == "ok":
                m.extra["relative_difference_to_double_backward"] = float(
                    (fn() - plain[product]).norm() / plain[product].norm())
                timed.append((m, fn))
            results.append(m)
    measure_interleaved(timed, device, min_time=min_time)
    config = {"model": "digits mlp (the RFA study's, mislabeled scenario, seed 0)", "rank": RANK, "d": d,
              "rows": rows, "K": K, "threads": torch.get_num_threads(), "baseline": BASELINE, "min_time_s": min_time,
              "gate": "max abs error <= 2 x float32 double backward's error against float64 + 16 eps",
              "timing": "measure_interleaved, every candidate and product together"}
    return results, config
