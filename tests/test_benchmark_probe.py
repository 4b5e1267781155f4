"""``revisit-benchmark probe`` at a tiny size: the JSON has every field.

Speed is never asserted (it is reported as ratios by the benchmark itself);
losses are, since all solvers minimise the same strictly convex objective.
"""

import json
import os

import numpy as np
import pytest

from revisit_tf.benchmarks import probe, probe_path


def test_tiny_benchmark_writes_complete_json(tmp_path, capsys):
    out = tmp_path / "probe.json"
    argv = ["--sizes", "600x16", "--classes", "3", "--spread", "0.5"]
    argv += ["--solvers", "ours", "ours_precond", "ours_streamed", "tfp", "sklearn"]
    argv += ["--stream_shard_mb", "0.015"]
    argv += ["--stream_budget_mb", "0.05", "--output", str(out)]
    argv += ["--cache_dir", str(tmp_path / "cache")]
    assert probe.main(argv) == 0
    table = capsys.readouterr().out
    assert "| 600x16 | ours |" in table and "Streamed (" in table

    result = json.loads(out.read_text())
    assert result["settings"]["sizes"] == ["600x16"]
    assert result["machine"]["cpus"] == os.cpu_count() and result["machine"]["cpu"]
    rows = {r["solver"]: r for r in result["rows"]}
    assert set(rows) == {"ours", "ours_precond", "ours_streamed", "tfp", "sklearn"}
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
    assert set(equal) == {"ours", "ours_precond", "ours_streamed", "sklearn"}
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
    # The streamed fit is the whole-batch one (same driver, same coordinates)
    # over 3 shards of the cache entry.
    for rows_ in (rows, equal):
        assert (
            rows_["ours_streamed"]["iterations"] == rows_["ours_precond"]["iterations"]
        )
        assert rows_["ours_streamed"]["seconds_vs_whole_batch"] == pytest.approx(
            rows_["ours_streamed"]["seconds"] / rows_["ours_precond"]["seconds"]
        )
    assert "the whole-batch ours_precond" in table

    streamed = result["streamed"]
    assert streamed["feature_bytes"] >= 4 * streamed["budget_bytes"] - 4 * 16
    assert streamed["shards"] >= 32
    assert streamed["loss_rel_diff_vs_whole_batch"] == pytest.approx(0, abs=1e-5)


def test_fmnist_pixels_are_the_standardized_idx_pixels():
    from revisit_tf.benchmarks import probe_data
    from revisit_tf.data import idx

    data = idx.load_idx_dataset()
    x, y = probe_data.features(
        "fmnist_pixels", 60000, 784, classes=10, spread=0, seed=0, split="train"
    )
    assert x.shape == (60000, 784) and x.dtype == np.float32
    np.testing.assert_array_equal(y, data["train"][1])
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
    assert np.all(np.abs(x.std(axis=0) - 1) < 1e-3)
    tx, ty = probe_data.features(
        "fmnist_pixels", 100, 784, classes=10, spread=0, seed=0, split="test"
    )
    np.testing.assert_array_equal(ty, data["test"][1][:100])
    pixels = data["train"][0].reshape(-1, 784).astype(np.float64)
    expected = (data["test"][0][:100].reshape(100, 784) - pixels.mean(0)) / pixels.std(
        0
    )
    np.testing.assert_allclose(tx, expected, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="fmnist_pixels has D = 784"):
        probe_data.features(
            "fmnist_pixels", 10, 783, classes=10, spread=0, seed=0, split="train"
        )


def test_bad_size_is_rejected(capsys):
    with pytest.raises(SystemExit):
        probe.main(["--sizes", "600by16"])
    assert "a size is NxD" in capsys.readouterr().err


def test_path_row_runs_the_protocol_streamed_and_whole_batch(tmp_path, capsys):
    """The L2-path row: the lbfgs protocol's path and refit streamed under the
    budget and whole-batch on the same data (same selected l2, same test
    predictions up to float32 rounding), scikit-learn on the refit's l2 to
    our loss; with no time budget, scikit-learn's time is extrapolated."""
    out = tmp_path / "path.json"
    argv = ["--solvers", "--stream_budget_mb", "0", "--spread", "0.3"]
    argv += ["--path_size", "1500x12", "--path_classes", "6"]
    argv += ["--path_eval_rows", "300", "--output", str(out)]
    argv += ["--cache_dir", str(tmp_path / "cache")]
    assert probe.main(argv) == 0
    table = capsys.readouterr().out
    assert "L2-path row (1500x12, 6 classes" in table
    row = json.loads(out.read_text())["path"]
    streamed, whole = row["streamed"], row["whole_batch"]
    assert streamed["streamed"] is True and whole["streamed"] is False
    assert row["feature_bytes"] == 4 * 1500 * 12
    assert row["budget_bytes"] == row["feature_bytes"] // 4
    assert row["shards"] >= 16
    # The whole default grid was visited, largest l2 first, then the refit.
    from revisit_tf.probe import protocols

    visited = [p["l2"] for p in streamed["l2_path"] if not p["extended"]]
    assert visited == list(protocols.DEFAULT_L2_GRID)
    assert streamed["refit_iterations"] > 0
    assert streamed["l2"] == whole["l2"]
    assert streamed["test_top1"] == pytest.approx(whole["test_top1"], abs=2 / 300)
    assert row["streamed_vs_whole_batch"] == pytest.approx(
        streamed["seconds"] / whole["seconds"]
    )
    sk = row["sklearn"]
    assert sk["reached"] and sk["loss"] <= row["target_loss"]
    assert row["target_loss"] == pytest.approx(row["refit_loss"] * (1 + 1e-4))
    # One iteration fewer than its count does not reach our loss.
    assert sk["iterations_known_short"] == sk["iterations"] - 1

    budgeted = probe_path.extrapolate(
        [(2, 0.2, 2.0), (8, 0.8, 1.5), (16, 1.6, 1.2)], 0.1, 1.0, 3.0
    )
    assert budgeted["extrapolated"] and not budgeted["reached"]
    assert budgeted["seconds_lower_bound"] == pytest.approx(1.6)
    # Gap to the floor (1 - 1e-5) shrinks by (0.5+1e-5)/(0.2+1e-5) per 8
    # iterations; reaching 1e-5 from 0.2 + 1e-5 takes log(2e4 + 1) / rate more.
    rate = np.log((0.5 + 1e-5) / (0.2 + 1e-5)) / 8
    expected = 0.1 * (16 + np.log((0.2 + 1e-5) / 1e-5) / rate)
    assert budgeted["seconds_estimate"] == pytest.approx(expected, rel=1e-6)
