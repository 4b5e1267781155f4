"""``revisit-benchmark probe`` at a tiny size: the JSON has every field.

Speed is never asserted (it is reported as ratios by the benchmark itself);
losses are, since all solvers minimise the same strictly convex objective.
"""

import json

import pytest

from revisit_tf.benchmarks import probe


def test_tiny_benchmark_writes_complete_json(tmp_path, capsys):
    out = tmp_path / "probe.json"
    argv = ["--sizes", "600x16", "--classes", "3", "--spread", "0.5"]
    argv += ["--solvers", "ours", "ours_precond", "tfp", "sklearn"]
    argv += ["--stream_budget_mb", "0.05", "--output", str(out)]
    argv += ["--cache_dir", str(tmp_path / "cache")]
    assert probe.main(argv) == 0
    table = capsys.readouterr().out
    assert "| 600x16 | ours |" in table and "Streamed (" in table

    result = json.loads(out.read_text())
    assert result["settings"]["sizes"] == ["600x16"]
    rows = {r["solver"]: r for r in result["rows"]}
    assert set(rows) == {"ours", "ours_precond", "tfp", "sklearn"}
    for row in rows.values():
        for key in ("seconds", "iterations", "loss", "train_top1", "test_top1"):
            assert row[key] is not None, key
        assert row["speedup_vs_sklearn"] > 0
        # Same minimiser for every solver (tolerance 1e-4 on the gradient).
        assert row["loss"] == pytest.approx(rows["sklearn"]["loss"], rel=1e-4)
        assert abs(row["test_top1_diff_vs_sklearn"]) <= 0.01
    assert rows["ours"]["iterations"] == rows["tfp"]["iterations"]
    assert rows["ours"]["function_evaluations"] < rows["tfp"]["function_evaluations"]
    assert rows["ours"]["first_fit_overhead_seconds"] > 0
    assert rows["sklearn"].get("first_fit_overhead_seconds") is None

    # Equal-loss rows: each solver at the fewest iterations reaching the target.
    equal = {r["solver"]: r for r in result["equal_loss"]}
    assert set(equal) == {"ours", "ours_precond", "sklearn"}
    best = min(r["loss"] for r in rows.values())
    for row in equal.values():
        assert row["size"] == "600x16"
        assert row["best_loss"] <= best
        assert row["target_loss"] == pytest.approx(row["best_loss"] * (1 + 1e-4))
        assert row["loss"] <= row["target_loss"]  # reached ...
        assert row["loss_one_iteration_earlier"] > row["target_loss"]  # ... first
        assert row["iterations"] <= row["iteration_cap"]
        assert abs(row["test_top1_diff_vs_sklearn"]) <= 0.01
    assert "Equal final loss" in table

    streamed = result["streamed"]
    assert streamed["feature_bytes"] >= 4 * streamed["budget_bytes"] - 4 * 16
    assert streamed["shards"] >= 32
    assert streamed["loss_rel_diff_vs_whole_batch"] == pytest.approx(0, abs=1e-5)


def test_bad_size_is_rejected(capsys):
    with pytest.raises(SystemExit):
        probe.main(["--sizes", "600by16"])
    assert "a size is NxD" in capsys.readouterr().err
