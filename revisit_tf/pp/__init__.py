"""Stage 2: pretext preprocessing. Every pretext label is made here.

Place in the data flow::

    data (sources)  ->  pp (this stage)  ->  models
    {"image": uint8 [H, W, 3] or encoded bytes, "label": int64 []}
        -> get_preprocess_fn(
               "decode|inception_crop(224)|flip_lr|rotate4|value_range(-1, 1)")
        -> {"image": float32 [K, h, w, 3] in [-1, 1], "label": int32 [K]}

(``K`` views or patches per example; the trainer flattens ``[B, K, ...]`` to
``[B * K, ...]``.)

Op contract:

* An op is a factory ``get_<op>(...)`` registered with
  ``@registry.register("<op>")``; the factory validates its arguments at
  build time (``ValueError`` naming the bad value) and returns
  ``fn(data: dict) -> dict``.
* ``fn`` returns a new dict and never mutates its input. Image ops read
  ``data[key]`` (default ``"image"``) and write ``data[key_result or key]``.
* Images are ``[H, W, C]``; a stack of copies/patches is ``[K, H, W, C]``.
  Per-image and random ops act on each stack element independently;
  elementwise ops act on the whole tensor.
* Ops work eagerly on one example and inside ``tf.data.Dataset.map``, and keep
  static shapes where the output size is known. They run without AutoGraph,
  so tensor-dependent branches use ``tf.where`` / ``tf.cond``, and Python
  ``if`` only tests static facts (dtype, rank, static shape, arguments).
* Build-time errors (unknown op, bad arguments) are ``ValueError``; a data
  dict that does not fit an op (missing key, wrong rank, non-square image
  with a static shape) fails with ``ValueError`` when the pipeline is traced;
  facts only known at run time (image smaller than a crop) fail with
  ``tf.errors.InvalidArgumentError``.

Modules:

* ``registry``   - op registry (``register``, ``lookup``, ``isolated_registry``).
* ``builder``    - ``get_preprocess_fn``: ``"a|b(1)|c(x, k=v)"`` -> function.
* ``utils``      - ``in_key_out_key`` decorator, stack and validation helpers.
* ``ops_image``  - decode, resize, resize_small, central_crop, random_crop,
  inception_crop, flip_lr, to_gray, value_range, standardize, keep.
* ``ops_image``  - also color_distort and inception_preprocess (reference
  3.2, the supervised chain).
* ``ops_pretext`` - rotate4 (image -> 4 rotated views + labels ``[0, 1, 2, 3]``),
  exemplar_copies (image -> K Inception-augmented copies + surrogate ids,
  built on ``copies``), inpaint_mask (context-encoder inpainting: masked
  image + ``target`` + ``mask``).
* ``ops_views``  - copies (a sub-pipeline applied K times, results stacked:
  SimCLR's two views, Exemplar's copies), surrogate_label (one random id
  per source image, repeated over its K views).
* ``ops_color``  - SimCLR augmentations: color_jitter (brightness, contrast,
  saturation, hue in random order), gaussian_blur (random-sigma separable
  blur); random grayscale is ``to_gray``.
* ``ops_patches`` - crop_patches (3x3 grid), jigsaw_perms (permutation-index
  labels, per example or per batch), rel_patch_pairs (labels ``[0..7]``).
* ``permutations`` - the Jigsaw permutation set (greedy maximal Hamming,
  or a validated file in the original binary format).
"""

from revisit_tf.pp.builder import get_preprocess_fn

__all__ = ["get_preprocess_fn"]
