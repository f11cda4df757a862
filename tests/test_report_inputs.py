"""Bad input to what a user calls on the data and results they hold: LabeledData's subset, loader and to,
a checkpoint path that is empty or holds another file, and the report's functions on records, summaries
and studies that are not of their form. Each is refused with a message naming the argument and the
problem, before any work, and writes nothing."""
import math
import os

import matplotlib.axes
import pytest
import torch

from unlearn_kernels import report
from unlearn_kernels.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from unlearn_kernels.eval import AVG_GAP_KEYS
from unlearn_kernels.labeled import LabeledData


def _data(n: int = 4) -> LabeledData:
    return LabeledData(torch.arange(3.0 * n).reshape(n, 3), torch.arange(n) % 2)


# ------------------------------------------------------------------------------------------- LabeledData


@pytest.mark.parametrize("index, error, message", [
    (torch.tensor([5]), ValueError, "subset: index 5 is out of range for 4 rows"),  # was torch's IndexError
    (torch.tensor([-5]), ValueError, "subset: index -5 is out of range for 4 rows"),
    (torch.tensor([0.0, 1.0]), TypeError, "subset: index must be integer indices or a boolean mask, got torch.float32"),
    (torch.tensor([True, False]), ValueError, r"subset: a boolean mask needs one entry per row \(4\), got 2"),
    (1, ValueError, r"subset: index must be 1-D, got shape \(\)"),  # was "y must be a 1-D int64 tensor"
    (torch.tensor([[0, 1]]), ValueError, r"subset: index must be 1-D, got shape \(1, 2\)"),
    (slice(0, 2), TypeError, "subset: index must be integer indices or a boolean mask, got slice"),
    (None, TypeError, "subset: index must be integer indices or a boolean mask, got NoneType"),
])
def test_subset_refuses_a_bad_index_by_name(index, error, message):
    with pytest.raises(error, match=message):
        _data().subset(index)


def test_subset_keeps_its_rows_for_good_indices_and_takes_an_empty_list():
    data = _data()
    for index in (torch.tensor([3, 0]), [1, 2], torch.tensor([-1]), torch.tensor([True, False, False, True]),
                  torch.arange(0)):
        part, rows = data.subset(index), torch.as_tensor(index)
        assert torch.equal(part.x, data.x[rows]) and torch.equal(part.y, data.y[rows])
    empty = data.subset([])  # torch reads [] as float32: was "tensors used as indices must be long, ..."
    assert empty.x.shape == (0, 3) and empty.y.dtype == torch.long


def test_subset_reads_every_integer_dtype_as_indices():
    # torch reads a uint8 tensor as a mask: [3, 2, 1, 0] gave rows 0-2 (order lost, row 0 dropped), and [1, 2]
    # was refused as "a boolean mask needs one entry per row"; int8/int16 gave torch's IndexError, uint16/32/64
    # its "min_all" not implemented
    data = _data()
    for index in (torch.tensor([3, 2, 1, 0], dtype=torch.uint8), torch.tensor([1, 2], dtype=torch.uint8),
                  *(torch.tensor([3, 0, 2], dtype=d) for d in (torch.int8, torch.int16, torch.int32, torch.uint16,
                                                               torch.uint32, torch.uint64))):
        part = data.subset(index)
        assert torch.equal(part.y, data.y[index.long()]) and torch.equal(part.x, data.x[index.long()])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"batch_size": 0}, ValueError, "LabeledData.loader: batch_size must be an int >= 1, got 0"),
    ({"batch_size": 2.0}, ValueError, "LabeledData.loader: batch_size must be an int >= 1, got 2.0"),
    # was a ZeroDivisionError from the last-row rule
    ({"batch_size": 0, "join_last_row": True}, ValueError, "batch_size must be an int >= 1, got 0"),
    ({"batch_size": 2, "shuffle": True, "seed": 1.5}, TypeError, "LabeledData.loader: seed must be an int, got float"),
    # a str flag was truthy: "no" shuffled
    ({"batch_size": 2, "shuffle": "no"}, TypeError, "LabeledData.loader: shuffle must be a bool, got str"),
    ({"batch_size": 2, "drop_last": 1}, TypeError, "LabeledData.loader: drop_last must be a bool, got int"),
])
def test_loader_refuses_bad_arguments_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        _data().loader(**kwargs)


def test_loader_batches_are_unchanged_for_good_arguments():
    data = _data(5)
    expected = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=2, shuffle=True,
                                           generator=torch.Generator().manual_seed(3))
    got = data.loader(2, shuffle=True, seed=3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(got, expected, strict=True))


# ------------------------------------------------------------------------------------------- checkpoints


def test_an_empty_checkpoint_path_is_refused_not_read_as_the_working_folder():
    for read in (read_checkpoint, lambda path: load_checkpoint(path, {})):
        with pytest.raises(ValueError, match="checkpoint path is an empty path"):  # was ". is a directory"
            read("")


def test_a_file_of_the_format_without_a_metadata_object_or_tensors_is_not_a_checkpoint(tmp_path):
    listed = tmp_path / "listed.pt"
    torch.save({"format": 1, "metadata": "[1, 2]", "state_dict": {}}, listed)
    with pytest.raises(CheckpointError, match="listed.pt has unreadable metadata: a JSON list, not an object"):
        read_checkpoint(listed)  # was returned as metadata [1, 2]
    numbers = tmp_path / "numbers.pt"
    torch.save({"format": 1, "metadata": "{}", "state_dict": {"weight": 3}}, numbers)
    with pytest.raises(CheckpointError, match="numbers.pt is not an unlearn-kernels checkpoint"):
        read_checkpoint(numbers)  # was returned as a state dict holding an int
    for fake in (True, 1.0):  # equal to 1, but no format number: read as format 1
        flagged = tmp_path / "flagged.pt"
        torch.save({"format": fake, "metadata": "{}", "state_dict": {}}, flagged)
        with pytest.raises(CheckpointError, match="flagged.pt is not an unlearn-kernels checkpoint of format 1"):
            read_checkpoint(flagged)
    good = tmp_path / "good.pt"
    save_checkpoint(good, torch.nn.Linear(2, 1), {"a": 1})
    assert read_checkpoint(good)[0] == {"a": 1}


# ------------------------------------------------------------------------------------------------ report


def _records() -> list[dict]:
    metrics = {key: 0.5 for key in AVG_GAP_KEYS} | {f"gap_{key}": 0.0 for key in AVG_GAP_KEYS} | {"avg_gap": 0.0,
                                                                                                  "seconds": 1.0}
    return [{"seed": 0, "request": 0, "method": method, "metrics": dict(metrics), "diagnostics": {}}
            for method in ("retrain", "finetune")]


@pytest.mark.parametrize("records, error, message", [
    ({"records": []}, TypeError, "summarize: records must be a list of study records.*got dict"),
    ([{"request": 0, "method": "a"}], ValueError, "summarize: records\\[0\\] has no 'metrics'"),  # was KeyError
    ([{"request": "0", "method": "a", "metrics": {}}], TypeError,
     "summarize: records\\[0\\]\\['request'\\] must be an int, got str"),
    ([{"request": 0, "method": "a", "metrics": [0.5]}], TypeError,
     "summarize: records\\[0\\]\\['metrics'\\] must be a dict, got list"),
])
def test_summarize_names_the_bad_record(records, error, message):
    with pytest.raises(error, match=message):
        report.summarize(records)


def test_gap_closed_noise_names_a_record_without_a_seed():
    records = [{k: v for k, v in r.items() if k != "seed"} for r in _records()]
    with pytest.raises(ValueError, match="gap_closed_noise: records\\[0\\] has no 'seed'"):  # was KeyError: 'seed'
        report.gap_closed_noise(records)


@pytest.mark.parametrize("summary, message", [
    # all of summarize's output, not one request's: was "unsupported operand type(s) for +: 'int' and 'str'"
    (lambda records: report.summarize(records), "format_table: summary must map method names.*got 0: dict"),
    # results.json's "summary" form: was "Unknown format code 'f' for object of type 'str'"
    (lambda records: {"retrain": {"acc_forget": {"mean": 0.5, "std": 0.0}}},
     "format_table: summary\\['retrain'\\]\\['acc_forget'\\] must be a \\(mean, std\\) pair"),
    (lambda records: [], "format_table: summary must be a dict of method"),
])
def test_format_table_refuses_what_is_not_one_requests_summary(summary, message):
    with pytest.raises(TypeError, match=message):
        report.format_table(summary(_records()))


@pytest.mark.parametrize("noise, got", [({}, r"got \[\]"), ({0: {"acc_forget": {}, "avg_gap": {}}}, r"got \['0'\]"),
                                        ([], "got list")])
def test_format_noise_note_names_what_it_needs(noise, got):
    """{} and all of gap_closed_noise's output (keyed by request) met KeyError: 'acc_forget'."""
    with pytest.raises(TypeError, match=r"format_noise_note: noise must be one request's entry of gap_closed_noise, "
                                        r"a dict with \['acc_forget', 'avg_gap'\], " + got):
        report.format_noise_note(noise)


def test_study_files_refuses_a_single_method_name_and_a_bad_request_count():
    with pytest.raises(TypeError, match="study_files: methods must be a collection"):
        report.study_files("original", 1)  # was read as a collection of characters
    with pytest.raises(ValueError, match="study_files: requests must be an int >= 1, got '2'"):
        report.study_files(["original"], "2")


def test_write_plots_refuses_a_study_it_cannot_plot_before_making_anything(tmp_path):
    out = tmp_path / "plots"
    no_oracle = {"config": {"protocol": "x"}, "records": [r for r in _records() if r["method"] != "retrain"]}
    with pytest.raises(ValueError, match="write_plots: the study has no 'retrain' record"):  # was KeyError
        report.write_plots(no_oracle, out)
    with pytest.raises(ValueError, match="write_plots: records is empty"):  # was "max() arg is an empty sequence"
        report.write_plots({"config": {}, "records": []}, out)
    with pytest.raises(ValueError, match="write_plots: the study has no 'records'"):
        report.write_plots({"config": {}}, out)
    assert os.listdir(tmp_path) == []
    paths = report.write_plots({"config": {}, "records": _records()}, str(out))  # a str folder: was AttributeError
    assert [p.name for p in paths] == [report.TIME_PLOT, report.GAPS_PLOT]


def test_write_plots_draws_records_without_some_gap_metrics(tmp_path):
    """Records (made by hand) with only some of the plotted gaps: the gaps plot raised a bare
    ZeroDivisionError for a metric a method had on no seed; that bar is left out now."""
    records = _records()
    for r in records:
        del r["metrics"]["gap_acc_retain"], r["metrics"]["gap_mia_entropy"]
    paths = report.write_plots({"config": {}, "records": records}, tmp_path)
    assert [p.name for p in paths] == [report.TIME_PLOT, report.GAPS_PLOT]
    assert all(p.stat().st_size > 0 for p in paths)


def test_write_plots_leaves_out_a_method_without_a_forget_accuracy(tmp_path, monkeypatch):
    """A method whose acc_forget is NaN on every seed (null in results.json) has no mean in the summary: the
    table shows "-", and the time plot raised a bare KeyError: 'acc_forget'; it is left out now, and its title
    says so (apart from the methods that raised, which have no time)."""
    records = _records()
    records[1]["metrics"]["acc_forget"] = math.nan
    records.append({"seed": 0, "request": 0, "method": "ssd", "diagnostics": {},
                    "metrics": {k: v for k, v in records[0]["metrics"].items() if k != "seconds"}})
    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, text, *a, **k: titles.append(text))
    paths = report.write_plots({"config": {}, "records": records}, tmp_path)
    assert [p.name for p in paths] == [report.TIME_PLOT, report.GAPS_PLOT]
    assert titles[0].endswith("\nnot shown, raised on every seed: ssd\nnot shown, no finite Acc_f: finetune")


def test_write_json_and_the_scenario_summary_name_a_missing_part(tmp_path):
    with pytest.raises(ValueError, match="write_json: the study has no 'config'"):  # was KeyError: 'config'
        report.write_json({"records": _records()}, tmp_path / "results.json")
    with pytest.raises(ValueError, match="format_scenario_summary: scenario 'a': records is empty"):
        report.format_scenario_summary({"a": {"config": {}, "records": []}})
    with pytest.raises(ValueError, match="plot_gap_closed: studies is empty"):
        report.plot_gap_closed({}, tmp_path / "gap_closed.png")
    with pytest.raises(ValueError, match="write_summary_json: results has no results file for scenario 'a'"):
        report.write_summary_json({"a": {"config": {"protocol": "p"}, "records": _records()}}, {},
                                  tmp_path / "summary.json")
    assert os.listdir(tmp_path) == []
