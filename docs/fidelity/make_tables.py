"""Writes docs/fidelity/tables.md and the sequential plots from the results.json files that run.sh
leaves under docs/fidelity/<run>/<scenario>/ (run it from anywhere after run.sh)."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from unlearn_kernels.checkpoint import save_figure  # noqa: E402
from unlearn_kernels.report import gap_closed_noise, seeds_note, summarize  # noqa: E402

HERE = Path(__file__).resolve().parent
NEWTON = ("cure_newton", "stochastic_cure_newton", "newton_pinv", "damped_newton", "damped_newton_cg", "influence",
          "lissa")
COLUMNS = (("acc_forget", "Acc_f", "{:.3f}"), ("acc_forget_true", "Acc_f (true labels)", "{:.3f}"),
           ("acc_retain", "Acc_r", "{:.3f}"), ("acc_test", "Acc_test", "{:.3f}"), ("avg_gap", "AvgGap", "{:.3f}"),
           ("gap_closed_acc_forget", "closed Acc_f", "{:.2f}"), ("gap_closed_avg_gap", "closed AvgGap", "{:.2f}"),
           ("activation_distance", "act. dist.", "{:.3f}"), ("seconds", "time s", "{:.2f}"),
           ("speedup", "speed-up", "{:.1f}"), ("failed", "failed", "{:.0%}"))


def _cell(figures: dict, key: str, fmt: str) -> str:
    if key not in figures or math.isnan(figures[key][0]):
        return "-"
    mean, std = figures[key]
    note = seeds_note(figures[key], max(figure.seeds for figure in figures.values()))
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std and key != "failed" else "") + note


def _table(payload: dict, request: str) -> list[str]:
    # summarised from the records with today's rules (JSON written by older code may hold older ones)
    summary = summarize(payload["records"])[int(request)]
    methods = ["retrain", "original"] + sorted(m for m in summary if m not in ("retrain", "original"))
    columns = [c for c in COLUMNS if any(c[0] in summary[m] for m in methods)]
    lines = ["| method | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_cell(summary[m], key, fmt) for key, _, fmt in columns) + " |")
    noise = gap_closed_noise(payload["records"]).get(int(request), {})
    for figure, verdict in noise.items():
        if verdict.get("within_noise"):
            lines.append(f"\nThe Original's {figure} gap ({verdict['original_gap']:.3f}) is within seed noise "
                         f"({verdict['noise']:.3f}): its 'closed' column does not rank methods.")
    return lines


def _sequential(name: str, payload: dict) -> list[str]:
    """Per request: CureNewton's (in a run without it, the first Newton-family method's) test-accuracy
    gap to the oracle on every seed, the step norms of the Newton family (mean over seeds), and a plot
    of both."""
    records = payload["records"]
    requests = sorted({r["request"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    by = {(r["seed"], r["request"], r["method"]): r for r in records}
    newton = [m for m in NEWTON if any(r["method"] == m for r in records)]
    twin = any(r["method"] == "retrain_reseeded" for r in records)
    subject = "cure_newton" if any(r["method"] == "cure_newton" for r in records) else newton[0]

    def test_gaps(method: str, q: int) -> list[float]:
        return [by[(s, q, method)]["metrics"]["acc_test"] - by[(s, q, "retrain")]["metrics"]["acc_test"]
                for s in seeds]

    lines = [f"| request | {subject} Acc_test - oracle (per seed) | "
             + ("retrain_reseeded Acc_test - oracle (per seed) | " if twin else "") + "closed Acc_f so far | "
             + " | ".join(f"{m} step norm" for m in newton) + " |", "|---" * (3 + twin + len(newton)) + "|"]
    worst = 0.0
    for q in requests:
        gaps = test_gaps(subject, q)
        worst = min(worst, min(gaps))
        so_far = []
        for s in seeds:
            orig = by[(s, q, "original")]["metrics"]["acc_forgotten_so_far"]
            gold = by[(s, q, "retrain")]["metrics"]["acc_forgotten_so_far"]
            mine = by[(s, q, subject)]["metrics"]["acc_forgotten_so_far"]
            if orig != gold:  # undefined on a seed where the Original already matches the oracle
                so_far.append(1 - abs(mine - gold) / abs(orig - gold))
        norms = []
        for m in newton:
            values = [by[(s, q, m)]["diagnostics"].get("step_norm") for s in seeds if (s, q, m) in by]
            values = [v for v in values if v is not None]
            norms.append(f"{sum(values) / len(values):.3g}" if values else "failed")
        lines.append(f"| {q + 1} | " + ", ".join(f"{g:+.3f}" for g in gaps)
                     + (" | " + ", ".join(f"{g:+.3f}" for g in test_gaps("retrain_reseeded", q)) if twin else "")
                     + (f" | {sum(so_far) / len(so_far):.2f} | " if so_far else " | - | ") + " | ".join(norms) + " |")
    lines.append(f"\nLargest drop of {subject}'s test accuracy below the oracle's, any request and seed: "
                 f"{-worst:.3f}.")
    pairs = len(requests) * len(seeds)
    for method in ("original", subject, "retrain_reseeded"):
        if any(r["method"] == method for r in records):
            below = sum(g < -0.02 for q in requests for g in test_gaps(method, q))
            above = sum(g > 0.02 for q in requests for g in test_gaps(method, q))
            lines.append(f"{method}: test accuracy more than 2 points from the oracle's on {below + above} of {pairs} "
                         f"(request, seed) pairs ({below} below, {above} above).")
            if len(seeds) > 3:  # how often a study of 3 of these seeds would meet the per-pair target
                trios = list(itertools.combinations(seeds, 3))
                clean = sum(all(abs(by[(s, q, method)]["metrics"]["acc_test"] - by[(s, q, "retrain")]["metrics"]
                                    ["acc_test"]) <= 0.02 for s in trio for q in requests) for trio in trios)
                lines.append(f"  of the {len(trios)} sets of 3 of these seeds, {clean} have every pair within 2 "
                             "points.")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in newton:
        means = []
        for q in requests:
            values = [by[(s, q, m)]["diagnostics"].get("step_norm") for s in seeds if (s, q, m) in by]
            values = [v for v in values if v is not None]
            means.append(sum(values) / len(values) if values else float("nan"))
        ax1.semilogy([q + 1 for q in requests], means, marker="o", label=m)
    ax1.set(xlabel="request", ylabel="step norm (mean over seeds)", title="Newton-family step norms")
    ax1.legend(fontsize=7)
    for m in sorted({r["method"] for r in records}):
        accs = [sum(by[(s, q, m)]["metrics"]["acc_test"] for s in seeds) / len(seeds) for q in requests]
        ax2.plot([q + 1 for q in requests], accs, marker="*" if m == "retrain" else ".", label=m,
                 lw=2.5 if m in ("retrain", "cure_newton") else 1)
    ax2.set(xlabel="request", ylabel="test accuracy (mean over seeds)", title="test accuracy per request",
            ylim=(0, 1.02))
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    plot = HERE / f"{name}.png"
    save_figure(fig, plot)
    plt.close(fig)
    return lines + [f"\n![{name}]({plot.name})"]


def main() -> None:
    out = ["# Fidelity tables (generated by make_tables.py from the results.json files beside it)", ""]
    for path in sorted(HERE.glob("*/*/results.json")):
        payload = json.loads(path.read_text())
        name = f"{path.parent.parent.name}/{path.parent.name}"
        config = payload["config"]
        last = str(max(int(k) for k in payload["summary"]))
        out += [f"## {name}", "", f"{config['dataset']}, {config['model']}, protocol {config['protocol']}"
                + (f", {config['sequential']} sequential requests" if config.get("sequential") else "")
                + f", seeds {config['seeds']}; options {json.dumps(config.get('method_options') or {})}; "
                + (f"request {int(last) + 1} (the last)" if config.get("sequential") else "one request"), ""]
        out += _table(payload, last) + [""]
        if config.get("sequential"):
            out += _sequential(name.replace("/", "-"), payload) + [""]
    (HERE / "tables.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
