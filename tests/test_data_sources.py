"""Tests for revisit_tf.data.idx and revisit_tf.data.sources (stage 1).

Three kinds of data, all offline:
* tiny hand-made idx files in tmp_path (exact round trips and every corruption);
* the real Fashion-MNIST idx files of Debian's ``dataset-fashion-mnist``;
* TFDS: ``tfds.testing.mock_data`` with ``MockPolicy.USE_CODE`` (the only policy
  that works offline here: ``USE_FILES`` needs the real dataset_info.json), and
  a tiny generator-based dataset prepared locally in tmp_path, which exercises
  TFDS's real slicing and metadata (mocks ignore the split argument).
"""

import gzip
import os
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from revisit_tf.data import idx, sources
from revisit_tf.data.sources import get_source, num_examples, resolve_split

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------------------
# Helpers.


def _idx_bytes(array, *, zeros=b"\x00\x00", dtype_code=0x08, ndim=None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    ndim = array.ndim if ndim is None else ndim
    header = zeros + bytes([dtype_code, ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _write(path, content: bytes, *, compress: bool = False) -> str:
    with open(path, "wb") as f:
        f.write(gzip.compress(content) if compress else content)
    return str(path)


def _write_idx_dir(directory, splits, *, compress=True):
    """Writes {split: (images [N, H, W], labels [N])} as MNIST-named idx files."""
    os.makedirs(directory, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, (images, labels) in splits.items():
        prefix = {"train": "train", "test": "t10k"}[split]
        _write(
            os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"),
            _idx_bytes(images),
            compress=compress,
        )
        _write(
            os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"),
            _idx_bytes(labels),
            compress=compress,
        )
    return str(directory)


def _numbered(n, size=2):
    """n images whose pixels all equal their index, labels index % 10."""
    images = np.broadcast_to(
        np.arange(n, dtype=np.uint8)[:, None, None], (n, size, size)
    )
    return np.ascontiguousarray(images), np.arange(n, dtype=np.uint8) % 10


def _collect(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """All images [N, H, W, C] and labels [N] of a source, in order."""
    images, labels = [], []
    for batch in ds.batch(10_000):
        images.append(batch["image"].numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(images), np.concatenate(labels)


def _ids(ds: tf.data.Dataset) -> list[int]:
    """The index each numbered image carries (its top-left pixel)."""
    return [int(x["image"][0, 0, 0]) for x in ds]


# ---------------------------------------------------------------------------
# idx reader on hand-made files.


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 1, 3, 2)])
def test_read_idx_round_trip(tmp_path, compress, shape):
    array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape) * 7
    # Deliberately misleading names: compression is detected from the content.
    name = "data.raw" if compress else "data.gz"
    path = _write(tmp_path / name, _idx_bytes(array), compress=compress)
    got = idx.read_idx(path)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00", "shorter than the 4-byte magic"),
        (_idx_bytes([1, 2], zeros=b"\x12\x34"), "bad magic number"),
        (_idx_bytes([1, 2], dtype_code=0x0D), r"dtype code 0x0d \(float32\)"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (b"\x00\x00\x08\x05" + bytes(20), "declares 5 dimensions"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x03", "truncated inside its header"),
        (_idx_bytes(np.zeros((3, 4)))[:-1], "truncated"),
        (_idx_bytes(np.zeros((3, 4))) + b"\x00\x00", "2 extra bytes"),
        (b"\x1f\x8b" + b"not really gzip", "not a valid gzip stream"),
    ],
    ids=[
        "short",
        "magic",
        "dtype",
        "0-dims",
        "5-dims",
        "short-header",
        "truncated",
        "extra",
        "bad-gzip",
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, content, message):
    path = _write(tmp_path / "bad-idx1-ubyte", content)
    with pytest.raises(ValueError, match=message) as info:
        idx.read_idx(path)
    assert path in str(info.value)


def test_read_idx_gzip_truncated(tmp_path):
    compressed = gzip.compress(_idx_bytes(np.zeros((10, 10))))
    path = _write(tmp_path / "cut.gz", compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="not a valid gzip stream"):
        idx.read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope-idx3-ubyte"):
        idx.read_idx(tmp_path / "nope-idx3-ubyte")


def test_read_idx_cache_follows_file_changes(tmp_path):
    path = _write(tmp_path / "a-idx1-ubyte", _idx_bytes([1, 2, 3]))
    first = idx.read_idx(path)
    assert idx.read_idx(path) is first  # Unchanged file: served from the cache.
    assert not first.flags.writeable  # ... so callers cannot corrupt it.
    # Same size, new content and mtime: the cache must not serve stale data.
    _write(path, _idx_bytes([7, 8, 9]))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(idx.read_idx(path), [7, 8, 9])
    # New size.
    _write(path, _idx_bytes([4, 5]))
    np.testing.assert_array_equal(idx.read_idx(path), [4, 5])


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_dataset_round_trip(tmp_path, compress):
    train, test = _numbered(12, size=3), _numbered(4, size=3)
    data_dir = _write_idx_dir(
        tmp_path / "d", {"train": train, "test": test}, compress=compress
    )
    splits = idx.load_idx_dataset(data_dir)
    assert set(splits) == {"train", "test"}
    for split, (images, labels) in {"train": train, "test": test}.items():
        got_images, got_labels = splits[split]
        assert got_images.dtype == np.uint8 and got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_images, images[..., None])
        np.testing.assert_array_equal(got_labels, labels)


def _good_dir(tmp_path):
    return _write_idx_dir(tmp_path / "d", {"train": _numbered(6), "test": _numbered(3)})


def test_load_idx_dataset_count_mismatch(tmp_path):
    data_dir = _good_dir(tmp_path)
    path = _write(
        os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz"),
        _idx_bytes([1, 2]),
        compress=True,
    )
    with pytest.raises(ValueError, match="3 images but .* 2 labels") as info:
        idx.load_idx_dataset(data_dir)
    assert path in str(info.value)


def test_load_idx_dataset_label_out_of_range(tmp_path):
    data_dir = _good_dir(tmp_path)
    _write(
        os.path.join(data_dir, "train-labels-idx1-ubyte.gz"),
        _idx_bytes([0, 1, 2, 10, 4, 5]),
        compress=True,
    )
    with pytest.raises(ValueError, match=r"label 10 at index 3; .*\[0, 9\]"):
        idx.load_idx_dataset(data_dir)


def test_load_idx_dataset_wrong_ranks(tmp_path):
    data_dir = _good_dir(tmp_path)
    images_path = os.path.join(data_dir, "train-images-idx3-ubyte.gz")
    _write(images_path, _idx_bytes(np.arange(6)), compress=True)
    with pytest.raises(ValueError, match=r"shape \[6\]; expected rank 3"):
        idx.load_idx_dataset(data_dir)
    _write(images_path, _idx_bytes(_numbered(6)[0]), compress=True)
    _write(
        os.path.join(data_dir, "train-labels-idx1-ubyte.gz"),
        _idx_bytes(np.zeros((6, 1))),
        compress=True,
    )
    with pytest.raises(ValueError, match=r"shape \[6, 1\]; expected rank 1"):
        idx.load_idx_dataset(data_dir)


def test_load_idx_dataset_missing_directory(tmp_path):
    missing = str(tmp_path / "not-there")
    with pytest.raises(FileNotFoundError) as info:
        idx.load_idx_dataset(missing)
    assert missing in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "data_dir" in str(info.value)


def test_load_idx_dataset_missing_file(tmp_path):
    data_dir = _good_dir(tmp_path)
    os.remove(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        idx.load_idx_dataset(data_dir)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


# ---------------------------------------------------------------------------
# The real Debian Fashion-MNIST files through the `fashion_mnist_idx` source.


@pytest.fixture(scope="module")
def debian_dir():
    names = [
        f"{p}-{k}-ubyte.gz"
        for p in ("train", "t10k")
        for k in ("images-idx3", "labels-idx1")
    ]
    missing = [n for n in names if not os.path.isfile(os.path.join(DEBIAN_DIR, n))]
    if missing:
        pytest.fail(
            f"Fashion-MNIST idx files {missing} are missing from {DEBIAN_DIR}: "
            "run `apt-get install dataset-fashion-mnist`."
        )
    return DEBIAN_DIR


def test_debian_fashion_mnist_files(debian_dir):
    splits = idx.load_idx_dataset(debian_dir)
    (train_images, train_labels), (test_images, test_labels) = (
        splits["train"],
        splits["test"],
    )
    assert train_images.shape == (60_000, 28, 28, 1)
    assert test_images.shape == (10_000, 28, 28, 1)
    assert train_labels.shape == (60_000,) and test_labels.shape == (10_000,)
    # Fashion-MNIST is balanced (Xiao et al. 2017): 6,000 / 1,000 per class.
    np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), [6_000] * 10)
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [1_000] * 10)
    assert train_images.max() > 0  # Real pixels, not an all-zero payload.


def test_fashion_mnist_idx_split_aliases(debian_dir):
    expected_sizes = {
        "train": 50_000,
        "val": 10_000,
        "trainval": 60_000,
        "test": 10_000,
    }
    data = {}
    for split, size in expected_sizes.items():
        ds = get_source("fashion_mnist_idx", split)
        assert ds.element_spec["image"].shape == (28, 28, 1)
        assert ds.element_spec["image"].dtype == tf.uint8
        assert ds.element_spec["label"].dtype == tf.int64
        assert num_examples("fashion_mnist_idx", split) == size
        data[split] = _collect(ds)
        assert len(data[split][1]) == size  # num_examples agrees with iterating.
    # train and val are disjoint consecutive parts whose union is trainval.
    for i in (0, 1):
        np.testing.assert_array_equal(
            data["trainval"][i], np.concatenate([data["train"][i], data["val"][i]])
        )
    raw = idx.load_idx_dataset(debian_dir)
    np.testing.assert_array_equal(data["trainval"][0], raw["train"][0])
    np.testing.assert_array_equal(data["test"][1], raw["test"][1])
    # Explicit data_dir reads the same files.
    assert num_examples("fashion_mnist_idx", "val", data_dir=debian_dir) == 10_000


def test_fashion_mnist_idx_slices(debian_dir):
    raw = idx.load_idx_dataset(debian_dir)
    cases = {
        "train[:1000]": raw["train"][0][:1000],
        "test[-10%:]": raw["test"][0][-1000:],
        "train[50000:50010]": raw["train"][0][50_000:50_010],
    }
    for spec, expected in cases.items():
        assert resolve_split("fashion_mnist_idx", spec) == spec
        assert num_examples("fashion_mnist_idx", spec) == len(expected)
        images, _ = _collect(get_source("fashion_mnist_idx", spec))
        np.testing.assert_array_equal(images, expected)


# ---------------------------------------------------------------------------
# Slice grammar of array sources == TFDS's, checked against TFDS itself.


@pytest.fixture
def tiny_idx_dir(tmp_path):
    return _write_idx_dir(
        tmp_path / "tiny", {"train": _numbered(37), "test": _numbered(7)}
    )


@pytest.mark.parametrize(
    "spec",
    [
        "train[:10]",
        "train[-5:]",
        "train[5:-5]",
        "train[0:]",
        "train[10%:20%]",
        "train[:-10%]",
        "train[33%:]",
        "train[12.5%:50%]",
        "train[-37:]",
        "test[50%:]",
        "test[:-1]",
    ],
)
def test_array_slices_match_tfds_semantics(tiny_idx_dir, spec):
    sizes = {"train": 37, "test": 7}
    infos = {k: types.SimpleNamespace(num_examples=v) for k, v in sizes.items()}
    (instruction,) = tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)
    start = instruction.from_ or 0
    stop = sizes[instruction.splitname] if instruction.to is None else instruction.to
    expected = list(range(start, stop))
    got = _ids(get_source("fashion_mnist_idx", spec, data_dir=tiny_idx_dir))
    assert got == expected
    assert num_examples("fashion_mnist_idx", spec, data_dir=tiny_idx_dir) == len(
        expected
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("train[:38]", "outside a split of 37"),
        ("train[-40:]", "outside a split of 37"),
        ("train[10%:20]", "mixes percent and absolute"),
        ("train[:101%]", r"\[-100, 100\]"),
        ("train[1.5:]", "Bad bound"),
        ("train[a:b]", "Bad bound"),
        ("train[3]", "Cannot parse split"),
        ("train[:]", r"has no bound.*'train\[0:\]'"),
        ("train[:5]+test[:5]", "Cannot parse split"),
        ("validation[:5]", r"unknown official split 'validation'.*\['test', 'train'\]"),
    ],
)
def test_array_slice_errors(tiny_idx_dir, spec, message):
    with pytest.raises(ValueError, match=message):
        get_source("fashion_mnist_idx", spec, data_dir=tiny_idx_dir)


def test_unknown_split_lists_aliases(tiny_idx_dir):
    with pytest.raises(ValueError) as info:
        get_source("fashion_mnist_idx", "validation", data_dir=tiny_idx_dir)
    message = str(info.value)
    assert "'validation'" in message
    for alias in ("train", "val", "trainval", "test"):
        assert repr(alias) in message
    assert "train[:1000]" in message  # The slice form.


def test_carve_larger_than_train_is_an_error(tiny_idx_dir):
    # fashion_mnist_idx holds out 10,000 examples; this directory has 37.
    with pytest.raises(
        ValueError, match="10000 held-out .* official train split of 37"
    ):
        get_source("fashion_mnist_idx", "val", data_dir=tiny_idx_dir)


def test_register_array_source(monkeypatch):
    monkeypatch.setattr(sources, "_ARRAY_SOURCES", dict(sources._ARRAY_SOURCES))
    monkeypatch.setattr(sources, "_SPLIT_CONVENTIONS", dict(sources._SPLIT_CONVENTIONS))
    images, labels = _numbered(150)
    arrays = {"train": (images[..., None], labels.astype(np.int64))}
    source = sources.ArraySource(load=lambda data_dir: arrays, default_data_dir="/x")
    sources.register_array_source("tiny_synthetic", source)
    # Default convention: 2% of 150 = 3 held out.
    assert resolve_split("tiny_synthetic", "val") == "train[147:]"
    assert _ids(get_source("tiny_synthetic", "val")) == [147, 148, 149]
    with pytest.raises(ValueError, match="already taken"):
        sources.register_array_source("tiny_synthetic", source)
    with pytest.raises(ValueError, match="already taken"):
        sources.register_array_source("cifar10", source)


# ---------------------------------------------------------------------------
# Names and split aliases of TFDS datasets (no data needed).


@pytest.mark.parametrize(
    "name, split, expected",
    [
        # Reference section 2: 1,231,121 train + 50,046 val = 1,281,167.
        ("imagenet2012", "train", "train[:1231121]"),
        ("imagenet2012", "val", "train[1231121:]"),
        ("imagenet2012", "trainval", "train"),
        ("imagenet2012", "test", "validation"),
        ("places365_small", "test", "validation"),
        ("fashion_mnist", "train", "train[:50000]"),
        ("fashion_mnist", "val", "train[50000:]"),
        ("mnist", "val", "train[50000:]"),
        ("cifar10", "train", "train[:45000]"),
        ("cifar10", "val", "train[45000:]"),
        ("cifar100", "val", "train[45000:]"),
        ("cifar10", "test", "test"),
        ("cifar10", "test[:10%]", "test[:10%]"),
        ("cifar10", "train[:10%]+test", "train[:10%]+test"),  # TFDS: passed on.
    ],
)
def test_resolve_split_tfds(name, split, expected):
    assert resolve_split(name, split) == expected


@pytest.mark.parametrize(
    "name, suggestion",
    [("fashion_mnist_idy", "fashion_mnist_idx"), ("cifar1O", "cifar10")],
)
def test_unknown_dataset_suggests_close_names(name, suggestion):
    with pytest.raises(ValueError, match="Unknown dataset") as info:
        get_source(name, "train")
    assert repr(name) in str(info.value)
    assert repr(suggestion) in str(info.value)
    with pytest.raises(ValueError, match=suggestion):
        resolve_split(name, "train")


# ---------------------------------------------------------------------------
# TFDS mocks.


@pytest.mark.parametrize(
    "name, image_shape", [("cifar10", (32, 32, 3)), ("imagenet2012", (None, None, 3))]
)
def test_tfds_mock_gives_the_contract(tmp_path, name, image_shape):
    with tfds.testing.mock_data(
        num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=str(tmp_path)
    ):
        for split in sources.SPLIT_ALIASES:
            ds = get_source(name, split, data_dir=tmp_path)
            # Extra features ("id", "file_name") are dropped.
            assert set(ds.element_spec) == {"image", "label"}
            assert ds.element_spec["image"].dtype == tf.uint8
            assert tuple(ds.element_spec["image"].shape) == image_shape
            assert ds.element_spec["label"].dtype == tf.int64
            examples = list(ds)
            assert len(examples) == 3
            assert examples[0]["image"].shape.rank == 3


def test_tfds_reads_the_resolved_split(tmp_path):
    requested = []

    def as_dataset(self, split, *args, **kwargs):
        requested.append(str(split))
        return tf.data.Dataset.from_tensors(
            {
                "id": tf.constant("x"),
                "image": tf.zeros([32, 32, 3], tf.uint8),
                "label": tf.constant(7, tf.int64),
            }
        )

    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE,
        as_dataset_fn=as_dataset,
        data_dir=str(tmp_path),
    ):
        for split in ("train", "val", "trainval", "test", "train[:7]"):
            (example,) = list(get_source("cifar10", split, data_dir=tmp_path))
            assert int(example["label"]) == 7
    assert requested == ["train[:45000]", "train[45000:]", "train", "test", "train[:7]"]


# ---------------------------------------------------------------------------
# A real (tiny, locally generated) TFDS dataset: real slicing and metadata.


class RevisitTinyNumbers(tfds.core.GeneratorBasedBuilder):
    """100 train / 7 test images whose pixels equal their index.

    Feature names differ from "image"/"label" and the label is int32, to check
    the mapping through supervised_keys and the int64 cast.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "pixels": tfds.features.Image(shape=(2, 2, 3)),
                    "digit": tfds.features.Tensor(shape=(), dtype=np.int32),
                    "index": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
            supervised_keys=("pixels", "digit"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(100),
            "test": self._generate_examples(7),
        }

    def _generate_examples(self, num):
        for i in range(num):
            yield (
                i,
                {
                    "pixels": np.full((2, 2, 3), i, np.uint8),
                    "digit": i % 10,
                    "index": i,
                },
            )


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    # Local generation from the class above: nothing is downloaded.
    RevisitTinyNumbers(data_dir=data_dir).download_and_prepare()
    return data_dir


def test_tfds_prepared_dataset_splits(tiny_tfds_dir):
    name = "revisit_tiny_numbers"
    # Not in the split table: 2% of the 100 official train examples held out.
    assert resolve_split(name, "train", data_dir=tiny_tfds_dir) == "train[:98]"
    assert resolve_split(name, "val", data_dir=tiny_tfds_dir) == "train[98:]"
    ids = {}
    for split, size in {"train": 98, "val": 2, "trainval": 100, "test": 7}.items():
        ds = get_source(name, split, data_dir=tiny_tfds_dir)
        assert set(ds.element_spec) == {"image", "label"}
        assert ds.element_spec["image"].dtype == tf.uint8
        assert ds.element_spec["label"].dtype == tf.int64
        assert num_examples(name, split, data_dir=tiny_tfds_dir) == size
        ids[split] = _ids(ds)
        assert len(ids[split]) == size
        labels = [int(x["label"]) for x in ds]
        assert labels == [i % 10 for i in ids[split]]
    assert ids["trainval"] == ids["train"] + ids["val"]
    assert sorted(ids["trainval"]) == list(range(100))
    assert sorted(ids["test"]) == list(range(7))
    # Deterministic order: a second read gives the same sequence.
    assert _ids(get_source(name, "trainval", data_dir=tiny_tfds_dir)) == ids["trainval"]
    # A TFDS slice is passed through and counted by TFDS's metadata.
    assert num_examples(name, "train[:10%]", data_dir=tiny_tfds_dir) == 10
    assert (
        _ids(get_source(name, "train[:10%]", data_dir=tiny_tfds_dir))
        == ids["trainval"][:10]
    )
    with pytest.raises(ValueError, match=r"unknown official split 'validation'"):
        get_source(name, "validation[:3]", data_dir=tiny_tfds_dir)
    with pytest.raises(ValueError, match=r"official splits are \['test', 'train'\]"):
        num_examples(name, "train[:3]+validation", data_dir=tiny_tfds_dir)


def test_tfds_data_contradicting_the_split_table(tiny_tfds_dir, monkeypatch):
    # Pretend the table believes the dataset has 1,000 train examples.
    conventions = dict(sources._SPLIT_CONVENTIONS)
    conventions["revisit_tiny_numbers"] = sources.SplitConvention(10, "test", 1_000)
    monkeypatch.setattr(sources, "_SPLIT_CONVENTIONS", conventions)
    assert resolve_split("revisit_tiny_numbers", "val") == "train[990:]"
    for split in ("train", "val"):
        with pytest.raises(ValueError, match="assumes 1000 .* data has 100"):
            get_source("revisit_tiny_numbers", split, data_dir=tiny_tfds_dir)
    # Aliases that do not carve are unaffected.
    assert (
        num_examples("revisit_tiny_numbers", "trainval", data_dir=tiny_tfds_dir) == 100
    )


@pytest.mark.parametrize("split", ["trainval", "val", "test"])
def test_tfds_unprepared_dataset_names_data_dir(tmp_path, split):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    for name in ("revisit_tiny_numbers", "cifar10"):
        with pytest.raises(FileNotFoundError) as info:
            get_source(name, split, data_dir=empty)
        message = str(info.value)
        assert repr(name) in message and empty in message
        assert f"tfds build {name}" in message
    with pytest.raises(FileNotFoundError, match="not prepared"):
        num_examples("cifar10", split, data_dir=empty)


def test_tfds_unprepared_imagenet_mentions_manual_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="downloads/manual") as info:
        get_source("imagenet2012", "train", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value)


# ---------------------------------------------------------------------------
# Issue 12: an empty split is an error naming the dataset and the split, raised
# before anything is read or trained on.


@pytest.mark.parametrize("spec", ["train[5:5]", "train[10:5]", "test[100%:]"])
def test_empty_array_split_is_named(tiny_idx_dir, spec):
    for fn in (get_source, num_examples):
        with pytest.raises(ValueError, match="empty") as info:
            fn("fashion_mnist_idx", spec, data_dir=tiny_idx_dir)
        assert "'fashion_mnist_idx'" in str(info.value)
        assert repr(spec) in str(info.value)


def test_empty_official_split_is_named_by_its_alias(tmp_path):
    empty = np.zeros((0, 2, 2), np.uint8), np.zeros((0,), np.uint8)
    data_dir = _write_idx_dir(
        tmp_path / "d", {"train": _numbered(37), "test": empty}, compress=False
    )
    for fn in (get_source, num_examples):
        with pytest.raises(ValueError, match=r"'test'.*empty") as info:
            fn("fashion_mnist_idx", "test", data_dir=data_dir)
        assert "'fashion_mnist_idx'" in str(info.value)


def test_empty_tfds_split_is_named(tiny_tfds_dir):
    name = "revisit_tiny_numbers"
    for fn in (get_source, num_examples):
        with pytest.raises(ValueError, match=r"'train\[5:5\]'.*empty") as info:
            fn(name, "train[5:5]", data_dir=tiny_tfds_dir)
        assert repr(name) in str(info.value)


def test_read_idx_refuses_devices_and_fifos(tmp_path):
    link = tmp_path / "train-images-idx3-ubyte"
    os.symlink("/dev/zero", link)
    with pytest.raises(ValueError, match="not a regular file") as info:
        idx.read_idx(link)
    assert str(link) in str(info.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        idx.read_idx(fifo)


# ---------------------------------------------------------------------------
# Issue 13 item 4: a TFDS dataset without a label feature is an unlabelled
# source ({"image"} only), not an error.


class RevisitTinyUnlabelled(tfds.core.GeneratorBasedBuilder):
    """12 train images and an id, no label and no supervised_keys."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(2, 2, 3)),
                    "id": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(12)}

    def _generate_examples(self, num):
        for i in range(num):
            yield i, {"image": np.full((2, 2, 3), i, np.uint8), "id": i}


def test_tfds_without_labels_is_an_unlabelled_source(tmp_path, tiny_tfds_dir):
    data_dir = str(tmp_path)
    RevisitTinyUnlabelled(data_dir=data_dir).download_and_prepare()
    name = "revisit_tiny_unlabelled"
    ds = get_source(name, "train[:10]", data_dir=data_dir)
    assert set(ds.element_spec) == {"image"}
    ids = _ids(ds)  # TFDS's stored order (by key hash): 10 distinct of 12
    assert len(set(ids)) == 10 and set(ids) <= set(range(12))
    assert not sources.has_labels(name, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"'train\[:10\]', has no labels") as info:
        sources.require_labels(
            name, "train[:10]", data_dir=data_dir, needed_by="linear_probe"
        )
    assert "['id', 'image']" in str(info.value) and "linear_probe" in str(info.value)
    # Labelled datasets are unchanged.
    assert sources.has_labels("revisit_tiny_numbers", data_dir=tiny_tfds_dir)
    assert sources.has_labels("fashion_mnist_idx")
