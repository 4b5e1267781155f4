"""tools/accelerator_check.sh runs in its reduced (CPU) mode and writes its table.

The GPU check cannot rot: the same script, the same rows (every section), on
tiny trunks. Speed is never asserted, only the harness: rows present, ratios
recomputed from the rows' own numbers, the time budget's skips named.
"""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "accelerator_check.sh")


def _run(out, *options):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        ["bash", SCRIPT, str(out), "--reduced", *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "accelerator.json") as f:
        return json.load(f), (out / "accelerator.md").read_text(), proc.stdout


def test_reduced_check_runs_every_section_and_its_ratios_add_up(tmp_path):
    result, table, stdout = _run(
        tmp_path / "check",
        "--archs",
        "resnet50_v1",
        "--modes",
        "f32_xla",
        "--rounds",
        "1",
    )
    rows = result["rows"]
    assert result["skipped"] == []
    assert result["machine"]["cpus"] == os.cpu_count() and result["machine"]["cpu"]
    sections = [(r["section"], r["model"]) for r in rows]
    assert sections[:2] == [
        ("trunk", "keras.applications.ResNet50"),
        ("trunk", "resnet50_v1"),
    ]
    assert rows[0]["mode"] == "bf16_xla" and rows[1]["mode"] == "f32_xla"
    for task in ("rotation", "jigsaw"):
        built = {
            r["construction"]: r
            for r in rows
            if r["section"] == "pretext" and r["model"] == task
        }
        assert set(built) == {"device", "prebuilt"}
        (trunk,) = [
            r
            for r in rows
            if r["section"] == "pretext_trunk_only" and r["task"] == task
        ]
        device = built["device"]
        assert device["vs_prebuilt"] == pytest.approx(
            device["images_per_sec"] / built["prebuilt"]["images_per_sec"]
        )
        views = 4 if task == "rotation" else 9
        assert trunk["trunk_inputs"] == views * device["source_images"]
        # The pretext model's own trunk: Rotation's 4 logits, Jigsaw's
        # embedding (EMBED_DIM = 16 in --reduced), not a 1000-way trunk.
        assert trunk["trunk_logits"] == (4 if task == "rotation" else 16)
        assert device["vs_trunk_only"] == pytest.approx(
            device["images_per_sec"] * views / trunk["images_per_sec"]
        )
    (probe,) = [r for r in rows if r["section"] == "probe"]
    assert probe["iterations"] >= 1 and probe["loss"] > 0
    for row in rows:
        if row["section"] != "probe":
            assert row["images_per_sec"] > 0 and row["warmup_seconds"] > 0
    assert table.count("\n| ") == len(rows) + 1  # header, rule, one per row
    assert "| pretext | jigsaw | f32_xla | device |" in table
    assert "--reduced: the trunks have one unit per stage" in table
    assert table.strip() in stdout


def test_time_budget_skips_rows_by_name(tmp_path):
    result, table, _ = _run(tmp_path / "none", "--time_budget_s", "0")
    assert result["rows"] == []
    assert result["skipped"][0] == "keras.applications.ResNet50 bf16_xla"
    assert "probe" in result["skipped"] and "Skipped (time budget)" in table
