"""Issue 13 item 4: your own data (``image_folder``) and label-free pretraining.

Folders of 50 generated images (PIL: mixed sizes, JPEG and PNG, gray, RGB
and RGBA, mixed-case extensions, junk files) in tmp_path: a labelled layout
(one sub-folder per class) and a flat unlabelled one. Expectations are
computed here from what was written, independently of ``data.folder``.
"""

import fractions
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from revisit_tf import cli, configurables, experiments
from revisit_tf.data import folder, pipeline, sources
from revisit_tf.data.sources import get_source, num_examples

CLASSES = {"cat": 20, "dog": 17, "fish": 13}  # 50 images
MODES = ("RGB", "L", "RGBA")
FORMATS = ((".png", "PNG"), (".JPG", "JPEG"), (".jpeg", "JPEG"), (".Png", "PNG"))
# Small and fast: 2 steps of a tiny trunk at 32 px (smoke.gin plus these).
SMOKE = [
    "pretrain.train_split = 'train'",
    "pretrain.steps = 2",
    "pretrain.checkpoint_every = 2",
    "pretrain.seed = 0",
]
ROTATION_PP = (
    "pretrain.pp_train = 'decode|inception_crop(32)|flip_lr|rotate4|"
    'value_range(-1, 1)|keep("image", "label")\''
)


def _image(rng, index):
    """Image ``index``: its own size and mode, pixels random."""
    mode = MODES[index % 3]
    height, width = 20 + index % 7, 24 + (3 * index) % 11
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def _write_images(directory, names, rng, start=0):
    """Writes one image per name; returns {relative path: (PIL image, format)}."""
    written = {}
    for i, name in enumerate(names):
        extension, fmt = FORMATS[(start + i) % len(FORMATS)]
        image = _image(rng, start + i)
        if fmt == "JPEG" and image.mode == "RGBA":
            image = image.convert("RGB")  # JPEG has no alpha
        relative = f"{name}{extension}"
        path = os.path.join(directory, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path, fmt)
        if fmt == "JPEG":  # lossy: what PIL decodes from the file
            with Image.open(path) as decoded:
                image = decoded.convert(image.mode)
        written[relative.replace(os.sep, "/")] = (image, fmt)
    return written


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("labelled"))
    rng = np.random.default_rng(0)
    written, start = {}, 0
    for name, count in CLASSES.items():
        names = [f"{name}/img_{i:02d}" for i in range(count)]
        names[-1] = f"{name}/nested/deeper_{count}"  # sub-folders are searched
        written.update(_write_images(root, names, rng, start))
        start += count
    # Junk that is skipped: another type, hidden files and folders.
    for junk in ("cat/notes.txt", "dog/.DS_Store", "fish/._img_00.jpg", ".git/x.png"):
        os.makedirs(os.path.dirname(os.path.join(root, junk)), exist_ok=True)
        with open(os.path.join(root, junk), "wb") as f:
            f.write(b"not an image")
    return root, written


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("flat"))
    rng = np.random.default_rng(1)
    # Written in a scrambled order: the source's order is the sorted one.
    names = [f"photo_{i:02d}" for i in np.random.default_rng(2).permutation(50)]
    written = _write_images(root, names, rng)
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write("skipped")
    return root, written


def _expected_order(written):
    """Labelled order by the documented rule, with exact fractions."""
    by_class = {}
    for relative in sorted(written):
        by_class.setdefault(relative.split("/")[0], []).append(relative)
    names = sorted(by_class)
    keys = []
    for label, name in enumerate(names):
        files = by_class[name]
        for i, relative in enumerate(files):
            keys.append(
                (fractions.Fraction(2 * i + 1, 2 * len(files)), label, relative)
            )
    return [(relative, label) for _, label, relative in sorted(keys)]


def _pil_rgb(image):
    return np.asarray(image.convert("RGB"))


def test_labelled_folder_gives_pil_pixels_folder_labels_and_class_order(
    labelled, caplog
):
    root, written = labelled
    caplog.set_level(logging.INFO)
    folder._LOGGED.clear()
    ds = get_source("image_folder", "trainval", data_dir=root)
    assert set(ds.element_spec) == {"image", "label"}
    assert ds.element_spec["image"].dtype == tf.uint8
    assert tuple(ds.element_spec["image"].shape) == (None, None, 3)
    expected = _expected_order(written)
    examples = list(ds)
    assert len(examples) == 50
    names = sorted(CLASSES)
    for (relative, label), example in zip(expected, examples, strict=True):
        assert int(example["label"]) == label == names.index(relative.split("/")[0])
        image, fmt = written[relative]
        want = _pil_rgb(image)
        got = example["image"].numpy()
        assert got.shape == want.shape, relative
        if fmt == "PNG":  # exactly PIL's pixels (gray replicated, alpha dropped)
            np.testing.assert_array_equal(got, want, err_msg=relative)
        else:  # two JPEG decoders (IDCT, upsampling): equal up to rounding
            assert np.abs(got.astype(int) - want).mean() < 2, relative
    assert sources.class_names("image_folder", data_dir=root) == tuple(names)
    assert sources.has_labels("image_folder", data_dir=root)
    # Class names and the skipped files are logged.
    log = caplog.text
    assert "0: 'cat' 20, 1: 'dog' 17, 2: 'fish' 13" in log
    assert "1 .txt" in log and "3 hidden" in log
    # A second read gives the same order.
    again = [
        int(x["label"]) for x in get_source("image_folder", "trainval", data_dir=root)
    ]
    assert again == [label for _, label in expected]


def test_split_sizes_slices_and_stratification(labelled):
    root, written = labelled
    everything = [label for _, label in _expected_order(written)]
    sizes = {
        "trainval": 50,
        "train": 49,
        "val": 1,
        "train[:80%]": 40,
        "train[-10:]": 10,
    }
    for split, size in sizes.items():
        assert num_examples("image_folder", split, data_dir=root) == size
    slices = {
        "train": everything[:49],
        "val": everything[49:],
        "train[:80%]": everything[:40],
        "train[-10:]": everything[-10:],
        "train[10:20]": everything[10:20],
    }
    for split, want in slices.items():
        got = [
            int(x["label"]) for x in get_source("image_folder", split, data_dir=root)
        ]
        assert got == want, split
    # Every slice holds about its share of every class (not class by class).
    half = [
        int(x["label"])
        for x in get_source("image_folder", "train[:50%]", data_dir=root)
    ]
    assert len(half) == 25
    for label, name in enumerate(sorted(CLASSES)):
        assert abs(half.count(label) - 25 * CLASSES[name] / 50) <= 1, name
    # Sorted by folder (class by class), the last 20% would be 'fish' only.
    assert set(slices["train[-10:]"]) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"unknown official split 'test'.*\['train'\]"):
        get_source("image_folder", "test", data_dir=root)
    with pytest.raises(ValueError, match="outside a split of 50"):
        num_examples("image_folder", "train[:60]", data_dir=root)


def test_flat_folder_is_unlabelled_in_sorted_order(flat):
    root, written = flat
    ds = get_source("image_folder", "trainval", data_dir=root)
    assert set(ds.element_spec) == {"image"}
    assert not sources.has_labels("image_folder", data_dir=root)
    assert sources.class_names("image_folder", data_dir=root) is None
    got = [x["image"].numpy() for x in ds]
    want = [_pil_rgb(written[r][0]) for r in sorted(written)]
    assert [g.shape for g in got] == [w.shape for w in want]
    for relative, g, w in zip(sorted(written), got, want, strict=True):
        if written[relative][1] == "PNG":
            np.testing.assert_array_equal(g, w, err_msg=relative)


def test_options_labels_none_and_channels(labelled, flat):
    root, written = labelled
    unlabelled = get_source("image_folder/labels=none", "trainval", data_dir=root)
    assert set(unlabelled.element_spec) == {"image"}
    # labels=none: every image, in plain sorted path order.
    shapes = [tuple(x["image"].shape) for x in unlabelled]
    assert shapes == [_pil_rgb(written[r][0]).shape for r in sorted(written)]
    for channels, mode in ((1, "L"), (4, "RGBA")):
        ds = get_source(f"image_folder/channels={channels}", "train[:5]", data_dir=root)
        assert ds.element_spec["image"].shape[-1] == channels
        first = _expected_order(written)[0][0]
        image, fmt = written[first]
        got = next(iter(ds))["image"].numpy()
        if fmt == "PNG" and image.mode in ("RGB", "RGBA"):
            want = np.asarray(image.convert(mode))
            if channels == 1:
                # TF and PIL use different luma rounding: compare loosely.
                assert np.abs(got[..., 0].astype(int) - want).max() <= 1
            else:
                np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="no class sub-folders"):
        get_source("image_folder/labels=folders", "train", data_dir=flat[0])
    for bad in (
        "image_folder/labels=maybe",
        "image_folder/channels=2",
        "image_folder/x",
    ):
        with pytest.raises(ValueError, match="labels=none,channels=1"):
            num_examples(bad, "train", data_dir=root)


def test_clear_errors_for_missing_empty_mixed_and_bad_folders(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        get_source("image_folder", "train", data_dir=missing)
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="needs the folder as data_dir"):
        num_examples("image_folder", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    (empty / "b.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"holds no image file.*1 \.gif, 1 \.txt"):
        get_source("image_folder", "train", data_dir=str(empty))
    bad = tmp_path / "bad"
    _write_images(str(bad), [f"ok_{i}" for i in range(4)], np.random.default_rng(3))
    (bad / "fake.jpg").write_text("<html>not a jpeg</html>")
    (bad / "zero.png").write_bytes(b"")
    with pytest.raises(
        ValueError, match="2 of 6 image files cannot be decoded"
    ) as info:
        num_examples("image_folder", "train", data_dir=str(bad))
    assert str(bad / "fake.jpg") in str(info.value) and "zero.png is empty" in str(
        info.value
    )
    mixed = tmp_path / "mixed"
    _write_images(str(mixed), ["a/x", "b/y", "stray"], np.random.default_rng(4))
    with pytest.raises(ValueError, match="lie directly in it and would have no class"):
        get_source("image_folder", "train", data_dir=str(mixed))
    # labels=none reads the same folder: all 3 images.
    assert (
        num_examples("image_folder/labels=none", "trainval", data_dir=str(mixed)) == 3
    )


def test_a_file_replaced_after_listing_is_named_when_read(tmp_path):
    root = tmp_path / "changing"
    _write_images(str(root), ["a", "b"], np.random.default_rng(5))
    ds = get_source("image_folder", "trainval", data_dir=str(root))
    os.remove(root / "b.JPG")
    (root / "b.JPG").write_text("garbage")
    with pytest.raises(tf.errors.InvalidArgumentError, match="b.JPG"):
        list(ds)


def test_remote_folder_through_gfile():
    root = "ram://revisit_image_folder_test/photos"
    rng = np.random.default_rng(6)
    want = {}
    for name in ("b", "a/c", "a/d"):
        image = _image(rng, len(want))
        path = f"{root}/{name}.png"
        tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
        encoded = tf.io.encode_png(np.asarray(image.convert("RGB"))).numpy()
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(encoded)
        want[name] = _pil_rgb(image)
    ds = get_source("image_folder/labels=none", "trainval", data_dir=root)
    got = [x["image"].numpy() for x in ds]
    for name, g in zip(["a/c", "a/d", "b"], got, strict=True):
        np.testing.assert_array_equal(g, want[name])


def test_sharding_and_exact_resume_work_on_an_image_folder(labelled):
    root, _ = labelled

    def pp(example):
        return {
            "image": tf.image.resize(example["image"], [8, 8]),
            "label": example["label"],
        }

    def stream(start_step, context=None):
        ds = pipeline.make_train_dataset(
            lambda: get_source("image_folder", "train", data_dir=root),
            pp,
            global_batch_size=8,
            input_context=context,
            shuffle_buffer=16,
            seed=3,
            start_step=start_step,
        )
        return [b["image"].numpy() for b in ds.take(8 - start_step)]

    full, resumed = stream(0), stream(5)
    for a, b in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # Two input pipelines see disjoint halves of the split.
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(2, pipeline_id, 2)
        shard = pipeline.make_eval_dataset(
            get_source("image_folder", "trainval", data_dir=root),
            lambda x: {"label": x["label"]},
            batch_size=2,
            input_context=context,
        )
        seen.append([int(v) for b in shard for v in b["label"]])
    assert len(seen[0]) == len(seen[1]) == 25


def test_rotation_pretrains_on_a_labelled_folder(labelled, tmp_path):
    root, _ = labelled
    cli.parse_gin(
        ["imagenet/rotation.gin", "data/image_folder.gin", "smoke.gin"],
        [f"IMAGE_FOLDER = '{root}'", ROTATION_PP, *SMOKE],
    )
    metrics = configurables.pretrain(workdir=str(tmp_path / "rotation"))
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])


def test_jigsaw_pretrains_label_free_on_a_flat_folder(flat, tmp_path):
    root, _ = flat
    pp = (
        "pretrain.pp_train = 'decode|resize(40)|random_crop(36)|crop_patches(3, 2)|"
        'standardize|keep("image")\''
    )
    cli.parse_gin(
        ["imagenet/jigsaw.gin", "data/image_folder.gin", "smoke.gin"],
        [f"IMAGE_FOLDER = '{root}'", pp, "EMBED_DIM = 16", *SMOKE],
    )
    metrics = configurables.pretrain(workdir=str(tmp_path / "jigsaw"))
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])


def test_supervised_pretraining_on_unlabelled_data_is_a_clear_error(flat, tmp_path):
    root, _ = flat
    cli.parse_gin(
        ["imagenet/supervised.gin", "data/image_folder.gin", "smoke.gin"],
        [
            f"IMAGE_FOLDER = '{root}'",
            "pretrain.pp_train = 'decode|inception_crop(32)|value_range(-1, 1)|"
            'keep("image", "label")\'',
            *SMOKE,
        ],
    )
    with pytest.raises(ValueError, match="has no labels") as info:
        configurables.pretrain(workdir=str(tmp_path / "supervised"))
    message = str(info.value)
    assert "'image_folder'" in message and "'train'" in message and root in message
    assert "no class sub-folders" in message and "supervised pretraining" in message
    assert not os.path.exists(tmp_path / "supervised" / "checkpoints")


def test_linear_probe_on_unlabelled_data_is_a_clear_error(flat, tmp_path):
    root, _ = flat
    with pytest.raises(ValueError, match="has no labels") as info:
        experiments.linear_probe(
            str(tmp_path / "probe"),
            dataset="image_folder",
            data_dir=root,
            train_split="train[:30]",
            val_split="train[30:40]",
            test_split="train[40:]",
        )
    message = str(info.value)
    assert "'train[:30]'" in message and "linear_probe" in message and root in message
    # labels=none on a labelled folder is refused the same way.
    with pytest.raises(ValueError, match="read with labels=none"):
        sources.require_labels(
            "image_folder/labels=none", "train", data_dir=root, needed_by="a test"
        )
