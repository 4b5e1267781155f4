"""``revisit-benchmark input``: host images/s of each pretext's ImageNet pipeline.

Times the real training input pipeline (``data.make_train_dataset``, seeded
as ``pretrain`` seeds it) with the ``pretrain.pp_train`` string (and
``pretrain.pp_train_batch``) that ``configs/imagenet/<pretext>.gin`` ships,
read from the gin files (and their ``include`` lines) so the benchmark
measures what ships, on real JPEG bytes:

* **Images.** ``--num_images`` JPEGs (quality 90, 4:2:0) are generated once
  into ``--cache_dir`` and reused while its ``manifest.json`` (written last)
  matches. Sizes: ``sqrt(area) ~ N(374, 70)`` px, aspect ``w/h =
  exp(N(log 4/3, 0.12))`` (landscape, 3 of 4) or its inverse (portrait),
  clipped to [0.5, 2]; scaled down to ``--max_side`` (default 1000), each
  side at least ``--min_side`` (default 100): about 403 x 350 on average,
  ImageNet's size. Content: four octaves of smooth bicubic noise plus pixel
  noise, tuned so the files average about 100 KB, near ImageNet's ~110 KB
  (the decoder's entropy work grows with the bytes). All from ``--seed``.
* **Source.** The files' bytes are read once into memory and served as
  ``{"image": encoded bytes, "label": int64}`` by ``from_tensor_slices``:
  a real run reads TFRecords, whose reading is small next to decoding, so
  in-memory bytes + ``decode`` model the host's CPU work.
* **Modes.** ``host``: the whole ``pp_train`` (and ``pp_train_batch``) in
  ``tf.data``. ``device`` (pretexts whose pipeline ``pp.device.split``
  cuts: rotation, jigsaw, rel_patch_location): only the host part; the
  batch part runs on the accelerator and is not timed here.
* **Settings.** ``autotune``: the pipeline as built (AUTOTUNE, all cores).
  ``one_core``: ``threading.private_threadpool_size = 1`` and
  ``max_intra_op_parallelism = 1``, one core's worth. ``nondeterministic``:
  the unseeded stream (``seed=None``: the map may reorder, randomness is
  stateful), what exact resume costs. ``options.deterministic = False``
  alone would change nothing, since the seeded map asks for order
  explicitly. ``max_parallelism``: autotune algorithm ``MAX_PARALLELISM``.
  A local ``tf.data`` service (in-process dispatcher and workers) is not
  measured: on one host it adds no cores, only serialization.

Each row (pretext x mode x setting) is timed over ``--seconds`` (or
``--batches``) after ``--warmup`` batches of ``--batch`` images and stores
source images/s, trunk inputs/s (x K) and process CPU seconds. Images/s per
core is the ``one_core`` rate (other rows show theirs / ``os.cpu_count()``
for comparison; ``source_images_per_cpu_second`` is a third view). Cores
per accelerator = ``(--accelerator_images_per_sec / K) / per-core source
images/s``: the accelerator speed counts trunk inputs (measured at 224 px,
``revisit-benchmark trunks``) and K, the trunk inputs per source image, is
read from the full pipeline's output ``[B, K, h, w, C]`` (Rotation 4,
Jigsaw/RPL 9 patches of 64 px, so their cores are a lower bound, Exemplar
8; ``[B, h, w, C]`` is K = 1).

Example (the defaults: 5 pretexts, 8 modes x 3 settings, about 10 minutes)::

    revisit-benchmark input --seconds 20 --output input.json
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from revisit_tf import data, resources
from revisit_tf.benchmarks import machine as machine_lib
from revisit_tf.pp import builder, device

_logger = logging.getLogger(__name__)

PRETEXTS = ("rotation", "jigsaw", "rel_patch_location", "exemplar", "supervised")
ALL_PRETEXTS = (*PRETEXTS, "simclr")
SETTINGS = ("autotune", "one_core", "nondeterministic")
ALL_SETTINGS = (*SETTINGS, "max_parallelism")
JPEG_QUALITY = 90
MANIFEST = "manifest.json"
_FORMAT = "revisit-benchmark-input-jpegs/1"
_BINDING = re.compile(
    r"^\s*pretrain\.(pp_train(?:_batch)?)\s*=\s*"
    r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")",
    re.MULTILINE,
)
_INCLUDE = re.compile(r"^\s*include\s+('[^']*'|\"[^\"]*\")", re.MULTILINE)


def shipped_pipelines(pretext: str) -> tuple[str, str]:
    """``(pp_train, pp_train_batch)`` bound by ``imagenet/<pretext>.gin``.

    Follows ``include`` lines in order, the last binding winning (as gin
    does); ``pp_train_batch`` is ``''`` when nothing binds it.

    Raises:
      ValueError: no ``pretrain.pp_train`` binding, naming the file.
    """
    found: dict[str, str] = {}

    def read(relpath: str) -> None:
        with open(os.path.join(resources.gin_dir(), relpath)) as f:
            text = f.read()
        events = [(m.start(), "include", m.group(1)) for m in _INCLUDE.finditer(text)]
        events += [(m.start(), m.group(1), m.group(2)) for m in _BINDING.finditer(text)]
        for _, key, literal in sorted(events):
            if key == "include":
                read(ast.literal_eval(literal))
            else:
                found[key] = ast.literal_eval(literal)

    path = f"imagenet/{pretext}.gin"
    read(path)
    if "pp_train" not in found:
        raise ValueError(f"{path} binds no pretrain.pp_train.")
    return found["pp_train"], found.get("pp_train_batch", "")


def image_sizes(
    num_images: int, *, seed: int, min_side: int, max_side: int
) -> np.ndarray:
    """int ``[num_images, 2]`` (height, width): the module docstring's draw."""
    rng = np.random.default_rng(seed)
    side = np.maximum(rng.normal(374, 70, num_images), min_side)
    aspect = np.exp(rng.normal(np.log(4 / 3), 0.12, num_images))
    aspect = np.clip(
        np.where(rng.random(num_images) < 0.75, aspect, 1 / aspect), 0.5, 2
    )
    hw = np.stack([side / np.sqrt(aspect), side * np.sqrt(aspect)], axis=1)
    hw *= np.minimum(1.0, max_side / hw.max(axis=1, keepdims=True))
    return np.clip(np.round(hw), min_side, max_side).astype(int)


def synthetic_jpeg(index: int, height: int, width: int, *, seed: int) -> bytes:
    """A JPEG (quality 90) of a ``[height, width, 3]`` smooth, noisy image."""
    base = tf.constant([seed, index], tf.int64)
    image, total = tf.zeros([height, width, 3]), 0.0
    # Octaves: cells per 400 px and amplitude.
    for k, (cells, amp) in enumerate(((4, 1.0), (16, 0.5), (64, 0.3), (160, 0.5))):
        grid = tf.random.stateless_uniform(
            [max(2, cells * height // 400), max(2, cells * width // 400), 3],
            seed=tf.random.experimental.stateless_fold_in(base, k),
        )
        image += amp * tf.image.resize(grid[None], [height, width], "bicubic")[0]
        total += amp
    luma = tf.random.stateless_normal([height, width, 1], seed=base + [0, 2**40])
    chroma = tf.random.stateless_normal([height, width, 3], seed=base + [0, 2**41])
    image = image / total * 220 + 18 + 30 * luma + 8 * chroma
    pixels = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return tf.io.encode_jpeg(pixels, quality=JPEG_QUALITY).numpy()


def write_json(path: str, obj: dict) -> None:
    """Writes ``obj`` to ``path`` atomically (a temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False) as f:
        json.dump(obj, f, indent=2)
    os.replace(f.name, path)


def ensure_jpegs(
    cache_dir: str, *, num_images: int, seed: int, min_side: int, max_side: int
) -> dict:
    """The manifest of the JPEGs in ``cache_dir``, generating them if needed.

    Reuses the files when ``manifest.json`` records the same settings and
    every file it lists has its recorded byte size; otherwise regenerates
    them all and writes the manifest last. Its ``images`` lists
    ``{"file", "height", "width", "bytes"}``.
    """
    key = dict(
        format=_FORMAT,
        num_images=num_images,
        seed=seed,
        min_side=min_side,
        max_side=max_side,
        quality=JPEG_QUALITY,
    )
    path = os.path.join(cache_dir, MANIFEST)
    try:
        with open(path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in key} == key and all(
            os.path.getsize(os.path.join(cache_dir, im["file"])) == im["bytes"]
            for im in old["images"]
        ):
            _logger.info("reusing %d JPEGs in %s", num_images, cache_dir)
            return old
    except (OSError, ValueError, KeyError, TypeError):
        pass
    os.makedirs(cache_dir, exist_ok=True)
    if os.path.exists(path):
        os.remove(path)  # files being rewritten are never taken for valid ones
    images, start, last = [], time.perf_counter(), 0.0
    sizes = image_sizes(num_images, seed=seed, min_side=min_side, max_side=max_side)
    for i, (height, width) in enumerate(sizes):
        encoded = synthetic_jpeg(i, int(height), int(width), seed=seed)
        name = f"{i:06d}.jpg"
        with open(os.path.join(cache_dir, name), "wb") as f:
            f.write(encoded)
        images.append(dict(file=name, height=int(height), width=int(width)))
        images[-1]["bytes"] = len(encoded)
        elapsed = time.perf_counter() - start
        if elapsed - last >= 5 or i + 1 == num_images:
            last = elapsed
            _logger.info(
                "generated %d/%d JPEGs (%.0f/s)", i + 1, num_images, (i + 1) / elapsed
            )
    manifest = {**key, "images": images}
    write_json(path, manifest)
    return manifest


def load_source(cache_dir: str, manifest: dict) -> tf.data.Dataset:
    """``{"image": tf.string (encoded JPEG), "label": int64}`` per file, in memory."""
    encoded = []
    for im in manifest["images"]:
        with open(os.path.join(cache_dir, im["file"]), "rb") as f:
            encoded.append(f.read())
    labels = np.arange(len(encoded), dtype=np.int64) % 1000
    return tf.data.Dataset.from_tensor_slices(
        {"image": tf.constant(encoded, tf.string), "label": labels}
    )


def build_pipeline(
    source: tf.data.Dataset,
    pp_train: str,
    pp_train_batch: str,
    *,
    mode: str,
    setting: str,
    batch: int,
    seed: int,
) -> tf.data.Dataset:
    """The training stream of one (mode, setting): batches of ``batch`` examples.

    ``mode='device'`` keeps only ``device.split(pp_train)``'s host part
    (raises its ``ValueError`` where the pipeline has no batch pretext op).
    """
    if mode == "host":
        fn = builder.get_preprocess_fn(pp_train)
        batch_fn = builder.get_preprocess_fn(pp_train_batch) if pp_train_batch else None
    else:
        fn = device.host_example_fn(device.split(pp_train))
        batch_fn = device.host_batch_fn
    ds = data.make_train_dataset(
        source,
        fn,
        global_batch_size=batch,
        seed=None if setting == "nondeterministic" else seed,
        batch_preprocess_fn=batch_fn,
    )
    options = tf.data.Options()
    if setting == "one_core":
        options.threading.private_threadpool_size = 1
        options.threading.max_intra_op_parallelism = 1
    elif setting == "max_parallelism":
        algorithm = tf.data.experimental.AutotuneAlgorithm.MAX_PARALLELISM
        options.autotune.autotune_algorithm = algorithm
    return ds.with_options(options)


def views_per_image(element_spec: dict) -> tuple[int, list[int]]:
    """K trunk inputs per source image and one input's shape ``[h, w, C]``.

    ``element_spec["image"]`` is ``[B, K, h, w, C]`` (K views) or ``[B, h, w, C]``.
    """
    shape = element_spec["image"].shape.as_list()
    return (shape[1] if len(shape) == 5 else 1), shape[-3:]


def time_pipeline(
    ds: tf.data.Dataset, *, warmup: int, batches: int | None, seconds: float, label: str
) -> dict:
    """Wall and process CPU seconds of ``batches`` batches (or ~``seconds``).

    Timed after ``warmup`` batches, so buffers and autotuning have started;
    the work in flight at the end is finished (untimed) when the iterator
    closes.
    """
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    count, last, done = 0, 0.0, False
    start, cpu = time.perf_counter(), time.process_time()
    while not done:
        next(it)
        count += 1
        elapsed = time.perf_counter() - start
        done = count >= batches if batches else elapsed >= seconds
        if done or elapsed - last >= 5:
            last = elapsed
            _logger.info("%s: %d batches in %.1fs", label, count, elapsed)
    cpu = time.process_time() - cpu
    closing = time.perf_counter()
    del it
    _logger.info("%s: closed in %.1fs", label, time.perf_counter() - closing)
    return {"batches": count, "seconds": elapsed, "cpu_seconds": cpu}


def _format_table(rows: list[dict], mean_kb: float) -> str:
    lines = [
        f"{'pretext':<18} {'mode':<6} {'setting':<16} {'threads':>7} {'img/s':>8} "
        f"{'img/s/core':>10} {'cpu used':>8} {'JPEG KB':>7} {'cores/accel':>11}"
    ]
    for r in rows:
        lines.append(
            f"{r['pretext']:<18} {r['mode']:<6} {r['setting']:<16} {r['threads']:>7} "
            f"{r['source_images_per_sec']:>8.1f} "
            f"{r['source_images_per_sec_per_core']:>10.1f} "
            f"{r['cpu_seconds'] / r['seconds']:>8.2f} {mean_kb:>7.1f} "
            f"{r['cores_per_accelerator']:>11.2f}"
        )
    return "\n".join(lines)


def _summary(rows: list[dict]) -> dict:
    rate = {
        (r["pretext"], r["mode"], r["setting"]): r["source_images_per_sec"]
        for r in rows
    }
    out: dict[str, dict[str, float]] = {"device_vs_host": {}}
    for (pretext, mode, setting), value in rate.items():
        if mode == "device" and (pretext, "host", setting) in rate:
            key = f"{pretext} {setting}"
            out["device_vs_host"][key] = value / rate[pretext, "host", setting]
        if setting != "autotune" and (pretext, mode, "autotune") in rate:
            key = f"{pretext} {mode}"
            ratios = out.setdefault(f"{setting}_vs_autotune", {})
            ratios[key] = value / rate[pretext, mode, "autotune"]
    return out


def benchmark_pretext(
    source: tf.data.Dataset, pretext: str, args: argparse.Namespace
) -> list[dict]:
    """Rows of one pretext: each mode (host; device where it splits) x setting."""
    pp_train, pp_train_batch = shipped_pipelines(pretext)
    kwargs = dict(batch=args.batch, seed=args.seed)
    full = build_pipeline(
        source, pp_train, pp_train_batch, mode="host", setting="autotune", **kwargs
    )
    views, view_shape = views_per_image(full.element_spec)
    modes = ["host"]
    try:
        device.split(pp_train)
        modes.append("device")
    except ValueError as e:
        _logger.info("%s: no device mode (%s)", pretext, str(e).split(";")[0])
    accel = args.accelerator_images_per_sec / views  # source images/s
    rows = []
    for mode in modes:
        for setting in args.settings:
            label = f"{pretext} {mode} {setting}"
            ds = build_pipeline(
                source, pp_train, pp_train_batch, mode=mode, setting=setting, **kwargs
            )
            timing = time_pipeline(
                ds,
                warmup=args.warmup,
                batches=args.batches,
                seconds=args.seconds,
                label=label,
            )
            images = timing["batches"] * args.batch
            rate = images / timing["seconds"]
            threads = 1 if setting == "one_core" else os.cpu_count() or 1
            _logger.info("%s: %.1f images/s", label, rate)
            rows.append(
                {
                    "pretext": pretext,
                    "mode": mode,
                    "setting": setting,
                    "threads": threads,
                    "batch": args.batch,
                    **timing,
                    "source_images_per_sec": rate,
                    "trunk_inputs_per_sec": rate * views,
                    "source_images_per_sec_per_core": rate / threads,
                    "source_images_per_cpu_second": images / timing["cpu_seconds"],
                    "views": views,
                    "view_shape": view_shape,
                    "accelerator_source_images_per_sec": accel,
                    "cores_per_accelerator": accel / (rate / threads),
                    "pp_train": pp_train,
                    "pp_train_batch": pp_train_batch,
                }
            )
    return rows


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="revisit-benchmark input", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--pretexts", nargs="+", default=list(PRETEXTS), choices=ALL_PRETEXTS)
    add("--settings", nargs="+", default=list(SETTINGS), choices=ALL_SETTINGS)
    add("--num_images", type=int, default=2000, help="JPEGs generated once.")
    add("--seed", type=int, default=0, help="Seed of the images and the stream.")
    add("--min_side", type=int, default=100, help="Shortest image side, px.")
    add("--max_side", type=int, default=1000, help="Longest image side, px.")
    add(
        "--cache_dir",
        default=os.path.join(tempfile.gettempdir(), "revisit_benchmark_input"),
        help="Where the JPEGs are generated once and reused.",
    )
    add("--batch", type=int, default=64, help="Images per batch.")
    add("--warmup", type=int, default=5, help="Untimed batches per row.")
    add("--seconds", type=float, default=20, help="Timed seconds per row.")
    add("--batches", type=int, default=None, help="Time this many batches instead.")
    add(
        "--accelerator_images_per_sec",
        type=float,
        default=3500,
        help="Trunk inputs/s one accelerator trains on (default: the per-GPU "
        "goal for ResNet50 v1 k=4 at 224 px).",
    )
    add("--output", help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    for name in ("num_images", "batch", "min_side", "batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_side < args.min_side:
        parser.error(f"--max_side {args.max_side} is below --min_side {args.min_side}")
    for name in ("seconds", "accelerator_images_per_sec"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger(builder.__name__).setLevel(logging.WARNING)  # per-op specs
    manifest = ensure_jpegs(
        args.cache_dir,
        num_images=args.num_images,
        seed=args.seed,
        min_side=args.min_side,
        max_side=args.max_side,
    )
    hwb = np.array([[m["height"], m["width"], m["bytes"]] for m in manifest["images"]])
    images = {
        "count": len(hwb),
        "cache_dir": args.cache_dir,
        "mean_height": float(hwb[:, 0].mean()),
        "mean_width": float(hwb[:, 1].mean()),
        "mean_jpeg_kb": float(hwb[:, 2].mean() / 1000),
        "quality": JPEG_QUALITY,
    }
    _logger.info("JPEGs: %s", images)
    source = load_source(args.cache_dir, manifest)
    rows = []
    for pretext in args.pretexts:
        rows += benchmark_pretext(source, pretext, args)
    print(_format_table(rows, images["mean_jpeg_kb"]))
    summary = _summary(rows)
    for name, ratios in summary.items():
        for key, ratio in ratios.items():
            print(f"{name.replace('_', ' ')}: {key} {ratio:.2f}x")
    small = {r["pretext"]: r["view_shape"] for r in rows if r["view_shape"][0] != 224}
    for pretext, (h, w, _) in small.items():
        print(
            f"note: {pretext}'s trunk inputs are {h}x{w}, not 224 px: the trunk "
            "takes more of them per second, so its cores/accel are a lower bound."
        )
    result = {
        "benchmark": "input",
        "rows": rows,
        "summary": summary,
        "images": images,
        "settings": vars(args),
        "machine": machine_lib.machine_info(),
    }
    if args.output:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
