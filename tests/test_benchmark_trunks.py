"""`revisit-benchmark trunks` runs end to end at a tiny size and writes JSON.

Speed itself is never asserted (machines are noisy); only the harness is.
"""

import json
import os

import pytest

from revisit_tf import benchmarks
from revisit_tf.benchmarks import trunks


def test_tiny_run_writes_rows_with_ratios(tmp_path, capsys):
    out = tmp_path / "bench" / "trunks.json"
    argv = ["trunks", "--archs", "revnet50", "--width", "0.25"]
    argv += ["--sizes", "32", "--batch", "2", "--steps", "1", "--rounds", "2"]
    assert benchmarks.main(argv + ["--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cpus"] == os.cpu_count() and result["machine"]["cpu"]
    rows = result["rows"]
    assert [r["model"] for r in rows] == [trunks.BASELINE, "revnet50"]
    assert rows[0]["ratio_vs_baseline"] == 1.0
    # keras.applications.ResNet50 has conv biases: 25,583,592 parameters.
    assert rows[0]["params"] == 25_583_592
    for row in rows:
        assert row["size"] == 32 and row["batch"] == 2
        assert len(row["images_per_sec_rounds"]) == 2
        assert row["images_per_sec"] > 0
        ratio = row["images_per_sec"] / rows[0]["images_per_sec"]
        assert row["ratio_vs_baseline"] == pytest.approx(ratio)
    printed = capsys.readouterr().out
    assert "vs baseline" in printed and "revnet50" in printed


def test_bad_arguments_fail_clearly(capsys):
    with pytest.raises(SystemExit):
        benchmarks.main(["trunks", "--archs", "resnet51"])
    assert "invalid choice: 'resnet51'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmarks.main(["trunks", "--batch", "0"])
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err
    assert benchmarks.main(["nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
