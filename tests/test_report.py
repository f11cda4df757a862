"""Gap closed and its seed-noise rule on hand-made records, the tables that show them, and the plots."""
import copy
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from unlearn_kernels import report
from unlearn_kernels.eval import AVG_GAP_KEYS
from unlearn_kernels.study import add_gap_closed


def _record(seed: int, method: str, request: int = 0, **metrics: float) -> dict:
    base = {key: 0.5 for key in AVG_GAP_KEYS} | {f"gap_{key}": 0.0 for key in AVG_GAP_KEYS} | {"avg_gap": 0.0}
    return {"seed": seed, "request": request, "method": method, "metrics": base | metrics, "diagnostics": {}}


def _study(oracle_acc_f, original_gap, method_gap, original_avg=0.2, method_avg=0.05, request=0):
    """Per seed: the oracle's Acc_f, the Original's and a method's Acc_f gaps (avg gaps fixed)."""
    records = []
    for seed, (acc, g_orig, g_m) in enumerate(zip(oracle_acc_f, original_gap, method_gap)):
        records += [
            _record(seed, "retrain", request, acc_forget=acc),
            _record(seed, "original", request, acc_forget=acc + g_orig, gap_acc_forget=g_orig, avg_gap=original_avg),
            _record(seed, "cure_newton", request, acc_forget=acc + g_m, gap_acc_forget=g_m, avg_gap=method_avg),
        ]
    return records


def test_gap_closed_per_record_against_the_same_seed_and_request():
    records = _study([0.0, 0.0], [0.4, 0.5], [-0.1, 0.25])
    records += _study([0.0], [0.2], [0.1], request=1)  # seed 0, a second request
    add_gap_closed(records)
    closed = {(r["seed"], r["request"], r["method"]): r["metrics"] for r in records}
    assert closed[(0, 0, "cure_newton")]["gap_closed_acc_forget"] == pytest.approx(1 - 0.1 / 0.4)  # |gap|: sign ignored
    assert closed[(1, 0, "cure_newton")]["gap_closed_acc_forget"] == pytest.approx(0.5)
    assert closed[(0, 1, "cure_newton")]["gap_closed_acc_forget"] == pytest.approx(0.5)  # request 1's own Original
    assert closed[(0, 0, "cure_newton")]["gap_closed_avg_gap"] == pytest.approx(1 - 0.05 / 0.2)
    assert closed[(0, 0, "retrain")]["gap_closed_acc_forget"] == 1.0
    assert closed[(0, 0, "original")]["gap_closed_avg_gap"] == 0.0
    mean, std = report.summarize(records)[0]["cure_newton"]["gap_closed_acc_forget"]
    assert mean == pytest.approx((0.75 + 0.5) / 2) and std == pytest.approx(math.sqrt(2) * 0.125)


def test_gap_closed_is_undefined_where_the_original_matches_the_oracle_and_absent_without_original():
    records = _study([1.0], [0.0], [0.0])
    add_gap_closed(records)
    assert all(r["metrics"]["gap_closed_acc_forget"] is None for r in records)
    assert "gap_closed_acc_forget" not in report.summarize(records)[0]["cure_newton"]  # skipped, not averaged as 0
    alone = [r for r in _study([0.0], [0.3], [0.1]) if r["method"] != "original"]
    add_gap_closed(alone)
    assert all("gap_closed_acc_forget" not in r["metrics"] for r in alone)


def test_noise_rule_two_standard_errors_of_the_oracle():
    # oracle Acc_f over 4 seeds: sample std sqrt(0.04 / 3) = 0.115, standard error half of it -> noise 0.115
    oracle = [0.4, 0.6, 0.4, 0.6]
    noise = 2 * math.sqrt(0.04 / 3) / math.sqrt(4)
    inside = report.gap_closed_noise(_study(oracle, [0.09] * 4, [0.0] * 4))[0]["acc_forget"]
    assert inside["original_gap"] == pytest.approx(0.09) and inside["noise"] == pytest.approx(noise)
    assert inside["within_noise"] is True and inside["seeds"] == 4
    outside = report.gap_closed_noise(_study(oracle, [-0.3] * 4, [0.0] * 4))[0]["acc_forget"]
    assert outside["original_gap"] == pytest.approx(0.3) and outside["within_noise"] is False
    # an oracle that does not move, but an Original's gap that comes and goes with the seed: noise too
    flickering = report.gap_closed_noise(_study([0.0] * 4, [0.0, 0.1, 0.0, 0.1], [0.0] * 4))[0]["acc_forget"]
    assert flickering["original_gap"] == pytest.approx(0.05)
    assert flickering["noise"] == pytest.approx(noise / 2) and flickering["within_noise"] is True  # std 0.058
    # Avg Gap: 2 x the mean standard error of its four metrics; only Acc_f varies here -> noise / 4 = 0.029
    for original_avg, within in ((0.02, True), (0.05, False)):
        avg = report.gap_closed_noise(_study(oracle, [0.3] * 4, [0.0] * 4, original_avg=original_avg))[0]["avg_gap"]
        assert avg["noise"] == pytest.approx(noise / 4) and avg["original_gap"] == pytest.approx(original_avg)
        assert avg["within_noise"] is within


def test_noise_rule_takes_the_larger_standard_error_when_both_move():
    """Both the oracle's Acc_f and the Original's gap vary over the seeds: the noise is 2 x the larger of their
    standard errors, not their sum (with a sum, this gap of 0.2 read as within noise; every other noise test
    moved one source only, where the two agree)."""
    oracle, gaps = [0.4, 0.6, 0.4, 0.6], [0.1, 0.3, 0.1, 0.3]
    se_oracle = float(np.std(oracle, ddof=1)) / 2  # sqrt(4 seeds)
    se_gap = float(np.std(gaps, ddof=1)) / 2
    verdict = report.gap_closed_noise(_study(oracle, gaps, [0.0] * 4))[0]["acc_forget"]
    assert verdict["original_gap"] == pytest.approx(0.2)
    assert verdict["noise"] == pytest.approx(2 * max(se_oracle, se_gap)) and verdict["within_noise"] is False
    wide = [0.2, 0.8, 0.2, 0.8]  # now the oracle's error is the larger one, and it covers the gap
    verdict = report.gap_closed_noise(_study(wide, gaps, [0.0] * 4))[0]["acc_forget"]
    assert verdict["noise"] == pytest.approx(float(np.std(wide, ddof=1))) and verdict["within_noise"] is True


def test_an_original_that_matches_the_oracle_on_every_seed_is_within_noise():
    # gap 0 and noise 0 (nothing moves): nothing to close, not "outside seed noise"
    same = report.gap_closed_noise(_study([0.0] * 3, [0.0] * 3, [0.0] * 3))[0]["acc_forget"]
    assert same["original_gap"] == 0.0 and same["noise"] == 0.0 and same["within_noise"] is True


def test_noise_is_unknown_with_one_seed_and_the_notes_say_each_case():
    one = report.gap_closed_noise(_study([0.5], [0.3], [0.1]))[0]
    assert one["acc_forget"]["noise"] is None and one["acc_forget"]["within_noise"] is None
    assert "unknown with one seed" in report.format_noise_note(one)
    several = report.gap_closed_noise(_study([0.4, 0.6, 0.4, 0.6], [0.09] * 4, [0.0] * 4))[0]
    note = report.format_noise_note(several)
    assert "Acc_f gap 0.090: WITHIN seed noise" in note and "does not rank methods" in note


def test_tables_show_gap_closed_and_flag_noise():
    records = _study([0.4, 0.6, 0.4, 0.6], [0.09] * 4, [0.03] * 4)  # Acc_f gap within noise
    add_gap_closed(records)
    table = report.format_table(report.summarize(records)[0])
    assert "closed Acc_f" in table and "closed AvgGap" in table
    row = next(line for line in table.splitlines() if line.startswith("cure_newton"))
    assert "0.67" in row and "0.75" in row  # 1 - 0.03/0.09 and 1 - 0.05/0.2
    clear = _study([0.0, 0.01], [0.5, 0.5], [0.1, 0.1])
    add_gap_closed(clear)
    summary = report.format_scenario_summary({"mislabeled": {"records": clear}, "random": {"records": records}})
    header, _, *rows = summary.splitlines()[1:]
    assert header.split()[1:] == ["mislabeled", "Acc_f", "mislabeled", "AvgGap", "random", "Acc_f", "random", "AvgGap"]
    newton = next(r for r in rows if r.startswith("cure_newton")).split()
    assert newton[1:] == ["0.80", "0.75", "0.67~", "0.75"]  # random's Acc_f gap is within noise; its AvgGap is not


def test_a_gap_closed_defined_on_some_seeds_only_says_so(tmp_path):
    """A gap closed undefined on seeds where the Original already matched the oracle was averaged over the
    other seeds and shown as a plain mean with no spread, like a mean over every seed."""
    records = _study([0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.5, 0.5, 0.5])
    add_gap_closed(records)
    figure = report.summarize(records)[0]["cure_newton"]["gap_closed_acc_forget"]
    assert tuple(figure) == (pytest.approx(-4.0), 0.0) and figure.seeds == 1
    assert copy.deepcopy(figure).seeds == pickle.loads(pickle.dumps(figure)).seeds == 1
    row = next(line for line in report.format_table(report.summarize(records)[0]).splitlines()
               if line.startswith("cure_newton"))
    assert "-4.00 (1/3 seeds)" in row and row.count("seeds") == 1  # the other figures are over every seed
    summary = report.format_scenario_summary({"random": {"records": records}})
    assert "-4.00~ (1/3 seeds)" in next(line for line in summary.splitlines() if line.startswith("cure_newton"))
    path = report.write_json({"config": {}, "records": records}, tmp_path / "results.json")
    cell = json.loads(path.read_text())["summary"]["0"]["cure_newton"]
    assert cell["gap_closed_acc_forget"]["seeds"] == 1 and cell["acc_forget"]["seeds"] == 3


def test_a_figure_on_two_of_three_seeds_says_so():
    """A gap closed defined on 2 of 3 seeds is marked "(2/3 seeds)" (a version that marked only figures two or
    more seeds short, count < seeds - 1, left it unmarked)."""
    records = _study([0.0, 0.0, 0.0], [0.1, 0.2, 0.0], [0.05, 0.05, 0.05])  # closed 0.5, 0.75, undefined
    add_gap_closed(records)
    figure = report.summarize(records)[0]["cure_newton"]["gap_closed_acc_forget"]
    assert figure.seeds == 2 and figure[0] == pytest.approx(0.625) and figure[1] == pytest.approx(0.125 * math.sqrt(2))
    row = next(line for line in report.format_table(report.summarize(records)[0]).splitlines()
               if line.startswith("cure_newton"))
    assert "(2/3 seeds)" in row and row.count("seeds") == 1  # the other figures are over every seed
    summary = report.format_scenario_summary({"random": {"records": records}})
    assert "(2/3 seeds)" in next(line for line in summary.splitlines() if line.startswith("cure_newton"))


def test_the_scenario_summary_marks_unknown_noise_with_one_seed():
    """One seed: the noise is unknown and the scenario summary flags each figure "?" (a version that flagged only
    within-noise figures "~" showed a plain 0.80)."""
    records = _study([0.0], [0.5], [0.1])
    add_gap_closed(records)
    summary = report.format_scenario_summary({"random": {"records": records}})
    row = next(line for line in summary.splitlines() if line.startswith("cure_newton")).split()
    assert row[1:] == ["0.80?", "0.75?"]  # 1 - 0.1/0.5 and 1 - 0.05/0.2


def test_the_gap_closed_plot_says_where_one_seed_leaves_the_noise_unknown(tmp_path, monkeypatch):
    """The summary table marks a figure over one seed "?"; the plot drew it as a plain bar, like a verdict of
    "outside seed noise". Its legend says the noise is unknown now."""
    records = _study([0.0], [0.5], [0.1])
    add_gap_closed(records)
    drawn = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kwargs: drawn.append(fig) or path)
    report.plot_gap_closed({"random": {"config": {"protocol": "random"}, "records": records}}, tmp_path / "g.png")
    for ax in drawn[0].axes[:2]:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["random (seed noise unknown: one seed)"]
    # an Original with the oracle's Acc_f on every seed: an empty panel, which said nothing
    records = _study([0.0, 0.0], [0.0, 0.0], [0.1, 0.1])
    add_gap_closed(records)
    report.plot_gap_closed({"random": {"config": {"protocol": "random"}, "records": records}}, tmp_path / "g.png")
    assert [t.get_text() for t in drawn[1].axes[0].get_legend().get_texts()] == [
        "random (nothing to close: the Original has the oracle's value)"]


def test_a_sequential_scenario_is_summarised_at_its_last_request(tmp_path, monkeypatch):
    """The scenario summary, summary.json and the gap-closed plot take each scenario's last request (a version
    that took the first one showed request 0's gap closed)."""
    records = _study([0.0, 0.0], [0.5, 0.5], [0.1, 0.1], method_avg=0.05)  # request 0: closed 0.80 and 0.75
    records += _study([0.0, 0.0], [0.5, 0.5], [0.4, 0.4], method_avg=0.15, request=1)  # last: 0.20 and 0.25
    add_gap_closed(records)
    study = {"config": {"protocol": "random"}, "records": records}
    summary = report.format_scenario_summary({"random": study})
    assert next(line for line in summary.splitlines() if line.startswith("cure_newton")).split()[1:] == ["0.20", "0.25"]
    written = report.write_summary_json({"random": study}, {"random": tmp_path / "results.json"},
                                        tmp_path / "summary.json")
    cell = json.loads(written.read_text())["scenarios"]["random"]["gap_closed"]["cure_newton"]
    assert cell["acc_forget"]["mean"] == pytest.approx(0.2) and cell["avg_gap"]["mean"] == pytest.approx(0.25)
    drawn = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kwargs: drawn.append(fig) or path)
    report.plot_gap_closed({"random": study}, tmp_path / "g.png")
    acc_f, avg_gap = drawn[0].axes[:2]
    assert [bar.get_height() for bar in acc_f.patches] == pytest.approx([0.0, 0.2])  # original, cure_newton
    assert [bar.get_height() for bar in avg_gap.patches] == pytest.approx([0.0, 0.25])


def test_a_method_that_raised_is_marked_in_the_scenario_summary_its_json_and_the_plots(tmp_path, monkeypatch):
    """A method that raised on every seed holds the model it was given: its gap closed, 0, read in the scenario
    summary, summary.json and the plots as a result no better than the Original; only the per-request table said
    it had raised. Each of them says so now."""
    records = _study([0.0, 0.0], [0.5, 0.5], [0.5, 0.5], method_avg=0.2)  # its metrics: the Original's
    for r in records:  # as the study writes a failed row: no time
        failed = r["method"] == "cure_newton"
        r["metrics"].update(failed=float(failed), **({} if failed else {"seconds": 1.0}))
    add_gap_closed(records)
    study = {"config": {"protocol": "random"}, "records": records}
    summary = report.format_scenario_summary({"random": study})
    assert next(line for line in summary.splitlines() if line.startswith("cure_newton")).split()[1:] == ["0.00!",
                                                                                                        "0.00!"]
    assert "cure_newton raised on 100% of the seeds of random" in summary.splitlines()[-1]
    written = report.write_summary_json({"random": study}, {"random": tmp_path / "results.json"},
                                        tmp_path / "summary.json")
    assert json.loads(written.read_text())["scenarios"]["random"]["failed"] == {"cure_newton": 1.0}
    drawn = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kwargs: drawn.append(fig) or path)
    report.write_plots(study, tmp_path)
    time_plot, gaps_plot, closed_plot = drawn
    assert "not shown, raised on every seed: cure_newton" in time_plot.axes[0].get_title()
    for fig in (gaps_plot, closed_plot):
        labels = [label.get_text() for label in fig.axes[-1].get_xticklabels()]
        assert "cure_newton (raised on 100% of seeds)" in labels and "original" in labels


def test_a_method_that_raised_at_an_earlier_request_is_marked_at_the_last(tmp_path):
    """In a sequential study a method that raised at request 0 went on from the model it was given; at the last
    request, which the summary and summary.json show, it ran, and nothing said its chain skipped a request."""
    records = _study([0.0, 0.0], [0.5, 0.5], [0.25, 0.25]) + _study([0.0, 0.0], [0.5, 0.5], [0.25, 0.25], request=1)
    for r in records:
        r["metrics"]["failed"] = float(r["method"] == "cure_newton" and r["request"] == 0)
    add_gap_closed(records)
    study = {"config": {"protocol": "random"}, "records": records}
    summary = report.format_scenario_summary({"random": study})
    assert next(line for line in summary.splitlines() if line.startswith("cure_newton")).split()[1:] == ["0.50!",
                                                                                                        "0.75!"]
    assert "cure_newton raised on 100% of the seeds of random" in summary
    written = report.write_summary_json({"random": study}, {"random": tmp_path / "results.json"},
                                        tmp_path / "summary.json")
    assert json.loads(written.read_text())["scenarios"]["random"]["failed"] == {"cure_newton": 1.0}


def test_a_method_that_raised_is_named_so_in_the_sequential_plot_and_its_titles_say_the_request(tmp_path,
                                                                                                   monkeypatch):
    """sequential.png drew a method that raised under its plain name, its line the model it was given (on the
    Original's); the other plots of a sequential study showed its last request without saying so."""
    records = _study([0.0, 0.0], [0.5, 0.5], [0.25, 0.25]) + _study([0.0, 0.0], [0.5, 0.5], [0.25, 0.25], request=1)
    for r in records:
        r["metrics"].update(failed=float(r["method"] == "cure_newton" and r["request"] == 0), seconds=1.0,
                            acc_forgotten_so_far=0.2, acc_test=0.9)
    add_gap_closed(records)
    figures = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kwargs: figures.__setitem__(Path(path).name, fig))
    report.write_plots({"config": {"protocol": "random"}, "records": records}, tmp_path)
    for ax in figures["sequential.png"].axes:
        assert "cure_newton (raised on 100% of seeds)" in [line.get_label() for line in ax.get_lines()]
    assert "request 2 of 2" in figures["forget_accuracy_vs_time.png"].axes[0].get_title()
    assert "request 2 of 2" in figures["gaps_to_oracle.png"].axes[0].get_title()
    assert "last request" in figures["gap_closed.png"].axes[0].get_title()
    single = _study([0.0, 0.0], [0.5, 0.5], [0.25, 0.25])
    add_gap_closed(single)
    report.write_plots({"config": {"protocol": "random"}, "records": single}, tmp_path)
    assert "request" not in figures["forget_accuracy_vs_time.png"].axes[0].get_title()


def test_the_gaps_plot_leaves_out_a_nan_seed_as_the_table_does(tmp_path, monkeypatch):
    """A NaN gap on one seed (records made in memory) made the method's bar NaN, no bar, where the table and the
    same records read back from results.json give the other seed's."""
    records = _study([0.0, 0.0], [0.5, 0.5], [0.1, 0.3])
    records[2]["metrics"]["gap_acc_forget"] = math.nan  # cure_newton, seed 0
    drawn = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kwargs: drawn.append(fig) or path)
    report.write_plots({"config": {}, "records": records}, tmp_path)
    bars = drawn[1].axes[0].containers[0]  # |gap| acc_forget, one bar per method but the oracle
    methods = [label.get_text() for label in drawn[1].axes[0].get_xticklabels()]
    assert bars.patches[methods.index("cure_newton")].get_height() == pytest.approx(0.3)


def test_a_nan_metric_is_left_out_as_results_json_leaves_it_out(tmp_path):
    """A NaN metric (records made by hand) made the mean NaN in memory, while results.json stores it as null,
    which is skipped: the summary read back differed from the one written, and a NaN Original gap got the
    verdict "outside seed noise". NaN is skipped in memory too."""
    records = _study([0.0, 0.0, 0.0], [0.5, 0.4, 0.6], [0.1, 0.2, 0.3])
    records[2]["metrics"]["acc_forget"] = math.nan  # cure_newton, seed 0
    records[1]["metrics"]["gap_acc_forget"] = math.nan  # the Original, seed 0
    add_gap_closed(records)
    written = json.loads(report.write_json({"config": {}, "records": records}, tmp_path / "results.json").read_text())
    for key, method in (("acc_forget", "cure_newton"), ("gap_acc_forget", "original")):
        figure = report.summarize(records)[0][method][key]
        assert written["summary"]["0"][method][key] == {"mean": figure[0], "std": figure[1], "seeds": 2}
        reread = report.summarize(written["records"])[0][method][key]
        assert tuple(reread) == tuple(figure) and reread.seeds == figure.seeds == 2
    noise = report.gap_closed_noise(records)[0]["acc_forget"]
    assert noise == report.gap_closed_noise(written["records"])[0]["acc_forget"]
    assert noise["original_gap"] == pytest.approx(0.5)  # seeds 1 and 2
    for r in records:  # no finite Original gap on any seed: no verdict, as without an Original
        if r["method"] == "original":
            r["metrics"]["gap_acc_forget"] = math.nan
    assert report.gap_closed_noise(records) == {}


def test_summary_json_gives_the_mean_and_std_over_seeds(tmp_path):
    """summary.json's gap closed is the mean and the sample std over seeds (a version that wrote the mean as the
    std too passed every test whose seeds agreed)."""
    records = _study([0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    add_gap_closed(records)
    written = report.write_summary_json({"random": {"config": {"protocol": "random"}, "records": records}},
                                        {"random": tmp_path / "results.json"}, tmp_path / "summary.json")
    cell = json.loads(written.read_text())["scenarios"]["random"]["gap_closed"]["cure_newton"]["acc_forget"]
    per_seed = [1 - 0.1 / 0.5, 1 - 0.2 / 0.5, 1 - 0.3 / 0.5]
    assert cell["mean"] == pytest.approx(np.mean(per_seed)) and cell["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert cell["seeds"] == 3


def test_format_table_takes_plain_mean_std_pairs():
    """A Figure's seed count was read as ``.count``, which every tuple and list has (a method): plain
    (mean, std) pairs, as the docstring allows (e.g. rebuilt from results.json), made format_table raise."""
    table = report.format_table({"retrain": {"acc_forget": (0.5, 0.1)},
                                 "cure_newton": {"acc_forget": [0.4, 0.0], "gap_closed_acc_forget": (0.8, 0.1)}})
    assert "0.500±0.100" in table and "seeds" not in table


def test_equal_values_over_seeds_have_no_spread():
    """0.95 on three seeds gave mean 0.9499999999999998 and std 1.4e-16, printed as "0.950±0.000"."""
    records = [_record(seed, "retrain", acc_retain=0.95) for seed in range(3)]
    figure = report.summarize(records)[0]["retrain"]["acc_retain"]
    assert tuple(figure) == (0.95, 0.0)
    assert "±" not in next(line for line in report.format_table(report.summarize(records)[0]).splitlines()
                           if line.startswith("retrain"))


def test_a_gap_equal_to_the_noise_is_within_it_whatever_the_rounding():
    """Per-seed gaps (0, g, g) put the mean gap exactly on two standard errors: the verdict flipped with the
    rounding of g (g = 1/41 was judged outside, every other 1/k within)."""
    for k in range(1, 60):
        g = 1 / k
        verdict = report.gap_closed_noise(_study([0.0] * 3, [0.0, g, g], [0.0] * 3))[0]["acc_forget"]
        assert verdict["original_gap"] == pytest.approx(verdict["noise"]) and verdict["within_noise"] is True, k


def test_json_and_plots(tmp_path):
    records = _study([0.4, 0.6], [0.3, 0.2], [0.05, -2.5])  # one seed's value far below -1: clipped in the plot
    for r in records:
        r["metrics"].update(seconds=0.1, speedup=1.0, js_to_oracle=0.0, tug_of_war=1.0)
    add_gap_closed(records)
    study = {"config": {"protocol": "mislabeled"}, "records": records}
    payload = json.loads(report.write_json(study, tmp_path / "s" / "results.json").read_text())
    per_seed = (1 - 0.05 / 0.3, 1 - 2.5 / 0.2)
    assert payload["summary"]["0"]["cure_newton"]["gap_closed_acc_forget"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert payload["gap_closed_noise"]["0"]["acc_forget"]["seeds"] == 2
    assert payload["records"][2]["metrics"]["gap_closed_acc_forget"] == pytest.approx(1 - 0.05 / 0.3)
    paths = report.write_plots(study, tmp_path / "s")
    assert {p.name for p in paths} == {"forget_accuracy_vs_time.png", "gaps_to_oracle.png", "gap_closed.png"}
    written = report.write_summary_json({"mislabeled": study}, {"mislabeled": tmp_path / "s" / "results.json"},
                                        tmp_path / "summary.json")
    summary = json.loads(written.read_text())
    assert summary["scenarios"]["mislabeled"]["results"] == "s/results.json"
    assert summary["scenarios"]["mislabeled"]["gap_closed"]["original"]["acc_forget"]["mean"] == 0.0
    for path in [*paths, report.plot_gap_closed({"a": study, "b": study}, tmp_path / "g.png")]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cpu_threads_are_recorded_as_a_number(tmp_path):
    """versions.cpu_threads was the string "1" in results.json and summary.json, where the benchmarks' JSON
    records the number 1."""
    study = {"config": {"protocol": "random"}, "records": _study([0.4], [0.3], [0.05])}
    results = json.loads(report.write_json(study, tmp_path / "results.json").read_text())
    summary = json.loads(report.write_summary_json({"random": study}, {"random": tmp_path / "results.json"},
                                                   tmp_path / "summary.json").read_text())
    for payload in (results, summary):
        assert payload["versions"]["cpu_threads"] == torch.get_num_threads()
        assert type(payload["versions"]["cpu_threads"]) is int


def _strict(text: str) -> dict:
    """JSON as a strict reader takes it: Python's NaN / Infinity tokens are an error."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    """results.json and summary.json are strict JSON: a NaN diagnostic (SCRUB's KL after zero steps) or
    a rejected ARC trial's decrease of -inf is null, where json.dump once wrote NaN / -Infinity."""
    records = _study([0.4, 0.6], [0.3, 0.2], [0.05, 0.1])
    for r in records:
        r["metrics"].update(seconds=0.1, speedup=1.0, js_to_oracle=0.0, tug_of_war=1.0)
        r["diagnostics"] = {"forget_kl_last_max_pass": math.nan, "trials": [{"actual": -math.inf, "M": 0.1}]}
    add_gap_closed(records)
    study = {"config": {"protocol": "mislabeled", "lr": math.inf}, "records": records}
    path = report.write_json(study, tmp_path / "results.json")
    payload = _strict(path.read_text())
    assert payload["records"][0]["diagnostics"] == {"forget_kl_last_max_pass": None,
                                                    "trials": [{"actual": None, "M": 0.1}]}
    assert payload["config"]["lr"] is None
    assert math.isnan(records[0]["diagnostics"]["forget_kl_last_max_pass"])  # the caller's records as they were
    _strict(report.write_summary_json({"mislabeled": study}, {"mislabeled": path}, tmp_path / "summary.json")
            .read_text())


@pytest.mark.parametrize("writer", ["write_json", "write_summary_json"])
def test_failed_write_leaves_old_file_and_no_temporary(writer, tmp_path, monkeypatch):
    study = {"config": {"protocol": "mislabeled"}, "records": _study([0.0], [0.3], [0.1])}
    path = tmp_path / "out.json"

    def write():
        if writer == "write_json":
            return report.write_json(study, path)
        return report.write_summary_json({"mislabeled": study}, {"mislabeled": tmp_path / "results.json"}, path)

    write()
    before = path.read_bytes()

    def broken_dump(payload, handle, **kwargs):
        handle.write('{"half a')
        raise OSError("disk full")

    monkeypatch.setattr(report.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_sequential_plot_per_request(tmp_path):
    records = _study([0.0, 0.0], [0.3, 0.2], [0.1, 0.1]) + _study([0.0, 0.0], [0.4, 0.3], [0.0, 0.1], request=1)
    for r in records:
        r["metrics"].update(seconds=0.1, acc_forgotten_so_far=0.5, acc_test=0.9)
    add_gap_closed(records)
    paths = report.write_plots({"config": {"protocol": "mislabeled"}, "records": records}, tmp_path)
    assert (tmp_path / "sequential.png") in paths
    assert "Acc_f so far" in report.format_table(report.summarize(records)[1])
    assert "Acc_f so far" not in report.format_table(report.summarize(_study([0.0], [0.3], [0.1]))[0])
    assert (tmp_path / "sequential.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sixteen_methods_keep_their_own_line_style_in_the_sequential_plot(tmp_path, monkeypatch):
    """The sequential plot drew its lines in matplotlib's 10-colour cycle without markers: with the study's 16
    methods six pairs (the oracle and random_labels among them) had one colour. Each method now has its own
    colour and marker, the ones it has in the time plot."""
    methods = ["retrain", "original", *(f"method_{i}" for i in range(14))]
    records = [_record(seed, m, request, seconds=0.1, acc_forget=0.1 * i, acc_forgotten_so_far=0.5, acc_test=0.9)
               for request in (0, 1) for seed in (0, 1) for i, m in enumerate(methods)]
    add_gap_closed(records)
    figures = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kwargs: figures.__setitem__(Path(path).name, fig))
    report.write_plots({"config": {"protocol": "mislabeled"}, "records": records}, tmp_path)
    styles = {}
    for ax in figures["sequential.png"].axes:
        for line in ax.get_lines():
            styles.setdefault(line.get_label(), set()).add((line.get_color(), line.get_marker()))
    assert set(styles) == set(methods) and all(len(s) == 1 for s in styles.values())
    assert len({s.pop() for s in styles.values()}) == len(methods)


def test_an_interrupted_plot_leaves_the_old_one_and_no_temporary(tmp_path, interrupt_plots):
    """A plot written straight to its path was torn by an interruption (Ctrl-C, a full disk) midway: now the
    previous plot stays whole, as results.json does."""
    records = _study([0.0], [0.3], [0.1])
    for r in records:
        r["metrics"].update(seconds=0.1)
    add_gap_closed(records)
    study = {"config": {"protocol": "mislabeled"}, "records": records}
    paths = report.write_plots(study, tmp_path)
    before = {p.name: p.read_bytes() for p in paths}

    interrupt_plots()
    with pytest.raises(KeyboardInterrupt):
        report.write_plots(study, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_summary_is_removed_only_where_it_covers_the_scenario(tmp_path):
    summary, plot = tmp_path / report.SUMMARY_FILE, tmp_path / report.GAP_CLOSED_PLOT
    assert report.remove_stale_summary(tmp_path, "random") == []  # none there
    summary.write_text("not json")
    assert report.remove_stale_summary(tmp_path, "random") == [] and summary.exists()  # not one of ours
    plot.write_bytes(b"png")
    # a string that merely contains the scenario's name, or an entry of another shape, is someone else's file (r60)
    for other in ({"scenarios": "notes about a random walk"}, {"scenarios": {"random": "x"}},
                  {"scenarios": {"random": {"notes": 1}}}):
        summary.write_text(json.dumps(other))
        assert report.remove_stale_summary(tmp_path, "random") == [] and summary.exists() and plot.exists()
    summary.write_text(json.dumps({"scenarios": {"class": {"protocol": "class", "results": "class/results.json"}}}))
    assert report.remove_stale_summary(tmp_path, "random") == [] and summary.exists()
    assert report.remove_stale_summary(tmp_path, "class") == [summary, plot]
    assert not summary.exists() and not plot.exists()


def test_a_zero_original_gap_keeps_the_closed_column_and_says_why_it_is_empty():
    """Where the Original's Acc_f gap is 0 on every seed (it fit none of a 2-epoch run's wrong labels, as the
    oracle) the gap closed is undefined: the column vanished from the table and the note blamed one seed."""
    records = _study([0.0], [0.0], [0.1], original_avg=0.0)
    add_gap_closed(records)
    assert all(r["metrics"]["gap_closed_acc_forget"] is None for r in records if r["method"] != "retrain")
    table = report.format_table(report.summarize(records)[0])
    assert "closed Acc_f" in table.splitlines()[0] and "closed AvgGap" in table.splitlines()[0]
    row = next(line for line in table.splitlines() if line.startswith("cure_newton")).split()
    assert row[-2:] == ["-", "-"]  # the two closed columns, last
    note = report.format_noise_note(report.gap_closed_noise(records)[0])
    assert note.splitlines() == [
        "Original's Acc_f gap 0.000: nothing to close ('closed Acc_f' is undefined where the Original's gap is 0: "
        "null in the JSON's records, '-' in the table).",
        "Original's AvgGap gap 0.000: nothing to close ('closed AvgGap' is undefined where the Original's gap is 0: "
        "null in the JSON's records, '-' in the table).",
    ]
    without_original = [r for r in records if r["method"] != "original"]
    assert "closed" not in report.format_table(report.summarize(without_original)[0])  # no Original: no column


def test_opposite_original_gaps_that_average_to_zero_are_not_called_undefined():
    """Signed gaps of +0.1 and -0.1 average to 0: each seed's gap closed is defined (the table shows it), so
    the note is the seed-noise one, not "nothing to close"."""
    records = _study([0.0, 0.0], [0.1, -0.1], [0.05, -0.05])
    add_gap_closed(records)
    note = report.format_noise_note(report.gap_closed_noise(records)[0])
    assert "nothing to close" not in note.splitlines()[0] and "WITHIN seed noise" in note.splitlines()[0]
    assert report.summarize(records)[0]["cure_newton"]["gap_closed_acc_forget"][0] == pytest.approx(0.5)


def test_a_zero_original_gap_is_nothing_to_close_even_where_the_oracle_moves():
    """The Original's gap is 0 on every seed while the oracle's Acc_f varies (so the noise is > 0): the closed
    columns are '-', yet the note said "WITHIN seed noise (<= 0.115 ...): 'closed Acc_f' does not rank methods
    here" (the "nothing to close" branch ran only at noise 0). Opposite gaps that average to 0 keep the
    seed-noise note: their gap closed is defined on each seed."""
    records = _study([0.4, 0.6, 0.4, 0.6], [0.0] * 4, [0.1] * 4, original_avg=0.0)
    add_gap_closed(records)
    row = next(line for line in report.format_table(report.summarize(records)[0]).splitlines()
               if line.startswith("cure_newton")).split()
    assert row[-2:] == ["-", "-"]
    verdict = report.gap_closed_noise(records)[0]
    assert report.format_noise_note(verdict).splitlines() == [
        "Original's Acc_f gap 0.000: nothing to close ('closed Acc_f' is undefined where the Original's gap is 0: "
        "null in the JSON's records, '-' in the table).",
        "Original's AvgGap gap 0.000: nothing to close ('closed AvgGap' is undefined where the Original's gap is 0: "
        "null in the JSON's records, '-' in the table).",
    ]
    assert verdict["acc_forget"]["noise"] > 0 and verdict["avg_gap"]["noise"] > 0
    assert verdict["acc_forget"]["nothing_to_close"] is True and verdict["avg_gap"]["nothing_to_close"] is True
    opposite = _study([0.4, 0.6, 0.4, 0.6], [0.1, -0.1, 0.1, -0.1], [0.05] * 4)
    add_gap_closed(opposite)
    verdict = report.gap_closed_noise(opposite)[0]["acc_forget"]
    assert verdict["original_gap"] == 0 and verdict["nothing_to_close"] is False and verdict["within_noise"] is True
    assert report.format_noise_note(report.gap_closed_noise(opposite)[0]).splitlines()[0].startswith(
        "Original's Acc_f gap 0.000: WITHIN seed noise (<= 0.115 = 2 standard errors over 4 seeds)")
    assert report.summarize(opposite)[0]["cure_newton"]["gap_closed_acc_forget"][0] == pytest.approx(0.5)


def test_plots_leave_the_callers_backend_and_pyplot_alone(tmp_path):
    """The plots called matplotlib.use("Agg"): a notebook's or a GUI's backend was switched for the rest of
    the process (plt.show() then showed nothing)."""
    import matplotlib
    import matplotlib.pyplot as plt

    records = _study([0.0], [0.3], [0.1])
    for r in records:
        r["metrics"].update(seconds=0.1)
    add_gap_closed(records)
    study = {"config": {"protocol": "mislabeled"}, "records": records}
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        figure = plt.figure()  # the caller's own
        open_figures = plt.get_fignums()
        report.write_plots(study, tmp_path)
        report.plot_gap_closed({"a": study}, tmp_path / "g.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == open_figures
    finally:
        plt.close(figure)
        matplotlib.use(before)


def test_plots_need_no_mathtext(tmp_path, monkeypatch):
    """The time axis's default 10^k tick labels are mathtext, whose fallback fonts a stale matplotlib font cache
    (left by a deleted environment) cannot find: the main job printed 21 "findfont" warnings. No text of the
    plots goes through the mathtext parser now."""
    import matplotlib.mathtext

    def no_mathtext(self, s, *args, **kwargs):
        raise AssertionError(f"mathtext parsed {s!r}")

    monkeypatch.setattr(matplotlib.mathtext.MathTextParser, "parse", no_mathtext)
    records = _study([0.4, 0.6], [0.3, 0.2], [0.05, 0.1])
    for r, seconds in zip(records, (0.002, 3.0, 0.02, 0.5, 0.04, 0.7)):
        r["metrics"].update(seconds=seconds, speedup=1.0, js_to_oracle=0.0, tug_of_war=1.0)
    add_gap_closed(records)
    study = {"config": {"protocol": "mislabeled"}, "records": records}
    report.write_plots(study, tmp_path)
    report.plot_gap_closed({"mislabeled": study}, tmp_path / "g.png")


@pytest.mark.parametrize("times, labels", [
    ((0.002, 3.0), ["0.01", "0.1", "1"]),
    ((0.113, 0.686), ["0.2", "0.3", "0.5"]),  # no power of ten inside: its first version left the axis unlabelled
    ((1.5e5, 9e5), ["200000", "300000", "500000"]),
])
def test_the_time_axis_is_labelled_plainly_at_every_span(times, labels):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = report.new_figure()
    ax = fig.subplots()
    ax.plot(times, [0, 1])
    report._plain_log_x(ax)
    FigureCanvasAgg(fig).draw()
    low, high = ax.get_xlim()
    ticks = [*ax.xaxis.get_major_ticks(), *ax.xaxis.get_minor_ticks()]
    assert [t.label1.get_text() for t in ticks if low <= t.get_loc() <= high and t.label1.get_text()] == labels


def test_summarize_takes_numpy_scalars():
    """A record holding np.float32(0.9) was summarised without it, as if it were None (r67)."""
    import numpy as np

    recs = [{"seed": s, "request": 0, "method": "x", "metrics": {"acc_test": v}}
            for s, v in ((0, 0.5), (1, np.float32(0.75)), (2, np.int64(1)))]
    figure = report.summarize(recs)[0]["x"]["acc_test"]
    assert figure.seeds == 3 and figure[0] == pytest.approx(0.75)


def test_write_summary_json_takes_a_str_path_as_write_json_does(tmp_path):
    records = _study([0.0, 0.0], [0.5, 0.5], [0.1, 0.1], method_avg=0.05)
    add_gap_closed(records)
    study = {"config": {"protocol": "random"}, "records": records}
    written = report.write_summary_json({"random": study}, {"random": tmp_path / "results.json"},
                                        str(tmp_path / "summary.json"))  # was: 'str' object has no attribute 'parent'
    assert json.loads(written.read_text())["scenarios"]["random"]["results"] == "results.json"
    with pytest.raises(ValueError, match="write_summary_json: path is an empty path"):
        report.write_summary_json({"random": study}, {"random": tmp_path / "results.json"}, "")
