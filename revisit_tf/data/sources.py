"""Data sources by name and split (stage 1 of the data flow).

Contract: ``get_source(name, split)`` returns a finite, deterministically
ordered (no file shuffling) ``tf.data.Dataset`` of
``{"image": uint8 [H, W, C], "label": int64 []}``, or of
``{"image": uint8 [H, W, C]}`` alone for an unlabelled source (which a
self-supervised pretext can still train on: its pp makes its labels);
nothing else is kept. ``has_labels(name)`` says which, without reading.
``num_examples(name, split)`` is its exact length, for step arithmetic
(reference section 7.1). An empty split is an error of both, naming the
dataset and the split, raised before anything is read. ``data.pipeline``
shards, shuffles and batches these datasets; ``pp`` turns the examples into
pretext inputs.

Names:
  * any TFDS dataset (``imagenet2012``, ``places365_small``, ``cifar10``,
    ``fashion_mnist``, ...), read from an already prepared ``data_dir`` with
    ``tfds.builder(name, data_dir=...).as_dataset(shuffle_files=False)``.
    Nothing is ever downloaded or prepared here.
    A TFDS dataset without a label feature (no ``supervised_keys`` and no
    ``label``) is unlabelled; its image is the ``image`` feature.
  * offline array sources registered in ``_ARRAY_SOURCES``; today
    ``fashion_mnist_idx``, the idx files of Debian's ``dataset-fashion-mnist``
    package (``data.idx``). ``register_array_source`` adds more.
  * ``image_folder``: your own JPEG/PNG files, ``data_dir`` being the folder
    (local or any ``tf.io.gfile`` URL such as ``gs://bucket/photos``); listing,
    labels, order and checks in ``data.folder``. Options follow a ``/``:
    ``image_folder/labels=none`` (``auto``: class sub-folders give labels, a
    flat folder none; ``folders``; ``none``) and ``channels=1|3|4`` (default
    3: grayscale is replicated, alpha dropped), e.g.
    ``image_folder/labels=none,channels=1``. Images are decoded in the source,
    keeping their sizes (``pp`` crops and resizes), so an image folder can
    stand in for ``imagenet2012`` in any config. Its one official split is
    ``train`` (every image); ``val`` is its last 2% and ``test`` does not
    exist: use slices such as ``train[-10%:]``.

Splits are the paper's aliases (reference section 2, split table):

  ==========  ==================================================================
  alias       meaning
  ==========  ==================================================================
  trainval    the full official training split
  train       official training split minus its last ``num_held_out`` examples
  val         those last ``num_held_out`` examples ("our validation split")
  test        the official test split; for datasets without a labelled test
              split (imagenet2012, places365_small) the official ``validation``
  ==========  ==================================================================

Held-out sizes (``SplitConvention``): imagenet2012 50,046 (the paper's), mnist,
fashion_mnist and fashion_mnist_idx 10,000, cifar10/cifar100 5,000, any other
dataset ``DEFAULT_HELD_OUT_PERCENT`` = 2% of its training split (at least 1).
The held-out examples are the LAST ones in TFDS's stored order, so ``val`` has
the paper's size but not its exact membership (reference section 2).

``resolve_split`` shows the TFDS slice an alias stands for, e.g. for
``fashion_mnist`` ``train`` -> ``train[:50000]`` and ``val`` ->
``train[50000:]``. Any other split containing ``[`` is a slice of an official
split (``train[:1000]``, ``test[-10%:]``): passed to TFDS as it is, and
interpreted by the same rules (``_parse_slice``) for array sources.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from revisit_tf.data import folder, idx

_logger = logging.getLogger(__name__)

SPLIT_ALIASES = ("train", "val", "trainval", "test")
# Held-out percentage of the official training split for datasets without a
# `num_held_out` (our choice; the paper only defines ImageNet's).
DEFAULT_HELD_OUT_PERCENT = 2
IMAGE_FOLDER = "image_folder"
# `image_folder/<key>=<value>,...` options and their defaults.
_FOLDER_OPTIONS = {"labels": "auto", "channels": "3"}


@dataclasses.dataclass(frozen=True)
class SplitConvention:
    """How the split aliases map onto one dataset's official splits.

    Attributes:
      num_held_out: Examples cut from the end of the official training split to
        form ``val``. ``None``: ``DEFAULT_HELD_OUT_PERCENT`` percent of it,
        floored, at least 1.
      test_split: The official split that plays ``test``.
      num_train: Size of the official training split when it is known without
        reading the data (lets ``resolve_split`` work before anything is
        prepared); checked against the data whenever the data is read.
    """

    num_held_out: int | None = None
    test_split: str = "test"
    num_train: int | None = None


_SPLIT_CONVENTIONS: dict[str, SplitConvention] = {
    # Reference section 2: train 1,231,121 + val 50,046 = 1,281,167 official
    # train images; `test` is the official ILSVRC-2012 validation set.
    "imagenet2012": SplitConvention(50_046, "validation", 1_281_167),
    # Its official `test` split is unlabelled (labels -1), as for ImageNet.
    "places365_small": SplitConvention(None, "validation"),
    # Official train sizes from the TFDS catalog / the datasets' papers.
    "mnist": SplitConvention(10_000, "test", 60_000),
    "fashion_mnist": SplitConvention(10_000, "test", 60_000),
    "cifar10": SplitConvention(5_000, "test", 50_000),
    "cifar100": SplitConvention(5_000, "test", 50_000),
    # Read from the arrays themselves, so any idx directory works.
    "fashion_mnist_idx": SplitConvention(10_000, "test"),
}


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """An offline source whose official splits are in-memory numpy arrays.

    Attributes:
      load: ``data_dir -> {official_split: (images uint8 [N, H, W, C],
        labels int64 [N])}``; raises ``FileNotFoundError`` naming what is
        missing. Should cache, it is called on every ``get_source``.
      default_data_dir: Used when ``get_source`` gets ``data_dir=None``.
    """

    load: Callable[[str], Mapping[str, tuple[np.ndarray, np.ndarray]]]
    default_data_dir: str


_ARRAY_SOURCES: dict[str, ArraySource] = {
    "fashion_mnist_idx": ArraySource(
        idx.load_idx_dataset, idx.DEFAULT_FASHION_MNIST_DIR
    ),
}


def register_array_source(
    name: str,
    source: ArraySource,
    convention: SplitConvention | None = None,
) -> None:
    """Adds an offline array source (e.g. another idx directory) by name.

    Args:
      name: The new source name; must not shadow a TFDS dataset or a source.
      source: How to load its official splits.
      convention: Its split aliases; ``None``: 2% held out, ``test`` = ``test``.

    Raises:
      ValueError: ``name`` is taken.
    """
    if name in _ARRAY_SOURCES or name in _tfds_names() or name == IMAGE_FOLDER:
        raise ValueError(f"Data source name {name!r} is already taken.")
    _ARRAY_SOURCES[name] = source
    _SPLIT_CONVENTIONS[name] = convention or SplitConvention()


# ---------------------------------------------------------------------------
# Names.


@functools.cache
def _tfds_names() -> frozenset[str]:
    return frozenset(tfds.list_builders(with_community_datasets=False))


def _base_name(name: str) -> str:
    """``"imagenet2012/subset:5.1.0"`` -> ``"imagenet2012"``."""
    return name.split("/")[0].split(":")[0]


def _check_name(name: str, data_dir: str | None) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"Dataset name must be a non-empty string, got {name!r}.")
    base = _base_name(name)
    if base == IMAGE_FOLDER:
        _folder_options(name)
        return
    if base in _ARRAY_SOURCES or base in _tfds_names():
        return
    try:  # A dataset prepared in data_dir without registered code still loads.
        tfds.builder(name, data_dir=data_dir)
        return
    except tfds.core.DatasetNotFoundError:
        pass
    raise ValueError(
        f"Unknown dataset {name!r}. Did you mean one of {_close_names(base)}? "
        "Expected a TFDS dataset name (see `tfds.list_builders()`), an offline "
        f"source {sorted(_ARRAY_SOURCES)} or {IMAGE_FOLDER!r} (a folder of images "
        "given as data_dir)."
    )


def _folder_options(name: str) -> dict[str, str]:
    """``"image_folder/labels=none,channels=1"`` -> its options (defaults filled)."""
    options = dict(_FOLDER_OPTIONS)
    form = (
        f"expected {IMAGE_FOLDER!r} or '{IMAGE_FOLDER}/<key>=<value>,...' with "
        f"labels in {list(folder.LABEL_MODES)} and channels in [1, 3, 4], e.g. "
        f"'{IMAGE_FOLDER}/labels=none,channels=1'"
    )
    if name != IMAGE_FOLDER:
        if not name.startswith(IMAGE_FOLDER + "/"):
            raise ValueError(f"Bad image folder source {name!r}; {form}.")
        for item in name[len(IMAGE_FOLDER) + 1 :].split(","):
            key, _, value = item.partition("=")
            if key not in options or not value:
                raise ValueError(f"Bad option {item!r} of {name!r}; {form}.")
            options[key] = value
    if options["labels"] not in folder.LABEL_MODES or options["channels"] not in (
        "1",
        "3",
        "4",
    ):
        raise ValueError(f"Bad image folder source {name!r}; {form}.")
    return options


def _close_names(name: str) -> list[str]:
    candidates = sorted(_tfds_names() | set(_ARRAY_SOURCES) | {IMAGE_FOLDER})
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    # difflib misses prefixes of long names ("imagenet" -> "imagenet2012").
    prefixed = [c for c in candidates if c.startswith(name) and c not in close]
    return (close + prefixed)[:8]


# ---------------------------------------------------------------------------
# Slices: the subset of the TFDS split grammar that array sources implement.

# "<split>[<from>:<to>]"; a bare "<split>" (whole split) is what aliases
# resolve to, users reach it only through them.
_SLICE_RE = re.compile(
    r"^(?P<split>[\w-]+)(?:\[(?P<from>[^:\[\]]*):(?P<to>[^:\[\]]*)\])?$"
)
_BOUND_RE = re.compile(r"^(?P<value>-?\d+(?:\.\d+)?)(?P<pct>%?)$")
_SLICE_FORM = (
    "'<official split>[<from>:<to>]' with integer or percent bounds, negative "
    "counting from the end, at most one empty (e.g. 'train[:1000]', "
    "'test[-10%:]', 'train[10%:20%]')"
)


@dataclasses.dataclass(frozen=True)
class _Slice:
    split: str
    start: float | None
    stop: float | None
    percent: bool

    def bounds(self, num: int, spec: str) -> tuple[int, int]:
        """Absolute ``[start, stop)`` in a split of ``num`` examples.

        Same arithmetic as TFDS (``tfds.core.ReadInstruction``, rounding
        "closest"): percents become ``round(p * num / 100)``, a bound whose
        magnitude exceeds ``num`` is an error, negatives count from the end.
        """

        def absolute(bound: float | None, default: int) -> int:
            if bound is None:
                return default
            value = int(round(bound * num / 100.0)) if self.percent else int(bound)
            if abs(value) > num:
                raise ValueError(
                    f"Split {spec!r}: bound {value} is outside a split of {num} "
                    "examples."
                )
            return value + num if value < 0 else value

        start, stop = absolute(self.start, 0), absolute(self.stop, num)
        return start, max(start, stop)


def _parse_slice(spec: str) -> _Slice:
    """Parses ``"name[from:to]"``; raises ``ValueError`` naming the form."""
    match = _SLICE_RE.match(spec)
    if not match:
        raise ValueError(f"Cannot parse split {spec!r}; expected {_SLICE_FORM}.")
    bounds, units = [], set()
    for text in (match["from"] or "", match["to"] or ""):
        if not text:
            bounds.append(None)
            continue
        bound = _BOUND_RE.match(text)
        if not bound or (not bound["pct"] and "." in bound["value"]):
            raise ValueError(
                f"Bad bound {text!r} in split {spec!r}; expected {_SLICE_FORM}."
            )
        units.add(bool(bound["pct"]))
        bounds.append(float(bound["value"]) if bound["pct"] else int(bound["value"]))
    if match["from"] is not None and not units:  # TFDS rejects "train[:]" too.
        raise ValueError(
            f"Split {spec!r} has no bound; expected {_SLICE_FORM} (whole split: "
            f"'{match['split']}[0:]')."
        )
    if len(units) > 1:
        raise ValueError(
            f"Split {spec!r} mixes percent and absolute bounds; use one unit."
        )
    percent = units == {True}
    if percent and any(b is not None and abs(b) > 100 for b in bounds):
        raise ValueError(f"Percent bounds of split {spec!r} must lie in [-100, 100].")
    return _Slice(match["split"], bounds[0], bounds[1], percent)


# ---------------------------------------------------------------------------
# Readers: one per kind of source, behind the same methods.


def _official_train_size(name: str, sizes: dict[str, int]) -> int:
    if "train" not in sizes:
        raise ValueError(
            f"{name!r} has no official 'train' split to carve 'train'/'val' "
            f"from; official splits are {sorted(sizes)}."
        )
    return sizes["train"]


def _slice_of(name: str, spec: str, sizes: Mapping[str, int]) -> tuple[str, int, int]:
    """``(official split, start, stop)`` of a slice of an in-memory listing."""
    parsed = _parse_slice(spec)
    if parsed.split not in sizes:
        raise ValueError(
            f"Split {spec!r} of {name!r} refers to unknown official split "
            f"{parsed.split!r}; official splits are {sorted(sizes)}."
        )
    return (parsed.split, *parsed.bounds(sizes[parsed.split], spec))


class _ArrayReader:
    """Reads a registered ``ArraySource`` from ``data_dir``."""

    def __init__(self, name: str, data_dir: str | None):
        source = _ARRAY_SOURCES[_base_name(name)]
        self.name = name
        self.data_dir = data_dir or source.default_data_dir
        self.splits = source.load(self.data_dir)

    def official_sizes(self) -> dict[str, int]:
        return {split: len(labels) for split, (_, labels) in self.splits.items()}

    def train_size(self) -> int:
        return _official_train_size(self.name, self.official_sizes())

    def _slice(self, spec: str) -> tuple[str, int, int]:
        return _slice_of(self.name, spec, self.official_sizes())

    def unlabelled_because(self) -> None:
        """None: array sources always have labels."""
        return None

    def class_names(self) -> None:
        return None

    def count(self, spec: str) -> int:
        _, start, stop = self._slice(spec)
        return stop - start

    def known_count(self, spec: str) -> int:
        """``count``: free for arrays."""
        return self.count(spec)

    def read(self, spec: str) -> tf.data.Dataset:
        split, start, stop = self._slice(spec)
        images, labels = self.splits[split]
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[start:stop], "label": labels[start:stop]}
        )


class _TfdsReader:
    """Reads a prepared TFDS dataset; never downloads or prepares it."""

    def __init__(self, name: str, data_dir: str | None):
        self.name = name
        self.builder = tfds.builder(name, data_dir=data_dir)
        self.data_dir = data_dir or "the TFDS default data directory"

    def _not_prepared(self) -> FileNotFoundError:
        base = _base_name(self.name)
        how = (
            f"`tfds build {base} --data_dir <data_dir>` (or "
            f"tfds.builder({base!r}, data_dir=...).download_and_prepare())"
        )
        if base == "imagenet2012":
            how = (
                "downloading ILSVRC2012_img_{train,val}.tar by hand from "
                "image-net.org into <data_dir>/downloads/manual/, then " + how
            )
        return FileNotFoundError(
            f"Dataset {self.name!r} is not prepared: no TFDS data at "
            f"{self.builder.data_dir!r} (data_dir searched: {self.data_dir!r}). "
            "Pass data_dir=<the TFDS data directory that holds it> or prepare "
            f"it with {how}. revisit_tf never downloads data."
        )

    def official_sizes(self) -> dict[str, int] | None:
        # Empty when not prepared, and under `tfds.testing.mock_data` whose
        # MockPolicy.USE_CODE knows no split names: the caller decides.
        splits = self.builder.info.splits
        return {k: v.num_examples for k, v in splits.items()} or None

    def train_size(self) -> int:
        sizes = self.official_sizes()
        if sizes is None:
            raise self._not_prepared()
        return _official_train_size(self.name, sizes)

    def _check_official(self, spec: str) -> None:
        sizes = self.official_sizes()
        for part in spec.split("+"):
            official = re.match(r"\s*([\w-]*)", part)[1]
            if sizes is not None and official not in sizes:
                raise ValueError(
                    f"Split {spec!r} of {self.name!r} refers to unknown official "
                    f"split {official!r}; official splits are {sorted(sizes)}."
                )

    def count(self, spec: str) -> int:
        if self.official_sizes() is None:
            # No split metadata: unprepared (reading raises FileNotFoundError)
            # or `tfds.testing.mock_data`, whose builders have no split info
            # but generate examples; then count them (mock splits are tiny).
            ds = self.read(spec)
            count = int(ds.reduce(0, lambda n, _: n + 1))
            _logger.warning(
                "%s %s: no split sizes in the TFDS metadata (mock data?); counted "
                "%d examples by reading them.",
                self.name,
                spec,
                count,
            )
            return count
        return self.known_count(spec)

    def known_count(self, spec: str) -> int | None:
        """The count from the TFDS metadata; None without metadata (mocks).

        TFDS gives an empty slice a count of 0, or a negative one for a
        reversed slice such as ``train[10:5]`` (which its reader then fails
        on); both are reported as 0.
        """
        if self.official_sizes() is None:
            return None
        self._check_official(spec)
        return max(0, self.builder.info.splits[spec].num_examples)

    def _keys(self) -> tuple[str, str | None]:
        """The image and label feature names; no label: None (unlabelled)."""
        keys = self.builder.info.supervised_keys
        if keys:
            return keys[0], keys[1]
        features = self.builder.info.features or {}
        return "image", "label" if "label" in features else None

    def unlabelled_because(self) -> str | None:
        """Why the dataset has no labels, or None when it has them."""
        if self._keys()[1] is not None:
            return None
        features = sorted(self.builder.info.features or {})
        return (
            f"its TFDS features {features} have no 'label' and it declares no "
            "supervised_keys"
        )

    def class_names(self) -> tuple[str, ...] | None:
        label_key = self._keys()[1]
        feature = (self.builder.info.features or {}).get(label_key)
        names = getattr(feature, "names", None)
        return tuple(names) if names else None

    def read(self, spec: str) -> tf.data.Dataset:
        self._check_official(spec)
        try:
            ds = self.builder.as_dataset(split=spec, shuffle_files=False)
        except AssertionError as e:  # TFDS's "could not find data" signal.
            raise self._not_prepared() from e
        image_key, label_key = self._keys()
        spec_keys = ds.element_spec
        for key in (image_key, label_key):
            if key is not None and (not isinstance(key, str) or key not in spec_keys):
                raise ValueError(
                    f"Dataset {self.name!r} has features {sorted(spec_keys)}; "
                    f"cannot find its {'label' if key == label_key else 'image'} "
                    f"feature {key!r}."
                )
        if spec_keys[image_key].dtype != tf.uint8:
            raise ValueError(
                f"Dataset {self.name!r} feature {image_key!r} has dtype "
                f"{spec_keys[image_key].dtype.name}; expected uint8 images."
            )

        def to_contract(example):
            if label_key is None:
                return {"image": example[image_key]}
            return {
                "image": example[image_key],
                "label": tf.cast(example[label_key], tf.int64),
            }

        return ds.map(to_contract, num_parallel_calls=tf.data.AUTOTUNE)


class _ImageFolderReader:
    """Reads a folder of JPEG/PNG files (``data.folder``); one split, ``train``."""

    def __init__(self, name: str, data_dir: str | None):
        options = _folder_options(name)
        self.name = name
        self.channels = int(options["channels"])
        self.listing = folder.list_image_folder(data_dir, options["labels"])

    def official_sizes(self) -> dict[str, int]:
        return {"train": len(self.listing.paths)}

    def train_size(self) -> int:
        return len(self.listing.paths)

    def unlabelled_because(self) -> str | None:
        if self.listing.labels is not None:
            return None
        if _folder_options(self.name)["labels"] == "none":
            return f"it is read with labels=none ({self.name!r})"
        return (
            f"the folder {self.listing.root!r} has no class sub-folders (its images "
            "lie directly in it)"
        )

    def class_names(self) -> tuple[str, ...] | None:
        return self.listing.class_names

    def count(self, spec: str) -> int:
        _, start, stop = _slice_of(self.name, spec, self.official_sizes())
        return stop - start

    def known_count(self, spec: str) -> int:
        """``count``: the listing is in memory."""
        return self.count(spec)

    def read(self, spec: str) -> tf.data.Dataset:
        _, start, stop = _slice_of(self.name, spec, self.official_sizes())
        columns = {"path": list(self.listing.paths[start:stop])}
        if self.listing.labels is not None:
            columns["label"] = tf.constant(self.listing.labels[start:stop], tf.int64)
        channels = self.channels

        def load(example):
            path = example.pop("path")
            data = tf.io.read_file(path)
            # The listing checked every file's signature; this names a file
            # replaced since, instead of an anonymous decode error.
            signature = tf.logical_or(
                tf.strings.substr(data, 0, 3) == folder.JPEG_MAGIC,
                tf.strings.substr(data, 0, 8) == folder.PNG_MAGIC,
            )
            check = tf.debugging.Assert(
                signature, ["image_folder: not a JPEG or PNG file:", path]
            )
            with tf.control_dependencies([check]):
                image = tf.io.decode_image(
                    data, channels=channels, expand_animations=False
                )
            image.set_shape([None, None, channels])
            return {"image": image, **example}

        ds = tf.data.Dataset.from_tensor_slices(columns)
        # deterministic: the source's order is part of its contract.
        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


_Reader = _ArrayReader | _TfdsReader | _ImageFolderReader


def _open(name: str, data_dir: str | os.PathLike | None) -> _Reader:
    data_dir = None if data_dir is None else os.fspath(data_dir)
    _check_name(name, data_dir)
    if _base_name(name) == IMAGE_FOLDER:
        return _ImageFolderReader(name, data_dir)
    if _base_name(name) in _ARRAY_SOURCES:
        return _ArrayReader(name, data_dir)
    return _TfdsReader(name, data_dir)


# ---------------------------------------------------------------------------
# Split aliases.


def _resolve(name: str, split: str, train_size: Callable[[], int]) -> str:
    """``resolve_split``; ``train_size`` is only called when the table lacks it."""
    if not isinstance(split, str):
        raise ValueError(f"Split must be a string, got {split!r}.")
    base = _base_name(name)
    convention = _SPLIT_CONVENTIONS.get(base, SplitConvention())
    if "[" in split:
        if base in _ARRAY_SOURCES or base == IMAGE_FOLDER:
            _parse_slice(split)  # In-memory sources speak only the slice subset.
        return split
    if split == "trainval":
        return "train"
    if split == "test":
        return convention.test_split
    if split not in ("train", "val"):
        raise ValueError(
            f"Unknown split {split!r} for {name!r}. Expected one of the aliases "
            f"{list(SPLIT_ALIASES)} (reference section 2) or a slice "
            f"{_SLICE_FORM}. To read a whole official split X, write 'X[0:]'."
        )
    num_train = convention.num_train or train_size()
    if convention.num_held_out is None:
        num_held_out = max(1, num_train * DEFAULT_HELD_OUT_PERCENT // 100)
    else:
        num_held_out = convention.num_held_out
    if not 0 < num_held_out < num_train:
        raise ValueError(
            f"Cannot carve {split!r} from {name!r}: {num_held_out} held-out "
            f"examples do not fit in an official train split of {num_train}; "
            "use an explicit slice such as 'train[:90%]'."
        )
    cut = num_train - num_held_out
    return f"train[:{cut}]" if split == "train" else f"train[{cut}:]"


def _check_train_size(name: str, split: str, reader) -> None:
    """The carve assumed a train size from the table: is it the data's?"""
    convention = _SPLIT_CONVENTIONS.get(_base_name(name), SplitConvention())
    if split not in ("train", "val") or convention.num_train is None:
        return
    sizes = reader.official_sizes()
    if sizes is not None and sizes.get("train") != convention.num_train:
        raise ValueError(
            f"{name!r}: split {split!r} assumes {convention.num_train} official "
            f"train examples but the data has {sizes.get('train')}; use an "
            "explicit slice such as 'train[:90%]'."
        )


def _check_not_empty(name: str, split: str, resolved: str, count: int | None) -> None:
    """Raises the error for an empty split, naming the dataset and the split."""
    if count is None or count > 0:
        return
    shown = repr(split) if resolved == split else f"{split!r} (= {resolved!r})"
    raise ValueError(
        f"Split {shown} of dataset {name!r} is empty: it has no examples, so "
        "there is nothing to train or probe on. Check the split's bounds (e.g. "
        "'train[:1000]') and that the data directory holds the data."
    )


def resolve_split(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None
) -> str:
    """Returns the official-split slice that ``split`` stands for.

    Args:
      name: Dataset name (TFDS name or offline source).
      split: An alias ``train | val | trainval | test`` or a slice such as
        ``train[:1000]`` (returned unchanged).
      data_dir: Where the data is; only read when the size of the official
        training split is not in the split table (``SplitConvention``).

    Returns:
      A TFDS split string, e.g. ``resolve_split("imagenet2012", "val") ==
      "train[1231121:]"`` (reference section 2: the last 50,046 images).

    Raises:
      ValueError: Unknown dataset (with close names) or unknown split (with the
        accepted forms).
    """
    data_dir = None if data_dir is None else os.fspath(data_dir)
    _check_name(name, data_dir)
    return _resolve(name, split, lambda: _open(name, data_dir).train_size())


def get_source(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None
) -> tf.data.Dataset:
    """Returns the examples of ``split`` of dataset ``name``, in a fixed order.

    Args:
      name: A TFDS dataset name (``imagenet2012``, ``cifar10``,
        ``places365_small``, ...; optionally ``name/config:version``), an
        offline source (``fashion_mnist_idx``) or ``image_folder[/options]``
        (module docstring).
      split: ``train | val | trainval | test`` (see the module docstring) or a
        slice of an official split such as ``train[:1000]`` or ``test[-10%:]``.
      data_dir: TFDS data directory, or the directory of an offline source's
        files, or the image folder (required for ``image_folder``). ``None``:
        TFDS's default directory, or the source's default
        (``/usr/share/datasets/fashion-mnist`` for ``fashion_mnist_idx``).

    Returns:
      A finite ``tf.data.Dataset`` of ``{"image": uint8 [H, W, C],
      "label": int64 []}`` (e.g. ``[28, 28, 1]`` for Fashion-MNIST, variable
      ``[None, None, 3]`` for ImageNet or an image folder), without
      ``"label"`` for an unlabelled source (``has_labels``), always in the
      same order.

    Raises:
      ValueError: Unknown dataset or split, data that contradicts the split
        table, or an empty split (the message names the dataset and the split;
        checked before anything is read wherever the size is known without
        reading: array sources and prepared TFDS datasets).
      FileNotFoundError: The dataset is not prepared / its files are missing in
        ``data_dir`` (the message says how to get it), or the image folder
        does not exist.
    """
    reader = _open(name, data_dir)
    resolved = _resolve(name, split, reader.train_size)
    _check_train_size(name, split, reader)
    _check_not_empty(name, split, resolved, reader.known_count(resolved))
    return reader.read(resolved)


def num_examples(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None
) -> int:
    """Exact number of examples ``get_source(name, split)`` yields.

    Args:
      name: As for ``get_source``.
      split: As for ``get_source``.
      data_dir: As for ``get_source``.

    Returns:
      The count (always >= 1), read from the prepared TFDS metadata or the
      arrays (not by iterating), e.g. 50,000 for ``("fashion_mnist_idx",
      "train")``.

    Raises:
      ValueError, FileNotFoundError: As for ``get_source``; an empty split is
        an error here too.
    """
    reader = _open(name, data_dir)
    resolved = _resolve(name, split, reader.train_size)
    _check_train_size(name, split, reader)
    count = reader.count(resolved)
    _check_not_empty(name, split, resolved, count)
    return count


def has_labels(name: str, *, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``get_source(name, ...)`` examples carry a ``"label"``.

    Known without reading the examples (an image folder is listed). False for
    a TFDS dataset without a label feature and an unlabelled image folder.
    """
    return _open(name, data_dir).unlabelled_because() is None


def require_labels(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    needed_by: str,
) -> None:
    """Raises ``ValueError`` when ``name`` has no labels, saying who needs them.

    Args:
      name, split, data_dir: The source, as for ``get_source``.
      needed_by: What needs the labels and why, e.g. ``"linear_probe (it fits
        and scores a classifier of the labels)"``.

    Raises:
      ValueError: naming the dataset, the split, why it is unlabelled and
        ``needed_by``.
    """
    because = _open(name, data_dir).unlabelled_because()
    if because is not None:
        where = "" if data_dir is None else f" (data_dir {os.fspath(data_dir)!r})"
        raise ValueError(
            f"Dataset {name!r}{where}, split {split!r}, has no labels: {because}; "
            f"but {needed_by} needs a 'label' for every example. Use a labelled "
            "source (for an image folder: one sub-folder per class)."
        )


def explain_missing_feature(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    error: Exception,
    used_by: str,
) -> None:
    """Turns a pp's missing-``label`` error on an unlabelled source into a clear one.

    Args:
      name, split, data_dir: The source, as for ``get_source``.
      error: what building the pipeline raised (a ``KeyError`` or
        ``ValueError`` of a pp op reading a feature).
      used_by: the pp string that read it.

    Raises:
      ValueError: ``error`` names ``'label'`` and the source has none: says so,
        and that a self-supervised pp makes its own labels. Returns otherwise
        (the caller re-raises ``error``).
    """
    if "'label'" not in str(error):
        return
    require_labels(
        name,
        split,
        data_dir=data_dir,
        needed_by=f"pp {used_by!r} ({error}); a self-supervised pp makes its "
        "labels (rotate4; jigsaw_perms or rel_patch_pairs in pp_train_batch, "
        "with keep('image') in pp_train) or needs none (exemplar, simclr, "
        "inpainting), while supervised pretraining",
    )


def class_names(
    name: str, *, data_dir: str | os.PathLike | None = None
) -> tuple[str, ...] | None:
    """The names of the label values (index = label), where the source has them.

    Image folders: the sorted class folder names; TFDS: the ``ClassLabel``
    names; None otherwise (array sources, unlabelled sources).
    """
    return _open(name, data_dir).class_names()
