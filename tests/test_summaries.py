"""TensorBoard summaries (train.summaries): input pictures, config, probe sweep.

The layout functions are checked on constructed batches against what the task
means (a Rotation row is 4 rot90s of one image, a Jigsaw puzzle put back by
the inverse permutation is the true grid); the writers are checked by reading
the event files back: a smoke ``pretrain`` writes its input pictures, the
config text round-trips, and a pixel probe writes one scalar per L2 equal to
its row's ``l2_path``. Progress lines: ``progress.Progress`` and the feature
extractor's rate-limited log.
"""

import json
import logging
import os
import types

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from revisit_tf import cli, configurables, experiments, progress
from revisit_tf.models import heads
from revisit_tf.pp import ops_patches
from revisit_tf.probe import features as features_lib
from revisit_tf.probe import protocols as protocols_lib
from revisit_tf.train import summaries

RNG = np.random.default_rng(0)
DEMO = "demo/fashion_mnist_rotation.gin"


def _panels(row: np.ndarray, count: int, width: int, gap: int) -> list[np.ndarray]:
    """The ``count`` panels of a picture row ``[H, W, C]``, left to right."""
    return [row[:, i * (width + gap) : i * (width + gap) + width] for i in range(count)]


def _cells(panel: np.ndarray, side: int, size: int, gap: int) -> list[np.ndarray]:
    """The ``side * side`` cells of a patch grid panel, row-major."""
    step = size + gap
    return [
        panel[r * step : r * step + size, c * step : c * step + size]
        for r in range(side)
        for c in range(side)
    ]


# --- Layout functions. -------------------------------------------------------


def test_rescale_maps_each_example_jointly_to_0_1():
    x = np.stack([np.full((2, 3), 5.0), np.arange(6.0).reshape(2, 3) * 2 - 3])
    out = summaries.rescale(x)
    np.testing.assert_allclose(out[0], 0.5)  # constant: mid-grey
    assert out[1].min() == 0 and out[1].max() == 1
    np.testing.assert_allclose(out[1].ravel(), np.arange(6) / 5, rtol=1e-6)


def test_rotation_panels_are_rot90_of_each_other():
    images = RNG.normal(size=(3, 8, 8, 3)).astype(np.float32)
    views = np.stack(
        [[np.rot90(im, r, axes=(0, 1)) for r in range(4)] for im in images]
    )
    grid = summaries.views_grid(views)
    assert grid.shape == (3, 8, 4 * 8 + 3 * summaries.GAP, 3)
    assert grid.dtype == np.float32 and grid.min() >= 0 and grid.max() <= 1
    for b in range(3):
        panels = _panels(grid[b], 4, 8, summaries.GAP)
        for r in range(4):
            np.testing.assert_allclose(
                panels[r], np.rot90(panels[0], r, axes=(0, 1)), atol=1e-6
            )
        # One min-max per example (the views keep their relative values).
        np.testing.assert_allclose(
            panels[0], summaries.rescale(images[b : b + 1])[0], atol=1e-6
        )
    # The separators are white, the test can fail: an unrotated copy differs.
    assert (grid[:, :, 8 : 8 + summaries.GAP] == summaries.SEPARATOR).all()
    assert not np.allclose(panels[1], panels[0])


def test_jigsaw_puzzle_put_back_by_the_inverse_permutation_is_the_true_grid():
    size, gap = 5, summaries.CELL_GAP
    patches = RNG.normal(size=(2, 9, size, size, 1)).astype(np.float32)
    table = np.stack([np.random.default_rng(i).permutation(9) for i in range(10)])
    labels = np.array([[3, 7, 0], [9, 1, 4]])
    grid = summaries.jigsaw_grid(patches, table, labels)
    panel_side = 3 * size + 2 * gap
    assert grid.shape == (2, panel_side, 4 * panel_side + 3 * summaries.GAP, 1)
    for b in range(2):
        panels = _panels(grid[b], 4, panel_side, summaries.GAP)
        truth = _cells(panels[0], 3, size, gap)
        shown = summaries.rescale(patches[b : b + 1])[0]
        for i in range(9):  # panel 0: patch i at its own cell i
            np.testing.assert_allclose(truth[i], shown[i], atol=1e-6)
        for j, label in enumerate(labels[b]):
            perm = table[label]
            puzzle = _cells(panels[1 + j], 3, size, gap)
            back = [None] * 9
            for q in range(9):  # cell q holds patch perm[q]: put it at perm[q]
                back[perm[q]] = puzzle[q]
            for i in range(9):
                np.testing.assert_allclose(back[i], truth[i], atol=1e-6)
            if not np.array_equal(perm, np.arange(9)):
                assert not all(np.allclose(puzzle[q], truth[q]) for q in range(9)), (
                    "a shuffled puzzle must differ from the true grid"
                )


def test_rel_patch_pairs_are_drawn_at_their_cells():
    size, gap = 4, summaries.CELL_GAP
    patches = RNG.normal(size=(1, 9, size, size, 3)).astype(np.float32)
    table = np.asarray(heads.REL_PATCH_TABLE)
    grid = summaries.patch_set_grid(patches, table, np.arange(8)[None])
    panel_side = 3 * size + 2 * gap
    panels = _panels(grid[0], 8, panel_side, summaries.GAP)
    shown = summaries.rescale(patches)[0]
    for label, panel in enumerate(panels):
        neighbour = ops_patches.REL_PATCH_NEIGHBOURS[label]
        cells = _cells(panel, 3, size, gap)
        for q in range(9):
            if q in (neighbour, ops_patches.CENTRE_PATCH):
                np.testing.assert_allclose(cells[q], shown[q], atol=1e-6)
            else:
                np.testing.assert_array_equal(
                    cells[q], summaries.empty_cell(size, size, 3)
                )


def test_inpainting_row_is_masked_input_target_and_mask():
    target = RNG.uniform(-1, 1, (2, 6, 6, 3)).astype(np.float32)
    mask = np.zeros((2, 6, 6, 1), np.float32)
    mask[:, 2:4, 1:5] = 1
    image = target * (1 - mask)
    grid = summaries.inpainting_grid(image, target, mask)
    assert grid.shape == (2, 6, 3 * 6 + 2 * summaries.GAP, 3)
    masked, shown_target, shown_mask = _panels(grid[0], 3, 6, summaries.GAP)
    joint = summaries.rescale(np.stack([image[:1], target[:1]], axis=1))[0]
    np.testing.assert_allclose(masked, joint[0], atol=1e-6)
    np.testing.assert_allclose(shown_target, joint[1], atol=1e-6)
    np.testing.assert_array_equal(shown_mask, np.broadcast_to(mask[0], (6, 6, 3)))
    # The blanked region keeps one grey (the input's 0 in the joint scale).
    region = masked[2:4, 1:5]
    np.testing.assert_allclose(region, np.full_like(region, region[0, 0, 0]), atol=1e-6)


def test_pretext_grid_dispatches_on_the_batch_and_the_head_table():
    table = np.stack([np.random.default_rng(i).permutation(9) for i in range(5)])
    jigsaw = types.SimpleNamespace(
        name="jigsaw", layers=[heads.PatchCombine(table=table, num_patches=9)]
    )
    batch = {
        "image": tf.random.normal([6, 9, 4, 4, 1]),
        "label": tf.constant([[2, 4]] * 6),
    }
    grid, description = summaries.pretext_grid(batch, jigsaw)
    assert grid.shape[0] == summaries.NUM_EXAMPLES  # the first 4 of 6
    assert grid.shape[2] == 3 * (3 * 4 + 2) + 2 * summaries.GAP  # 1 + 2 panels
    assert "perm[q]" in description and "Labels of the first example: 2 4" in (
        description
    )
    assert "rescaled" in description
    rotation = types.SimpleNamespace(name="rotation", layers=[])
    grid, description = summaries.pretext_grid(
        {"image": np.zeros([2, 4, 8, 8, 3]), "label": np.tile(np.arange(4), (2, 1))},
        rotation,
    )
    assert grid.shape == (2, 8, 4 * 8 + 3 * summaries.GAP, 3)
    assert "90, 180 and 270 degrees" in description
    grid, _ = summaries.pretext_grid({"image": np.zeros([3, 8, 8, 1])})
    assert grid.shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="Cannot draw"):
        summaries.pretext_grid({"image": np.zeros([3, 8, 8])})
    with pytest.raises(ValueError, match="channels"):
        summaries.pretext_grid({"image": np.zeros([3, 8, 8, 2])})


def test_upscale_is_nearest_neighbour_by_an_integer_factor():
    grid = RNG.uniform(size=(2, 10, 7, 1)).astype(np.float32)
    big = summaries.upscale(grid, min_side=30)
    assert big.shape == (2, 30, 21, 1)
    np.testing.assert_array_equal(big[:, ::3, ::3], grid)
    assert summaries.upscale(grid, min_side=10) is grid
    assert summaries.upscale(grid, min_side=10_000).shape[1] == 10 * 8  # capped


def test_l2_step_is_log_scaled():
    assert [summaries.l2_step(v) for v in (1e-2, 3e-3, 1e-3, 3e-4, 1e-5)] == [
        200,
        252,
        300,
        352,
        500,
    ]
    assert summaries.l2_step(0.0) == summaries.ZERO_L2_STEP
    with pytest.raises(ValueError):
        summaries.l2_step(-1.0)


# --- Writers, read back. -----------------------------------------------------


def _accumulator(logdir: str) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def _text(acc, tag) -> str:
    (event,) = acc.Tensors(tag)
    return tf.make_ndarray(event.tensor_proto).item().decode()


def test_smoke_pretrain_writes_its_input_pictures(tmp_path):
    cli.parse_gin([DEMO, "smoke.gin"], ["pretrain.steps = 2"])
    workdir = str(tmp_path / "rotation")
    configurables.pretrain(workdir=workdir)
    acc = _accumulator(os.path.join(workdir, "tensorboard"))
    assert "inputs/rotation" in acc.Tags()["tensors"]
    assert "train/loss" in acc.Tags()["tensors"]  # same event file as the loop
    (event,) = acc.Tensors("inputs/rotation")
    assert event.step == 0
    value = tf.make_ndarray(event.tensor_proto)  # [width, height, png...]
    width, height = int(value[0]), int(value[1])
    assert len(value) == 2 + summaries.NUM_EXAMPLES
    # 28-px copies, enlarged 4x: 4 panels and 3 gaps wide, one panel high.
    factor = 4
    assert (height, width) == (28 * factor, (4 * 28 + 3 * summaries.GAP) * factor)
    picture = tf.io.decode_png(value[2]).numpy()
    assert picture.shape == (height, width, 1)
    panels = _panels(picture, 4, 28 * factor, summaries.GAP * factor)
    for r in range(4):
        np.testing.assert_array_equal(panels[r], np.rot90(panels[0], r, axes=(0, 1)))
    metadata = acc.SummaryMetadata("inputs/rotation")
    assert metadata.plugin_data.plugin_name == "images"
    assert "rescaled" in metadata.summary_description


def test_config_text_round_trips(tmp_path):
    text = "pretrain.steps = 4\n# a comment\nbuild_trunk.width = 0.25\n"
    logdir = str(tmp_path / "tensorboard" / "config")
    summaries.write_config_text(logdir, text, step=3)
    acc = _accumulator(logdir)
    assert acc.SummaryMetadata(summaries.CONFIG_TAG).plugin_data.plugin_name == "text"
    assert _text(acc, summaries.CONFIG_TAG) == "```\n" + text.rstrip("\n") + "\n```"
    assert acc.Tensors(summaries.CONFIG_TAG)[0].step == 3


def test_pixel_probe_writes_one_scalar_per_l2_equal_to_its_row(tmp_path):
    workdir = str(tmp_path / "pixels")
    rows = experiments.linear_probe(
        workdir,
        dataset="fashion_mnist_idx",
        train_split="train[:120]",
        val_split="train[-60:]",
        test_split="test[:60]",
        features="pixels",
        protocols=(
            protocols_lib.LbfgsProbe(
                l2_grid=(1e-1, 1e-2, 1e-3), max_iterations=20, extend_l2=False
            ),
        ),
        batch_size=64,
    )
    (row,) = rows
    assert [p["l2"] for p in row["l2_path"]] == [1e-1, 1e-2, 1e-3]
    acc = _accumulator(os.path.join(workdir, "probe", "tensorboard"))
    prefix = "lbfgs/pixels"
    for key in ("val_top1", "train_top1", "iterations"):
        events = acc.Tensors(f"{prefix}/{key}")
        got = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events}
        want = {summaries.l2_step(p["l2"]): p[key] for p in row["l2_path"]}
        assert got.keys() == {100, 200, 300}
        for step, value in want.items():
            assert got[step] == pytest.approx(value, abs=1e-6), (key, step)
    (test,) = acc.Tensors(f"{prefix}/test_top1")
    assert test.step == summaries.l2_step(row["l2"])
    assert float(tf.make_ndarray(test.tensor_proto)) == pytest.approx(row["test_top1"])
    assert "| l2 | step |" in _text(acc, f"{prefix}/l2_path")
    # The row on disk records the same path.
    with open(os.path.join(workdir, "probe", "results.jsonl")) as f:
        (saved,) = [json.loads(line) for line in f]
    assert saved["l2_path"] == row["l2_path"]


def test_probe_sweep_scalars_of_a_subset_row_and_of_a_row_without_a_path():
    row = {
        "protocol": "lbfgs",
        "endpoint": "block4",
        "subset": 0.1,
        "l2": 1e-3,
        "test_top1": 0.5,
        "l2_path": [
            {"l2": 1e-2, "val_top1": 0.4, "iterations": 3},
            {"l2": 1e-3, "val_top1": 0.6, "iterations": 5},
        ],
    }
    assert summaries.probe_sweep_scalars(row) == [
        ("lbfgs/block4_10pct/val_top1", 200, 0.4),
        ("lbfgs/block4_10pct/iterations", 200, 3.0),
        ("lbfgs/block4_10pct/val_top1", 300, 0.6),
        ("lbfgs/block4_10pct/iterations", 300, 5.0),
        ("lbfgs/block4_10pct/test_top1", 300, 0.5),
    ]
    knn = {"protocol": "knn", "endpoint": "pre_logits", "subset": 1.0, "k": 20}
    assert summaries.probe_sweep_scalars(knn) == []
    assert summaries.write_probe_sweep("/nonexistent/never/written", [knn]) == 0


# --- Progress. ---------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_summary_and_eta():
    assert progress.format_duration(3725.2) == "1h02m05s"
    assert progress.format_duration(65) == "1m05s"
    assert progress.format_duration(-3) == "0m00s"
    clock = _Clock()
    p = progress.Progress(10, every_s=30, clock=clock)
    clock.now += 62
    assert p.summary(3) == "3/10 (30%), elapsed 1m02s, ETA 2m24s"
    assert progress.Progress(None, clock=clock).summary(3) == "3, elapsed 0m00s"
    assert p.due() and not p.due()  # at most once per interval
    clock.now += 29
    assert not p.due()
    clock.now += 1
    assert p.due()


def test_feature_progress_names_total_rate_and_eta(caplog):
    clock = _Clock()
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": tf.zeros([10, 2, 2, 1]), "label": tf.range(10)}
    ).batch(3)  # 4 batches, cardinality known

    def slow_batches():
        for images, labels in features_lib.log_progress(
            ds, "Features", every_s=1, clock=clock
        ):
            clock.now += 0.5  # a batch takes 0.5 s: a line every other batch
            yield images, labels

    with caplog.at_level(logging.INFO):
        got = np.concatenate([labels for _, labels in slow_batches()])
    np.testing.assert_array_equal(got, np.arange(10))
    lines = [r.getMessage() for r in caplog.records if "Features" in r.getMessage()]
    assert lines == [
        "Features: batch 2/4 (50%), elapsed 0m01s, ETA 0m01s; 6 images, 6 images/s.",
        "Features: batch 4/4 (100%), elapsed 0m02s, ETA 0m00s; 10 images, 5 images/s.",
    ]
