"""Stage 1 of the data flow: data sources and per-replica input pipelines.

Contract:

* ``sources.get_source(name, split, *, data_dir=None)`` -> finite, always
  identically ordered ``tf.data.Dataset`` of
  ``{"image": uint8 [H, W, C], "label": int64 []}`` (nothing else; no
  ``"label"`` for an unlabelled source, ``sources.has_labels``);
  ``sources.num_examples(...)`` is its exact length and
  ``sources.resolve_split(name, split)`` the TFDS slice behind a split alias.
  Names: any prepared TFDS dataset, the offline ``fashion_mnist_idx``
  (Debian's ``dataset-fashion-mnist`` idx files, read by ``idx``), or
  ``image_folder`` with ``data_dir`` a folder of JPEG/PNG files (labels from
  class sub-folders or none; listed by ``folder``). Splits:
  ``train | val | trainval | test`` as in reference section 2, or slices such
  as ``train[:1000]``. Nothing is ever downloaded.
* ``pipeline.make_train_dataset(source, pp_fn, global_batch_size=...,
  input_context=...)`` -> shard -> [cache] -> shuffle -> repeat -> map(pp) ->
  batch(per-replica, drop_remainder) -> [map(batch pp)] -> prefetch: the
  ``input_fn`` body for
  ``strategy.distribute_datasets_from_function``.
  ``pipeline.make_eval_dataset`` -> one ordered pass keeping the last
  partial batch.

Next stage: ``pp`` (the ``preprocess_fn`` handed to the pipelines) turns
``{"image", "label"}`` into pretext inputs and labels.
"""

from revisit_tf.data.folder import FolderListing, list_image_folder
from revisit_tf.data.idx import load_idx_dataset, read_idx
from revisit_tf.data.pipeline import make_eval_dataset, make_train_dataset
from revisit_tf.data.sources import (
    IMAGE_FOLDER,
    SPLIT_ALIASES,
    ArraySource,
    SplitConvention,
    class_names,
    explain_missing_feature,
    get_source,
    has_labels,
    num_examples,
    register_array_source,
    require_labels,
    resolve_split,
)

__all__ = [
    "IMAGE_FOLDER",
    "SPLIT_ALIASES",
    "ArraySource",
    "FolderListing",
    "SplitConvention",
    "class_names",
    "get_source",
    "explain_missing_feature",
    "has_labels",
    "list_image_folder",
    "load_idx_dataset",
    "make_eval_dataset",
    "make_train_dataset",
    "num_examples",
    "read_idx",
    "register_array_source",
    "require_labels",
    "resolve_split",
]
