"""The RFA study of docs/rfa.md: RFA (several shift targets) vs LoTUS vs CureNewton (all weights and
LoRA adapters only) vs first-order baselines, against the retrained oracle, on digits with the MLP
and the CNN, under the random (10%), mislabeled (10%) and class (class 3) protocols, seeds 0-2.

    python examples/rfa_study.py [--out runs/rfa] [--seeds 0 1 2] [--models mlp cnn]
    python examples/rfa_study.py --out docs/rfa   # rewrites the committed study

Writes ``results.json`` (one record per model, protocol, seed and method), ``summary.md`` (the tables
of docs/rfa.md) and two plots into ``--out``. One thread (timings comparable across methods).
The timing of docs/rfa.md's adapter Hessian-vector products is a benchmark: ``python -m benchmarks lora_hvp``.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from unlearn_kernels.checkpoint import atomic_write, save_figure, save_json
from unlearn_kernels.cli import UsageError, check_out_folder, path_argument
from unlearn_kernels.data import load_dataset, remove_classes
from unlearn_kernels.eval import (
    accuracy,
    activation_distance,
    avg_gap,
    js_divergence,
    mia_entropy,
    predict_logits,
    rf_jsd,
)
from unlearn_kernels.methods import METHODS
from unlearn_kernels.models import build_model
from unlearn_kernels.report import new_figure
from unlearn_kernels.study import StudyConfig, build_scenario, gap_closed
from unlearn_kernels.training import init_model, train

PROTOCOLS = ("random", "mislabeled", "class")
#: the files the study writes into --out
OUTPUTS = ("results.json", "summary.md", "gap_closed.png", "rf_jsd_vs_jsd.png")
FORGET_CLASS = 3
#: label -> (method name, options); Newton methods get the recipe's weight decay (their training objective)
METHOD_SPECS = {
    "original": ("original", {}),
    "finetune": ("finetune", {}),
    "neggrad_plus": ("neggrad_plus", {}),
    "lotus": ("lotus", {}),
    "cure_newton": ("cure_newton", {"weight_decay": 5e-4}),
    "cure_newton_lora": ("cure_newton_lora", {"weight_decay": 5e-4}),
    "rfa": ("rfa", {}),
    "rfa:margin": ("rfa", {"shift": "margin"}),
    "rfa:unseen_class": ("rfa", {"shift": "unseen_class"}),
    "rfa:other_class": ("rfa", {"shift": "other_class"}),
    "rfa:no_shift": ("rfa", {"lam": 1e-12}),
}


def setting(model_name: str, protocol: str, seed: int) -> dict:
    splits = load_dataset("digits", seed=seed)
    # the forget request exactly as `unlearn-kernels run` builds it for this protocol and seed
    # each protocol takes only its own option: a fraction, or the classes
    options = {"forget_classes": (FORGET_CLASS,)} if protocol == "class" else {"forget_fraction": 0.1}
    config = StudyConfig(model=model_name, protocol=protocol, methods=("original",), seeds=(seed,), cache_dir=None,
                         **options)
    train_split, (request,), _ = build_scenario(config, splits, seed)
    test = remove_classes(splits.test, [FORGET_CLASS]) if protocol == "class" else splits.test
    forget, retain = request.apply(train_split)
    true_forget_y = splits.train.y[request.forget_idx]
    factory = lambda: build_model(model_name, splits.input_shape, splits.num_classes)  # noqa: E731
    recipe = config.train_recipe(seed)
    original = init_model(factory, seed)
    train(original, train_split, recipe)
    start = time.perf_counter()
    oracle = init_model(factory, seed)
    train(oracle, retain, recipe)
    return {"forget": forget, "retain": retain, "test": test, "unseen": splits.val, "original": original,
            "oracle": oracle, "oracle_seconds": time.perf_counter() - start, "true_forget_y": true_forget_y}


def metrics(model, s: dict, seed: int) -> tuple[dict, torch.Tensor]:
    logits = {k: predict_logits(model, s[k]) for k in ("forget", "retain", "test")}
    m = {"acc_forget": accuracy(logits["forget"], s["forget"].y),
         "acc_forget_true": accuracy(logits["forget"], s["true_forget_y"]),
         "acc_retain": accuracy(logits["retain"], s["retain"].y),
         "acc_test": accuracy(logits["test"], s["test"].y),
         "mia": mia_entropy(logits["retain"], logits["test"], logits["forget"], seed=seed)}
    return m, logits["forget"]


def run(models, seeds) -> list[dict]:
    records = []
    for model_name in models:
        for protocol in PROTOCOLS:
            for seed in seeds:
                s = setting(model_name, protocol, seed)
                oracle_m, oracle_forget = metrics(s["oracle"], s, seed)
                unseen_logits = predict_logits(s["original"], s["unseen"])
                base = {"model": model_name, "protocol": protocol, "seed": seed}
                records.append({**base, "method": "retrain", "seconds": s["oracle_seconds"], **oracle_m,
                                "avg_gap": 0.0, "js_to_oracle": 0.0, "activation_distance": 0.0})
                for label, (name, options) in METHOD_SPECS.items():
                    method = METHODS[name](**options)
                    start = time.perf_counter()
                    result = method.unlearn(s["original"], s["forget"], s["retain"], unseen=s["unseen"], seed=seed)
                    seconds = time.perf_counter() - start
                    m, forget_logits = metrics(result.model, s, seed)
                    m["avg_gap"] = avg_gap(m, oracle_m, keys=("mia", "acc_forget", "acc_retain", "acc_test"))
                    m["js_to_oracle"] = js_divergence(forget_logits, oracle_forget)
                    m["activation_distance"] = activation_distance(forget_logits, oracle_forget)
                    if protocol != "class":  # RF-JSD compares with unseen data of the forget classes
                        m["rf_jsd"] = rf_jsd(forget_logits, s["forget"].y, unseen_logits, s["unseen"].y)
                    if protocol == "mislabeled":  # the same with the true labels, which a user would not have
                        m["rf_jsd_true"] = rf_jsd(forget_logits, s["true_forget_y"], unseen_logits, s["unseen"].y)
                    records.append({**base, "method": label, "seconds": seconds, **m})
                print(f"{model_name} {protocol} seed {seed}: done", flush=True)
    return records


def summary(records: list[dict]) -> str:
    lines = []
    for model_name in dict.fromkeys(r["model"] for r in records):
        for protocol in PROTOCOLS:
            rows = [r for r in records if r["model"] == model_name and r["protocol"] == protocol]
            if not rows:
                continue
            lines += [f"### {model_name}, {protocol}", "",
                      "| method | Acc_f | Acc_f gap closed | Acc_r | Acc_test | MIA | Avg Gap | JS to oracle | "
                      "activation distance | RF-JSD | seconds |", "|---" * 11 + "|"]
            orig = {r["seed"]: r["acc_forget"] for r in rows if r["method"] == "original"}
            oracle = {r["seed"]: r["acc_forget"] for r in rows if r["method"] == "retrain"}
            for label in ["retrain", *METHOD_SPECS]:
                mine = [r for r in rows if r["method"] == label]
                closed_cell = _cell(_closed(mine, orig, oracle), len(mine), 2, spread=False)

                def fmt(key, digits=3):
                    return _cell([r[key] for r in mine if key in r], len(mine), digits)
                lines.append(f"| {label} | {fmt('acc_forget')} | {closed_cell} | {fmt('acc_retain')} | "
                             f"{fmt('acc_test')} | {fmt('mia')} | {fmt('avg_gap')} | {fmt('js_to_oracle', 4)} | "
                             f"{fmt('activation_distance')} | {fmt('rf_jsd', 4)} | {fmt('seconds', 2)} |")
            nothing = [seed for seed in orig if orig[seed] == oracle[seed]]
            if nothing:  # the wording of the study's own note (report.format_noise_note)
                lines.append(f"Original's Acc_f gap 0 on seed(s) {nothing}: nothing to close there ('Acc_f gap closed' "
                             "is undefined where the Original's gap is 0: left out of the mean over seeds, marked "
                             "(k/n seeds), '-' where no seed has it).")
            lines.append("")
    lines += ["Pearson correlation of RF-JSD and JS to the oracle over (model, seed, method) records, the oracle's "
              "own rows left out:", "", "| records | RF-JSD from | n | Pearson r |", "|---|---|---|---|"]
    for what, protocols, key in (("random + mislabeled", ("random", "mislabeled"), "rf_jsd"),
                                 ("random", ("random",), "rf_jsd"), ("mislabeled", ("mislabeled",), "rf_jsd"),
                                 ("mislabeled", ("mislabeled",), "rf_jsd_true")):
        pairs = [(r[key], r["js_to_oracle"]) for r in records
                 if r["protocol"] in protocols and key in r and r["method"] != "retrain"]
        if len(pairs) > 2:
            source = "the true labels" if key == "rf_jsd_true" else "D_f's labels"
            lines.append(f"| {what} | {source} | {len(pairs)} | {pearson(pairs):.3f} |")
    return "\n".join(lines)


def _cell(values: list[float], seeds: int, digits: int, spread: bool = True) -> str:
    """A table cell as the study's tables write one: the mean over the seeds where the value is defined
    (NaN is undefined: left out) with, where ``spread``, the sample std over two or more of them,
    " (k/n seeds)" where they are fewer than the method's ``seeds``, "-" where there is none."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return "-"
    cell = f"{np.mean(defined):.{digits}f}"
    if spread and len(defined) > 1:  # no spread from one seed (a sample std would be nan)
        cell += f" ± {np.std(defined, ddof=1):.{digits}f}"
    return cell + (f" ({len(defined)}/{seeds} seeds)" if len(defined) < seeds else "")


def _closed(records: list[dict], original: dict[int, float], oracle: dict[int, float]) -> list[float]:
    """The Acc_f gap closed of each record against the Original's and the oracle's Acc_f of its seed, the
    seeds where the Original's gap is 0 left out (nothing to close: undefined, as in the study's reports)."""
    closed = (gap_closed(r["acc_forget"] - oracle[r["seed"]], original[r["seed"]] - oracle[r["seed"]])
              for r in records)
    return [c for c in closed if c is not None]


def pearson(pairs: list[tuple[float, float]]) -> float:
    return float(np.corrcoef(np.array(pairs).T)[0, 1])


def plots(records: list[dict], out: Path) -> None:
    labels = [m for m in METHOD_SPECS if m != "original"]
    models = list(dict.fromkeys(r["model"] for r in records))  # those run (--models), in their order
    fig = new_figure(figsize=(6.5 * len(models), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(models), sharey=True))
    for ax, model_name in zip(axes, models):
        for k, protocol in enumerate(PROTOCOLS):
            rows = [r for r in records if r["model"] == model_name and r["protocol"] == protocol]
            if not rows:
                continue
            oracle = {r["seed"]: r["acc_forget"] for r in rows if r["method"] == "retrain"}
            orig = {r["seed"]: r["acc_forget"] for r in rows if r["method"] == "original"}
            per_seed = [_closed([r for r in rows if r["method"] == label], orig, oracle) for label in labels]
            closed = [np.mean(values) if values else np.nan for values in per_seed]  # nan: no bar
            ax.bar(np.arange(len(labels)) + (k - 1) * 0.27, closed, width=0.27, label=protocol)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylim(-1.05, 1.1)  # a bar below -1 (a gap within seed noise, e.g. random) is cut; the table has it
        ax.set_xticks(np.arange(len(labels)), labels, rotation=45, ha="right")
        ax.set_title(f"digits, {model_name}: Acc_f gap closed (1 = oracle)")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, out / "gap_closed.png")

    pairs = [(r["rf_jsd"], r["js_to_oracle"], r["method"]) for r in records
             if "rf_jsd" in r and r["method"] != "retrain"]
    fig = new_figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    ax.set_xlabel("RF-JSD (no oracle needed)")
    ax.set_ylabel("JS to the oracle on D_f")
    for protocol, marker in (("random", "o"), ("mislabeled", "x")):
        mine = [(r["rf_jsd"], r["js_to_oracle"]) for r in records
                if r["protocol"] == protocol and "rf_jsd" in r and r["method"] != "retrain"]
        ax.scatter([p[0] for p in mine], [p[1] for p in mine], s=14, marker=marker,
                   label=f"{protocol} (r = {pearson(mine):.2f})")
    ax.legend()
    ax.set_title(f"digits, {' + '.join(m.upper() for m in models)}: Pearson r = "
                 f"{pearson([p[:2] for p in pairs]):.2f} overall")
    fig.tight_layout()
    save_figure(fig, out / "rf_jsd_vs_jsd.png")


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically, as the study writes its results (an interrupted run leaves the
    committed file as it was)."""
    atomic_write(path, lambda handle: handle.write(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out", type=path_argument, default="runs/rfa",
                        help="output folder (default runs/rfa; docs/rfa rewrites the committed study)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    # the plots have a panel for each of these two
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn"), help="mlp and/or cnn (default both)")
    args = parser.parse_args()
    # every check before the study, not when a later model or seed, or the results, fail after it
    seeds, models = args.seeds or [0, 1, 2], args.models or ["mlp", "cnn"]
    if len(set(models)) < len(models):  # its records would count twice in mean ± std
        parser.error(f"--models repeats a model: {models}")
    try:
        StudyConfig(methods=("original",), seeds=tuple(seeds), cache_dir=None)  # the study's seed rules
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    try:
        check_out_folder(out, [out / name for name in OUTPUTS])
    except UsageError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)
    records = run(models, seeds)
    # strict JSON: an undefined value (NaN) is null, as in the study's results.json
    save_json({"config": {"dataset": "digits", "seeds": seeds, "models": models, "methods": METHOD_SPECS},
               "records": records}, out / "results.json")
    text = summary(records)
    write_text(out / "summary.md", text + "\n")
    plots(records, out)
    print(text)


if __name__ == "__main__":
    main()
