"""`revisit-benchmark input` runs end to end at a tiny size and writes JSON.

Speed itself is never asserted (machines are noisy); only the harness is:
the rows, the cores formula, the generated JPEGs and their cache.
"""

import json
import os

import pytest
import tensorflow as tf

from revisit_tf import benchmarks
from revisit_tf.benchmarks import input as input_bench

TINY = ["--num_images", "16", "--batch", "4", "--batches", "2", "--warmup", "1"]
TINY += ["--min_side", "32", "--max_side", "96", "--accelerator_images_per_sec", "900"]


def _file_state(cache):
    return {
        name: os.stat(cache / name).st_mtime_ns for name in sorted(os.listdir(cache))
    }


def test_tiny_run_rows_cores_and_cached_jpegs(tmp_path, capsys):
    cache, out = tmp_path / "jpegs", tmp_path / "bench" / "input.json"
    argv = ["input", *TINY, "--cache_dir", str(cache), "--output", str(out)]
    assert benchmarks.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cpus"] == os.cpu_count() and result["machine"]["cpu"]
    rows = result["rows"]
    settings = list(input_bench.SETTINGS)
    expected = [
        (pretext, mode, setting)
        for pretext in input_bench.PRETEXTS
        for mode in (
            ("host", "device")
            if pretext in ("rotation", "jigsaw", "rel_patch_location")
            else ("host",)
        )
        for setting in settings
    ]
    assert [(r["pretext"], r["mode"], r["setting"]) for r in rows] == expected
    views = {"rotation": 4, "jigsaw": 9, "rel_patch_location": 9, "exemplar": 8}
    cpus = os.cpu_count()
    for r in rows:
        assert r["views"] == views.get(r["pretext"], 1)
        assert r["batches"] == 2 and r["batch"] == 4
        assert r["seconds"] > 0 and r["source_images_per_sec"] > 0
        assert r["source_images_per_sec"] == pytest.approx(8 / r["seconds"])
        assert r["trunk_inputs_per_sec"] == pytest.approx(
            r["source_images_per_sec"] * r["views"]
        )
        assert r["source_images_per_cpu_second"] == pytest.approx(8 / r["cpu_seconds"])
        assert r["threads"] == (1 if r["setting"] == "one_core" else cpus)
        per_core = r["source_images_per_sec"] / r["threads"]
        assert r["source_images_per_sec_per_core"] == pytest.approx(per_core)
        assert r["accelerator_source_images_per_sec"] == pytest.approx(900 / r["views"])
        assert r["cores_per_accelerator"] == pytest.approx(900 / r["views"] / per_core)
    jigsaw = next(r for r in rows if r["pretext"] == "jigsaw")
    assert jigsaw["pp_train_batch"] == "jigsaw_perms(100, 8)"
    assert jigsaw["view_shape"] == [64, 64, 3]
    printed = capsys.readouterr().out
    assert "cores/accel" in printed and "device vs host: rotation one_core" in printed
    assert "note: jigsaw's trunk inputs are 64x64" in printed

    # The JPEGs decode to the manifest's sizes, within the requested sides.
    manifest = json.loads((cache / input_bench.MANIFEST).read_text())
    assert len(manifest["images"]) == 16 and manifest["seed"] == 0
    for im in manifest["images"]:
        encoded = (cache / im["file"]).read_bytes()
        assert len(encoded) == im["bytes"]
        shape = tf.io.decode_jpeg(encoded).shape.as_list()
        assert shape == [im["height"], im["width"], 3]
        assert min(shape[:2]) >= 32 and max(shape[:2]) <= 96
    sizes = {(im["height"], im["width"]) for im in manifest["images"]}
    assert len(sizes) > 1  # drawn, not one fixed size
    mean_kb = sum(im["bytes"] for im in manifest["images"]) / 16 / 1000
    assert result["images"]["mean_jpeg_kb"] == pytest.approx(mean_kb)

    # A second run reuses the cache: no file is rewritten.
    before = _file_state(cache)
    quick = ["--pretexts", "supervised", "--settings", "one_core"]
    assert benchmarks.main(["input", *TINY, *quick, "--cache_dir", str(cache)]) == 0
    assert _file_state(cache) == before
    # Another seed regenerates them (other contents, a new manifest).
    argv = ["input", *TINY, *quick, "--cache_dir", str(cache), "--seed", "1"]
    assert benchmarks.main(argv) == 0
    after = _file_state(cache)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)
    assert json.loads((cache / input_bench.MANIFEST).read_text())["seed"] == 1


def test_image_draw_is_deterministic_and_imagenet_like():
    sizes = input_bench.image_sizes(4000, seed=0, min_side=100, max_side=1000)
    again = input_bench.image_sizes(4000, seed=0, min_side=100, max_side=1000)
    assert (sizes == again).all()
    height, width = sizes.mean(axis=0)
    assert 330 < height < 370 and 385 < width < 425
    aspect = sizes[:, 1] / sizes[:, 0]
    assert aspect.min() >= 0.49 and aspect.max() <= 2.01 and sizes.min() >= 100
    one = input_bench.synthetic_jpeg(3, 40, 50, seed=0)
    assert one == input_bench.synthetic_jpeg(3, 40, 50, seed=0)
    assert one != input_bench.synthetic_jpeg(4, 40, 50, seed=0)


def test_shipped_pipelines_come_from_the_gin_files():
    pp_train, pp_batch = input_bench.shipped_pipelines("rotation")
    assert pp_train.startswith("decode|") and "rotate4" in pp_train and pp_batch == ""
    pp_train, pp_batch = input_bench.shipped_pipelines("rel_patch_location")
    assert "crop_patches(3, 21)" in pp_train and pp_batch == "rel_patch_pairs"


def test_bad_arguments_fail_clearly(capsys, tmp_path):
    cache = ["--cache_dir", str(tmp_path / "never")]
    for argv, message in [
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--pretexts", "rotations"], "invalid choice: 'rotations'"),
        (["--settings", "fast"], "invalid choice: 'fast'"),
        (["--num_images", "-3"], "--num_images must be >= 1, got -3"),
        (["--max_side", "50", "--min_side", "64"], "--max_side 50 is below"),
        (["--seconds", "0"], "--seconds must be > 0, got 0.0"),
    ]:
        with pytest.raises(SystemExit):
            benchmarks.main(["input", *argv, *cache])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # failed before generating anything
    assert "input" in benchmarks.BENCHMARKS
