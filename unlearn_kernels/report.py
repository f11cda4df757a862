"""Turns a study's records into the printed table, ``results.json`` and PNG plots, and several
studies (the scenarios of a plain ``unlearn-kernels run``) into one summary table, JSON and plot.

"Gap closed" (per record, from :func:`unlearn_kernels.study.add_gap_closed`) is
1 - |gap(method)| / |gap(Original)| for Acc_f and for Avg Gap. It only ranks methods where the
Original's gap stands out of seed noise; :func:`gap_closed_noise` applies the rule: the Original's
mean gap over seeds must be more than :data:`NOISE_FACTOR` standard errors (std / sqrt(seeds)), taking
the larger of the standard error of the oracle's metric (for Avg Gap, the mean of the standard
errors of its four metrics) and that of the Original's own gap.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import refuse_empty_path, save_figure, save_json, software_versions
from .checks import check_int
from .eval import AVG_GAP_KEYS
from .study import GAP_CLOSED

#: (metric key, column title, format) of the printed table (a column no method has is left out, e.g.
#: "Acc_f so far" outside sequential runs); the JSON has every metric
TABLE_COLUMNS = (
    ("acc_forget", "Acc_f", "{:.3f}"),
    ("acc_forgotten_so_far", "Acc_f so far", "{:.3f}"),
    ("acc_retain", "Acc_r", "{:.3f}"),
    ("acc_test", "Acc_test", "{:.3f}"),
    ("mia_entropy", "MIA(ent)", "{:.3f}"),
    ("js_to_oracle", "JS(f,gold)", "{:.4f}"),
    ("avg_gap", "AvgGap", "{:.3f}"),
    ("gap_closed_acc_forget", "closed Acc_f", "{:.2f}"),
    ("gap_closed_avg_gap", "closed AvgGap", "{:.2f}"),
    ("tug_of_war", "ToW", "{:.3f}"),
    ("seconds", "time s", "{:.2f}"),
    ("speedup", "speed-up", "{:.1f}"),
)

#: the Original's gap is within seed noise when below this many standard errors of the oracle's metric
NOISE_FACTOR = 2.0

#: the gap-closed figures by name, with their column titles
GAP_CLOSED_TITLES = {"acc_forget": "Acc_f", "avg_gap": "AvgGap"}

#: the files of one study's folder (``results.json`` and the plots of :func:`write_plots`) and of the
#: summary of several scenarios (``summary.json`` and the gap-closed plot)
RESULTS_FILE, SUMMARY_FILE = "results.json", "summary.json"
TIME_PLOT, GAPS_PLOT = "forget_accuracy_vs_time.png", "gaps_to_oracle.png"
GAP_CLOSED_PLOT, SEQUENTIAL_PLOT = "gap_closed.png", "sequential.png"
#: every plot a study's folder may hold
PLOT_FILES = (TIME_PLOT, GAPS_PLOT, GAP_CLOSED_PLOT, SEQUENTIAL_PLOT)


def study_files(methods: Iterable[str], requests: int) -> tuple[str, ...]:
    """The names of the files a study of ``methods`` over ``requests`` requests writes in its folder:
    the results, the two plots every study has, the gap-closed plot (with an "original" row) and the
    sequential plot (more than one request).

    Raises:
        TypeError: ``methods`` is a single str (``"original" in "original_x"`` would hold), not a collection.
        ValueError: ``requests`` is not an int >= 1.
    """
    if isinstance(methods, (str, bytes)):
        raise TypeError(f"study_files: methods must be a collection of method names, not a single str ({methods!r})")
    check_int("study_files: requests", requests)
    return (RESULTS_FILE, TIME_PLOT, GAPS_PLOT, *((GAP_CLOSED_PLOT,) if "original" in methods else ()),
            *((SEQUENTIAL_PLOT,) if requests > 1 else ()))


#: what a study's record (an entry of results.json's "records") holds, with the types the report reads
_RECORD_FIELDS = {"seed": (numbers.Integral, "an int"), "request": (numbers.Integral, "an int"),
                  "method": (str, "a str"), "metrics": (Mapping, "a dict")}


def _check_records(owner: str, records: Any, fields: tuple[str, ...] = ("request", "method", "metrics"),
                   *, empty: bool = True) -> list[dict[str, Any]]:
    """``records`` as a list if it is a collection of study records, each a dict holding ``fields`` of the
    types the report reads, else TypeError / ValueError naming ``owner`` and the first bad record
    (instead of a KeyError deep in the report); ValueError for none at all unless ``empty``."""
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise TypeError(f"{owner}: records must be a list of study records (results.json's 'records'), got "
                        f"{type(records).__name__}")
    records = list(records)
    if not records and not empty:
        raise ValueError(f"{owner}: records is empty: there is no request to report on")
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"{owner}: records[{i}] must be a dict (a study record), got {type(record).__name__}")
        for key in fields:
            kind, what = _RECORD_FIELDS[key]
            if key not in record:
                raise ValueError(f"{owner}: records[{i}] has no {key!r} (a study record, as in results.json's "
                                 f"'records', has {', '.join(_RECORD_FIELDS)})")
            if not isinstance(record[key], kind) or isinstance(record[key], bool):
                raise TypeError(f"{owner}: records[{i}][{key!r}] must be {what}, got {type(record[key]).__name__}")
    return records


def _check_study(owner: str, study: Any, *keys: str, empty: bool = False) -> list[dict[str, Any]]:
    """The records of ``study`` (a dict holding a ``records`` list, non-empty unless ``empty``, and
    ``keys``), checked by :func:`_check_records`, else TypeError / ValueError naming ``owner``."""
    if not isinstance(study, Mapping):
        raise TypeError(f"{owner}: study must be a dict with 'config' and 'records' (as run_study returns), got "
                        f"{type(study).__name__}")
    for key in ("records", *keys):
        if key not in study:
            raise ValueError(f"{owner}: the study has no {key!r} (as run_study returns and results.json holds)")
    return _check_records(owner, study["records"], empty=empty)


def _check_studies(owner: str, studies: Any) -> None:
    """TypeError / ValueError naming ``owner`` unless ``studies`` is a non-empty dict of scenario name ->
    study, each with records (:func:`_check_study`)."""
    if not isinstance(studies, Mapping):
        raise TypeError(f"{owner}: studies must be a dict of scenario name -> study, got {type(studies).__name__}")
    if not studies:
        raise ValueError(f"{owner}: studies is empty: there is no scenario to report on")
    for name, study in studies.items():
        _check_study(f"{owner}: scenario {name!r}", study)


def _method_order(methods) -> list[str]:
    return sorted(methods, key=lambda m: (m != "retrain", m != "original", m))


class Figure(tuple):
    """A metric over seeds: the pair ``(mean, std)``, and ``seeds``, how many records it averages
    (fewer than the study's seeds where the metric is undefined on some, e.g. a gap closed on a seed
    where the Original's gap is 0; the tables mark such a cell)."""

    seeds: int

    def __new__(cls, mean: float, std: float, seeds: int) -> Figure:
        figure = super().__new__(cls, (mean, std))
        figure.seeds = seeds
        return figure

    def __getnewargs__(self) -> tuple[float, float, int]:  # copy and pickle rebuild it with its count
        return (self[0], self[1], self.seeds)


def _figure(values: list[float]) -> Figure:
    """Mean and sample std of ``values``; equal values give themselves and std 0 exactly (not a
    rounding residue that a table would print as "±0.000")."""
    if all(v == values[0] for v in values):
        return Figure(values[0], 0.0, len(values))
    mean = math.fsum(values) / len(values)  # finite values: summarize leaves NaN and Inf out
    return Figure(mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)), len(values))


def _seeds_of(figure: Any) -> int | None:
    """How many seeds a figure averages: a :class:`Figure`'s count, None for a plain (mean, std) pair."""
    return figure.seeds if isinstance(figure, Figure) else None


def seeds_note(figure: Any, seeds: int) -> str:
    """" (k/n seeds)" for a figure over fewer records than its method's seeds, else ""."""
    count = _seeds_of(figure)
    return f" ({count}/{seeds} seeds)" if count is not None and count < seeds else ""


def _is_figure(value: Any) -> bool:
    """Whether a record's metric value counts as a figure: a finite real number, not a bool (NaN and Inf are what
    results.json stores as null, numpy scalars count)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def summarize(records: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Figure]]]:
    """``{request: {method: {metric: Figure (mean, std over seeds)}}}`` (std is 0 for a single seed).

    Metrics that are not finite numbers in some record (e.g. a gap closed that is undefined, None; a NaN,
    which results.json stores as null) are averaged over the records where they are; the figure's ``seeds``
    says over how many.

    Raises:
        TypeError / ValueError: ``records`` is not a list of study records (dicts with ``request``,
            ``method`` and a ``metrics`` dict, as results.json's "records").
    """
    records = _check_records("summarize", records)
    grouped: dict[int, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        for key, value in r["metrics"].items():
            # NaN and Inf as None, as results.json writes them: the summary is the same read back from it
            # (numpy scalars too: np.float32(0.9) was left out like None)
            if _is_figure(value):
                grouped[r["request"]][r["method"]][key].append(float(value))
    return {request: {method: {key: _figure(values) for key, values in metrics.items()}
                      for method, metrics in methods.items()} for request, methods in grouped.items()}


def gap_closed_noise(records: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """Per request, for Acc_f and Avg Gap: the Original's gap and whether it is within seed noise.

    ``{request: {"acc_forget" | "avg_gap": {"original_gap", "noise", "within_noise", "nothing_to_close",
    "seeds"}}}``: ``original_gap`` is |mean over seeds of the Original's gap| (Avg Gap: its mean Avg Gap);
    ``noise`` is :data:`NOISE_FACTOR` x the larger of two standard errors over seeds: that of the
    oracle's metric (Avg Gap: the mean of the standard errors of its four metrics), i.e. how much
    the target itself moves, and that of the Original's gap, i.e. whether the gap is consistently
    there; ``within_noise`` is ``original_gap <= noise`` (a gap of 0 is within any noise: there is
    nothing to close; a gap equal to the noise is within it, compared with a relative tolerance of
    1e-9, since with three seeds per-seed gaps (0, g, g) put the mean exactly on two standard errors
    up to rounding). ``nothing_to_close`` says whether the Original's gap is 0 on every seed (it has the
    oracle's value: gap closed is undefined for every method), which opposite gaps that average to 0 are
    not. With one seed ``noise`` and ``within_noise`` are None (unknown); requests without an "original"
    record, or without a finite value on any seed of a figure the rule reads, are left out.

    Raises:
        TypeError / ValueError: as :func:`summarize`, and a record without an int ``seed``.
    """
    records = _check_records("gap_closed_noise", records, tuple(_RECORD_FIELDS))
    summary = summarize(records)
    seeds: dict[int, set[int]] = defaultdict(set)
    for r in records:
        if r["method"] == "retrain":
            seeds[r["request"]].add(r["seed"])
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for request, per_method in summary.items():
        original, oracle, n = per_method.get("original"), per_method.get("retrain"), len(seeds[request])
        if (original is None or oracle is None or not {"gap_acc_forget", "avg_gap"} <= original.keys()
                or not set(AVG_GAP_KEYS) <= oracle.keys()):  # no figure of the rule's on any seed (all NaN)
            continue
        standard_error = {key: oracle[key][1] / math.sqrt(n) for key in AVG_GAP_KEYS}
        candidates = {
            "acc_forget": (abs(original["gap_acc_forget"][0]),
                           max(standard_error["acc_forget"], original["gap_acc_forget"][1] / math.sqrt(n))),
            "avg_gap": (original["avg_gap"][0], max(sum(standard_error.values()) / len(standard_error),
                                                    original["avg_gap"][1] / math.sqrt(n))),
        }
        out[request] = {}
        for name, (gap, se) in candidates.items():
            noise = NOISE_FACTOR * se if n > 1 else None
            out[request][name] = {"original_gap": gap, "noise": noise,
                                  "within_noise": None if noise is None else bool(gap <= noise * (1 + 1e-9)),
                                  # every seed's gap is 0 (opposite gaps that average to 0 are something to close)
                                  "nothing_to_close": not any(original[GAP_CLOSED[name]]), "seeds": n}
    return out


def format_table(summary: dict[str, dict[str, tuple[float, float]]], title: str = "") -> str:
    """One row per method (mean +- std), the retrain oracle first.

    ``summary`` is one request's ``{method: {metric: (mean, std)}}``: ``summarize(records)[request]``.

    Raises:
        TypeError: ``summary`` is not of that form (e.g. all of ``summarize``'s output, or results.json's
            "summary", whose figures are ``{"mean", "std"}`` dicts).
    """
    _check_summary(summary)
    # a gap-closed column stays beside an Original row where the figure is undefined (the Original's gap is 0:
    # "-", with the note of format_noise_note), rather than vanishing from the table
    columns = [c for c in TABLE_COLUMNS if any(c[0] in metrics for metrics in summary.values())
               or (c[0].removeprefix("gap_closed_") in GAP_CLOSED_TITLES and "original" in summary)]
    cells = [["method"] + [title for _, title, _ in columns]]
    for method in _method_order(summary):
        row = [method + (" (oracle)" if method == "retrain" else "")]
        seeds = max((_seeds_of(figure) or 1) for figure in summary[method].values())
        for key, _, fmt in columns:
            if key in summary[method]:
                mean, std = summary[method][key]
                row.append(fmt.format(mean) + ("±" + fmt.format(std) if std else "")
                           + seeds_note(summary[method][key], seeds))
            else:
                row.append("-")
        cells.append(row)
    table = _layout(cells, title)
    failed = _failed_shares(summary)
    if failed:
        table += "\n" + "; ".join(f"{m} raised on {share:.0%} of the seeds" for m, share in sorted(failed.items())) + \
            " (its error is in the JSON diagnostics; those rows measure the model it was given, unchanged)"
    return table


def _check_summary(summary: Any) -> None:
    hint = "pass one request's summary, summarize(records)[request] (of results.json's 'records')"
    if not isinstance(summary, Mapping):
        raise TypeError(f"format_table: summary must be a dict of method -> {{metric: (mean, std)}}, got "
                        f"{type(summary).__name__}; {hint}")
    for method, metrics in summary.items():
        if not isinstance(method, str) or not isinstance(metrics, Mapping):
            raise TypeError(f"format_table: summary must map method names to {{metric: (mean, std)}}, got "
                            f"{method!r}: {type(metrics).__name__}; {hint}")
        for key, value in metrics.items():
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)):
                raise TypeError(f"format_table: summary[{method!r}][{key!r}] must be a (mean, std) pair of numbers, "
                                f"got {value!r}; {hint}")


def _layout(cells: list[list[str]], title: str) -> str:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = [title] if title else []
    for i, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def format_noise_note(noise: dict[str, dict[str, Any]]) -> str:
    """One line per gap-closed figure saying whether the Original's gap stands out of seed noise.

    ``noise``: one request's entry of :func:`gap_closed_noise` (TypeError naming what is missing
    otherwise: all of its output, keyed by request, or an empty dict)."""
    if not (isinstance(noise, dict) and all(isinstance(noise.get(name), dict) for name in GAP_CLOSED_TITLES)):
        got = sorted(map(str, noise)) if isinstance(noise, dict) else type(noise).__name__
        raise TypeError(f"format_noise_note: noise must be one request's entry of gap_closed_noise, a dict with "
                        f"{sorted(GAP_CLOSED_TITLES)}, got {got}")
    lines = []
    for name, title in GAP_CLOSED_TITLES.items():
        n = noise[name]
        head = f"Original's {title} gap {n['original_gap']:.3f}: "
        if n["nothing_to_close"]:  # whatever the noise: there is no gap closed to rank ('-' in the table)
            lines.append(head + f"nothing to close ('closed {title}' is undefined where the Original's gap is 0: "
                         "null in the JSON's records, '-' in the table).")
        elif n["within_noise"] is None:
            lines.append(head + "seed noise unknown with one seed; 'closed " + title + "' may not rank methods.")
        elif n["within_noise"]:
            lines.append(head + f"WITHIN seed noise (<= {n['noise']:.3f} = {NOISE_FACTOR:g} standard errors over "
                         f"{n['seeds']} seeds): 'closed {title}' does not rank methods here.")
        else:
            lines.append(head + f"outside seed noise ({NOISE_FACTOR:g} standard errors over {n['seeds']} seeds: "
                         f"{n['noise']:.3f}).")
    return "\n".join(lines)


def _last_request_gap_closed(records: list[dict[str, Any]]) -> tuple[dict[str, dict[str, tuple[float, float]]], dict,
                                                                     dict[str, float]]:
    """(``{method: {name: (mean, std)}}`` of the gap-closed figures, noise, :func:`_raised_shares`) at the last
    request."""
    summary = summarize(records)
    last = max(summary)
    closed = {m: {name: metrics[f"gap_closed_{name}"] for name in GAP_CLOSED if f"gap_closed_{name}" in metrics}
              for m, metrics in summary[last].items()}
    return closed, gap_closed_noise(records).get(last, {}), _raised_shares(records)


def _raised_shares(records: list[dict[str, Any]]) -> dict[str, float]:
    """``{method: share of its seeds on which it raised at some request}`` for the methods that did: from there on
    a sequential chain goes on from the model it was given, so its last request's row measures a chain that skipped
    a request."""
    seeds: dict[str, set] = defaultdict(set)
    raised: dict[str, set] = defaultdict(set)
    for r in records:
        seeds[r["method"]].add(r.get("seed"))
        if r["metrics"].get("failed"):
            raised[r["method"]].add(r.get("seed"))
    return {m: len(raised[m]) / len(seeds[m]) for m in seeds if raised[m]}


def _failed_shares(last: dict[str, dict[str, tuple[float, float]]]) -> dict[str, float]:
    """``{method: share of the seeds it raised on}`` for the methods of one request's summary that raised on
    some: their rows measure the model they were given (a 0 gap closed that is no result)."""
    return {m: metrics["failed"][0] for m, metrics in last.items() if metrics.get("failed", (0.0, 0.0))[0] > 0}


def _raised_label(method: str, share: float | None) -> str:
    """A plot's label of ``method``, saying so where it raised on some seeds."""
    return f"{method} (raised on {share:.0%} of seeds)" if share else method


def format_scenario_summary(studies: dict[str, dict[str, Any]]) -> str:
    """Gap closed per method (rows) and scenario (two columns each), mean over seeds at each
    scenario's last request; a trailing ``~`` marks a scenario whose Original's gap is within seed
    noise and ``?`` one where the noise is unknown (one seed).

    Raises:
        TypeError / ValueError: ``studies`` is not a non-empty dict of scenario name -> study with records.
    """
    _check_studies("format_scenario_summary", studies)
    per_scenario = {name: _last_request_gap_closed(study["records"]) for name, study in studies.items()}
    methods = _method_order({m for closed, _, _ in per_scenario.values() for m in closed})
    cells = [["method"] + [f"{name} {title}" for name in studies for title in GAP_CLOSED_TITLES.values()]]
    for method in methods:
        row = [method + (" (oracle)" if method == "retrain" else "")]
        for name in studies:
            closed, noise, failed = per_scenario[name]
            for figure in GAP_CLOSED_TITLES:
                value = closed.get(method, {}).get(figure)
                verdict = noise.get(figure, {}).get("within_noise")
                flag = ("~" if verdict is True else "?" if verdict is None else "") + ("!" if method in failed else "")
                seeds = noise.get(figure, {}).get("seeds") or 0
                row.append("-" if value is None else f"{value[0]:.2f}{flag}{seeds_note(value, seeds)}")
        cells.append(row)
    table = _layout(cells, "Gap closed per scenario (1 - |gap| / |Original's gap|, mean over seeds, last request; "
                           "~ = the Original's gap is within seed noise, ? = noise unknown, ! = the method raised)")
    raised = [f"{m} raised on {share:.0%} of the seeds of {name}" for name, (_, _, failed) in per_scenario.items()
              for m, share in sorted(failed.items())]
    if raised:
        table += "\n" + "; ".join(raised) + " (at a request, which then left the model it was given unchanged)"
    return table


def _versions() -> dict[str, str | int]:
    # torch's CPU threads beside the versions: the results change with them (see the guide); a number, as the
    # benchmarks' JSON records it
    return {**software_versions(), "cpu_threads": torch.get_num_threads()}


def write_json(study: dict[str, Any], path: Path) -> Path:
    """``results.json``: config, versions, per-seed records, the mean/std summary per request and the
    seed-noise verdict of the gap-closed figures per request (atomic write).

    Raises:
        TypeError / ValueError: ``study`` is not a dict with ``config`` and a list of records (see
            :func:`summarize`); before anything is written.
    """
    _check_study("write_json", study, "config", empty=True)
    payload = {
        "config": study["config"],
        "versions": _versions(),
        "records": study["records"],
        "summary": {str(k): {m: {key: {"mean": v[0], "std": v[1], "seeds": v.seeds} for key, v in metrics.items()}
                             for m, metrics in per.items()} for k, per in summarize(study["records"]).items()},
        "gap_closed_noise": {str(k): v for k, v in gap_closed_noise(study["records"]).items()},
    }
    return save_json(payload, path)


def write_summary_json(studies: dict[str, dict[str, Any]], results: dict[str, Path],
                       path: str | os.PathLike[str]) -> Path:
    """The summary of several scenarios: per scenario its results file, protocol and, at its last
    request, every method's gap closed (mean, std over seeds) and the seed-noise verdict.

    Raises:
        TypeError / ValueError: as :func:`format_scenario_summary`, a study without a ``config`` protocol,
            or a scenario without its results file in ``results``; before anything is written.
    """
    owner = "write_summary_json"
    path = refuse_empty_path(path, f"{owner}: path is an empty path: name a file")
    _check_studies(owner, studies)
    for name, study in studies.items():
        if not isinstance(study.get("config"), Mapping) or "protocol" not in study["config"]:
            raise ValueError(f"{owner}: scenario {name!r} has no 'config' with a 'protocol'")
        if not isinstance(results, Mapping) or name not in results:
            raise ValueError(f"{owner}: results has no results file for scenario {name!r}")
    scenarios = {}
    for name, study in studies.items():
        closed, noise, failed = _last_request_gap_closed(study["records"])
        scenarios[name] = {
            "results": os.path.relpath(results[name], path.parent),
            "protocol": study["config"]["protocol"],
            "gap_closed": {m: {figure: {"mean": v[0], "std": v[1], "seeds": v.seeds} for figure, v in per.items()}
                           for m, per in closed.items()},
            "gap_closed_noise": noise,
            "failed": failed,
        }
    payload = {"versions": _versions(), "scenarios": scenarios}
    return save_json(payload, path)


def remove_stale_summary(root: Path, scenario: str) -> list[Path]:
    """Removes the summary in ``root`` (``summary.json`` and its gap-closed plot) if it covers ``scenario``,
    whose results a run is about to replace: it would go on describing the old ones. A summary that does not
    name ``scenario``, or cannot be read as one, is left alone. Returns the files removed."""
    path = root / SUMMARY_FILE
    try:
        scenarios = json.loads(path.read_text())["scenarios"]
    except (OSError, ValueError, KeyError, TypeError):  # none there, or not a summary of ours
        return []
    # ours maps each scenario to its protocol and results (write_summary_json); a string that merely contains
    # the scenario's name ("a random-walk study") is someone else's file
    covered = (isinstance(scenarios, dict) and isinstance(scenarios.get(scenario), dict)
               and {"protocol", "results"} <= scenarios[scenario].keys())
    removed = []
    for stale in (path, root / GAP_CLOSED_PLOT) if covered else ():
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed.append(stale)
    return removed


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` of its own (``kwargs``: Figure's, e.g. ``figsize``), outside pyplot: files only,
    nothing to close, and the caller's backend (a notebook's, a GUI's) stays as it is, where
    ``matplotlib.use("Agg")`` switched it for the rest of the process. Saved by
    :func:`unlearn_kernels.checkpoint.save_figure`."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _plain_log_x(ax: Any) -> None:
    """A log x axis (call it once the data are plotted) with plain tick labels (0.01, 0.1, 1), not
    matplotlib's default 10^k ones: those are mathtext, whose fallback fonts a stale matplotlib font
    cache (one left by a deleted environment) cannot find, which printed 21 "findfont" warnings into
    the study's output. An axis spanning less than a decade, which may hold no power of ten, also
    labels its minor ticks at 2, 3 and 5 times one (0.2, 0.3, 0.5)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    low, high = ax.get_xlim()
    narrow = high < 10 * low

    def minor(value: float, _: Any) -> str:
        leading = round(value / 10 ** math.floor(math.log10(value)))
        return f"{value:g}" if narrow and leading in (2, 3, 5) else ""

    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def palette(name: str) -> tuple[Any, ...]:
    """The colours of matplotlib's qualitative colormap ``name`` (``"tab10"``, ``"tab20"``)."""
    import matplotlib

    return matplotlib.colormaps[name].colors


def _method_style(index: int, method: str) -> dict[str, Any]:
    """The colour and marker of the ``index``-th method in a plot (the oracle a large star): tab20's colours with
    nine markers, so that the 16 methods of a study stay apart where matplotlib's 10-colour cycle repeats."""
    retrain = method == "retrain"
    return {"color": palette("tab20")[index % 20], "marker": "*" if retrain else "os^Dvp<>h"[index % 9],
            "markersize": 12 if retrain else 6}


def _per_seed(records: list[dict[str, Any]], request: int, method: str, key: str) -> list[float]:
    """Each seed's ``key`` of ``method`` at ``request``, where it is a finite number (:func:`_is_figure`), as
    :func:`summarize` takes them: a NaN made the plot's bar NaN (no bar) where the table showed the other seeds'."""
    return [float(r["metrics"][key]) for r in records if r["request"] == request and r["method"] == method
            and _is_figure(r["metrics"].get(key))]


def plot_gap_closed(studies: dict[str, dict[str, Any]], path: Path) -> Path:
    """Gap closed in Acc_f and Avg Gap per method: one bar per scenario (mean over seeds at its last
    request) with every seed's value as a point; hatched bars: the Original's gap is within seed
    noise (the legend says so, where one seed leaves the noise unknown, and where the Original has the oracle's
    value, so that there is no bar). Values below -1 are drawn at -1 as downward triangles.

    Raises:
        TypeError / ValueError: as :func:`format_scenario_summary`; before anything is drawn or written.
    """
    _check_studies("plot_gap_closed", studies)
    floor = -1.0
    per_scenario = {name: _last_request_gap_closed(study["records"]) for name, study in studies.items()}
    methods = [m for m in _method_order({m for c, _, _ in per_scenario.values() for m in c}) if m != "retrain"]
    raised = {m: max(failed.get(m, 0.0) for _, _, failed in per_scenario.values()) for m in methods}
    fig = new_figure(figsize=(min(18, max(8, 0.3 * len(methods) * len(studies))), 7))
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(studies)
    colors = palette("tab10")
    for ax, (figure, title) in zip(axes, GAP_CLOSED_TITLES.items()):
        for i, (name, study) in enumerate(studies.items()):
            closed, noise, _ = per_scenario[name]
            last = max(r["request"] for r in study["records"])
            xs = [j + (i - (len(studies) - 1) / 2) * width for j in range(len(methods))]
            means = [closed.get(m, {}).get(figure, (math.nan, 0))[0] for m in methods]
            verdict = noise.get(figure, {}).get("within_noise")
            noisy = verdict is True
            note = (" (nothing to close: the Original has the oracle's value)"
                    if noise.get(figure, {}).get("nothing_to_close") else
                    " (Original's gap within seed noise)" if noisy else
                    " (seed noise unknown: one seed)" if verdict is None and figure in noise else "")
            ax.bar(xs, [max(v, floor) for v in means], width, color=colors[i % len(colors)], alpha=0.6,
                   hatch="//" if noisy else None, label=name + note)
            for x, m in zip(xs, methods):
                values = _per_seed(study["records"], last, m, f"gap_closed_{figure}")
                ax.scatter([x] * len(values), [max(v, floor) for v in values], s=12, color="black", zorder=3,
                           marker="o")
                clipped = [v for v in values if v < floor]
                if clipped:
                    ax.scatter([x], [floor], s=40, color="red", marker="v", zorder=4)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_ylim(floor - 0.1, 1.1)
        ax.set_ylabel(f"gap closed, {title}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars: inside, it hid some
    axes[-1].set_xticks(range(len(methods)))
    axes[-1].set_xticklabels([_raised_label(m, raised[m]) for m in methods], rotation=30, ha="right")
    sequential = any(max(r["request"] for r in study["records"]) > 0 for study in studies.values())
    axes[0].set_title("Gap to the oracle closed (1 = oracle, 0 = Original; points: seeds; red ▼: below -1)"
                      + ("\nat each scenario's last request" if sequential else ""))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path


def write_plots(study: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots: forget accuracy vs unlearning time, |gap| to the oracle per metric, gap closed
    (with an "original" row), and (for sequential studies) accuracy on everything forgotten so far
    after each request.

    ``out_dir``: a folder (a str or ``os.PathLike``), made if missing. A gap-closed or sequential plot
    there that this study does not write (no "original" row, one request) is removed: it would go on
    describing an earlier study.

    Raises:
        TypeError / ValueError: ``study`` is not a dict with a non-empty list of records (see
            :func:`summarize`), has no retrain oracle with ``acc_forget`` at its last request, or has gap-closed
            figures but no ``config`` protocol to label them with; ``out_dir`` is empty; all before any folder
            or file is made.
    """
    owner = "write_plots"
    records = _check_study(owner, study)
    out_dir = refuse_empty_path(out_dir, f"{owner}: out_dir is an empty path: name a folder (\".\" for the "
                                         f"working folder)")
    summary = summarize(records)
    last_request = max(summary)
    last = summary[last_request]
    if "acc_forget" not in last.get("retrain", {}):
        raise ValueError(f"{owner}: the study has no 'retrain' record with acc_forget at its last request "
                         f"{last_request}: the plots measure every method against that oracle")
    has_gap_closed = any("gap_closed_acc_forget" in r["metrics"] for r in records)
    if has_gap_closed and not (isinstance(study.get("config"), Mapping) and "protocol" in study["config"]):
        raise ValueError(f"{owner}: the study has gap-closed figures but no 'config' with a 'protocol' to "
                         f"label their plot with")
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = _method_order(last)
    raised = _raised_shares(records)
    # a sequential study's plots but sequential.png show its last request (the time that request's)
    at_last = f", request {last_request + 1} of {len(summary)}" if len(summary) > 1 else ""
    paths = []

    fig = new_figure(figsize=(8, 5))
    ax = fig.subplots()
    # a method that failed on every seed has no time to place it at; one whose forget accuracy is NaN on every
    # seed (a model whose logits are not finite, in records made elsewhere) no height
    no_time = [m for m in methods if "seconds" not in last[m]]
    no_acc = [m for m in methods if "seconds" in last[m] and "acc_forget" not in last[m]]
    for i, m in enumerate(methods):
        if m in no_time or m in no_acc:
            continue
        (t, t_sd), (a, a_sd) = last[m]["seconds"], last[m]["acc_forget"]
        ax.errorbar(max(t, 1e-4), a, xerr=t_sd, yerr=a_sd, linestyle="none", capsize=3, **_method_style(i, m),
                    label=_raised_label(m, raised.get(m)))
    gold = last["retrain"]["acc_forget"][0]
    ax.axhline(gold, color="grey", ls="--", lw=1, label="oracle Acc_f")
    _plain_log_x(ax)
    ax.set_xlabel("unlearning time (s, log scale)")
    ax.set_ylabel("accuracy on the forget set")
    ax.set_title(f"Forget accuracy vs cost (mean ± std over seeds){at_last}"
                 + (f"\nnot shown, raised on every seed: {', '.join(no_time)}" if no_time else "")
                 + (f"\nnot shown, no finite Acc_f: {', '.join(no_acc)}" if no_acc else ""))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out_dir / TIME_PLOT)
    save_figure(fig, paths[-1], dpi=120)

    # bars: mean |gap| over seeds; points: each seed's |gap| (never below zero, unlike +-std bars)
    keys = ("gap_acc_forget", "gap_acc_retain", "gap_acc_test", "gap_mia_entropy")
    others = [m for m in methods if m != "retrain"]
    fig = new_figure(figsize=(8, 4.5))
    ax = fig.subplots()
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(others))]
        per_seed = [[abs(v) for v in _per_seed(records, last_request, m, key)] for m in others]
        # a metric a method's records lack (records made by hand, a study of other metrics): no bar
        means = [sum(v) / len(v) if v else math.nan for v in per_seed]
        bars = ax.bar(xs, means, width, alpha=0.7, label=key.replace("gap_", "|Δ| "))
        for x, values in zip(xs, per_seed):
            ax.scatter([x] * len(values), values, s=8, color=bars.patches[0].get_facecolor(), edgecolor="black",
                       linewidths=0.5, zorder=3)
    ax.set_xticks(range(len(others)))
    ax.set_xticklabels([_raised_label(m, raised.get(m)) for m in others], rotation=30, ha="right")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("absolute gap to the retrain oracle")
    ax.set_title(f"Gap to the oracle per metric{at_last} (bars: mean over seeds, points: seeds; lower is better)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / GAPS_PLOT)
    save_figure(fig, paths[-1], dpi=120)

    if has_gap_closed:
        paths.append(plot_gap_closed({study["config"]["protocol"]: study}, out_dir / GAP_CLOSED_PLOT))

    if len(summary) > 1:
        panels = {"acc_forgotten_so_far": "accuracy on everything forgotten so far", "acc_test": "test accuracy",
                  "gap_closed_acc_forget": "gap closed in Acc_f (vs the Original at each request)"}
        fig = new_figure(figsize=(15, 4))
        axes = fig.subplots(1, len(panels))
        steps = sorted(summary)
        for i, m in enumerate(methods):
            for ax, key in zip(axes, panels):
                points = [(s + 1, summary[s][m][key][0]) for s in steps if key in summary[s][m]]
                if points:  # a method that raised is named so: its line is the model it was given
                    ax.plot(*zip(*points), **_method_style(i, m), label=_raised_label(m, raised.get(m)))
        for ax, title in zip(axes, panels.values()):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("request")
            ax.set_xticks([s + 1 for s in steps])
        axes[-1].set_ylim(-1.1, 1.1)  # a method far worse than the Original would flatten the others
        axes[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / SEQUENTIAL_PLOT)
        save_figure(fig, paths[-1], dpi=120)
    for name in (GAP_CLOSED_PLOT, SEQUENTIAL_PLOT):  # an earlier study's, which this one does not replace
        if out_dir / name not in paths:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
    return paths
