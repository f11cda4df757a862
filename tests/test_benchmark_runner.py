"""The benchmark runner's usage errors (``python -m benchmarks``): found before any suite runs."""
import json

import pytest

from benchmarks.__main__ import main


@pytest.mark.parametrize("argv, message", [
    (["bogus"], "unknown suite(s) ['bogus']"),
    (["softmax_ce", "--device", "bogus"], "--device 'bogus': "),
    (["softmax_ce", "--device", "meta"], "--device 'meta': the suites run on cpu or cuda"),
    (["softmax_ce", "--threads", "0"], "--threads must be >= 1"),
])
def test_usage_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_out_that_is_a_file_is_refused_before_any_suite(capsys, tmp_path):
    out = tmp_path / "results"
    out.write_text("the user's file")
    with pytest.raises(SystemExit) as exit_info:
        main(["softmax_ce", "--quick", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--out {str(out)!r} is a file, not a directory" in err
    assert out.read_text() == "the user's file"


def test_a_quick_run_says_so_in_its_json(tmp_path):
    assert main(["softmax_ce", "--quick", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "softmax_ce_cpu.json").read_text())
    assert written["config"]["quick"] is True and written["results"]
