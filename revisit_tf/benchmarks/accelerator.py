"""``revisit-benchmark accelerator``: the accelerator check in one short run.

Run by ``tools/accelerator_check.sh`` on one GPU (goal: under 8 minutes), and
in ``--reduced`` mode on a CPU (tiny trunks, the test suite runs it). Rows, in
priority order (``--time_budget_s`` skips what no longer fits, and says so):

1. **Trunks.** A training step (forward in training mode, 1000-way softmax
   cross-entropy plus the trunk's weight decay, backward, SGD with momentum;
   ``benchmarks.trunks.make_train_step``) of ``keras.applications.ResNet50``
   in bfloat16 + XLA (the baseline, as published GPU figures are taken) and of
   every trunk at width ``--width`` in each of ``--modes`` (``bf16_xla``,
   ``f32_xla``, and on a CPU also ``bf16_plain``, ``f32_plain`` for the
   compiled-vs-plain and bfloat16-vs-float32 ratios).
2. **Pretext steps, end to end.** Rotation and Jigsaw as the shipped ImageNet
   configs define them (``configs/imagenet/<task>.gin``: pipeline, head,
   loss), from the host part's output (``pp.device.split``: the decoded,
   cropped images, held in memory; the host's own cost is ``revisit-benchmark
   input``) through the pretext construction in the step
   (``train.loop.make_replica_step`` with the batch part) to the update;
   against the same model fed batches built beforehand (what host
   construction hands the step) and against the trunk-only step on the same
   trunk inputs (the issue's goal: at least 0.9 of it).
3. **Probe.** One L-BFGS fit (``probe.lbfgs``, float32, one l2) on
   ``--probe_size`` random features with labels from a random linear
   teacher: seconds per iteration.

Speeds are medians over ``--rounds`` of ``--steps`` steps, after two warm-up
steps (tracing, XLA compilation: reported as ``warmup_seconds``).

Example::

    revisit-benchmark accelerator --output accelerator.json --table accelerator.md
    revisit-benchmark accelerator --reduced \
        --modes bf16_xla f32_xla bf16_plain f32_plain
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from revisit_tf import cli, configurables
from revisit_tf.benchmarks import machine as machine_lib
from revisit_tf.benchmarks import trunks as trunks_lib
from revisit_tf.models import factory
from revisit_tf.models import pretext as pretext_lib
from revisit_tf.pp import device as device_lib
from revisit_tf.pp import get_preprocess_fn
from revisit_tf.probe import lbfgs
from revisit_tf.train import loop as loop_lib

_logger = logging.getLogger(__name__)

ARCHS = ("resnet50_v1", "resnet50_v2", "revnet50", "vgg19")
MODES = {  # name: (dtype policy, jit_compile)
    "bf16_xla": ("mixed_bfloat16", True),
    "f32_xla": (None, True),
    "bf16_plain": ("mixed_bfloat16", False),
    "f32_plain": (None, False),
}
TASKS = ("rotation", "jigsaw")


def _timed(step: Callable[[], tf.Tensor], *, steps: int, rounds: int) -> dict:
    """Warm-up seconds and the median seconds per step of ``step()``."""
    start = time.perf_counter()
    for _ in range(2):
        out = step()
    float(tf.nest.flatten(out)[0])
    warmup = time.perf_counter() - start
    per_step = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            out = step()
        float(tf.nest.flatten(out)[0])  # blocks until the device is done
        per_step.append((time.perf_counter() - start) / steps)
    return {"warmup_seconds": warmup, "seconds_per_step": statistics.median(per_step)}


def _with_policy(policy: str | None, build: Callable[[], keras.Model]):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy or "float32")
    try:
        return build()
    finally:
        keras.config.set_dtype_policy(previous)


def trunk_row(
    arch: str,
    mode: str,
    args,
    *,
    inputs: int,
    size: int,
    model: keras.Model | None = None,
) -> dict:
    """images/s of one trunk training step on ``[inputs, size, size, C]``.

    ``model``: that trunk (a pretext model's own, with its config's stride,
    embedding size and policy) instead of ``arch`` built at ``--width`` with
    1000 logits; ``C`` is its input's channels (3 otherwise).
    """
    policy, jit = MODES[mode]
    decay = trunks_lib.BASELINE_WEIGHT_DECAY if arch == trunks_lib.BASELINE else 0.0
    if model is None and arch == trunks_lib.BASELINE:
        model = _with_policy(policy, lambda: trunks_lib.build_baseline(size))
    elif model is None:
        model = factory.build_trunk(
            arch,
            width=args.width,
            units=args.units,
            num_classes=1000,
            input_shape=(size, size, 3),
            dtype_policy=policy,
        )
    step = trunks_lib.make_train_step(
        model, explicit_weight_decay=decay, jit_compile=jit
    )
    channels = model.input_shape[-1]
    classes = (
        model.output["logits"].shape[-1] if isinstance(model.output, dict) else 1000
    )
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (inputs, size, size, channels)), tf.float32)
    labels = tf.constant(rng.integers(0, classes, inputs), tf.int32)
    out = _timed(lambda: step(images, labels), steps=args.steps, rounds=args.rounds)
    return {
        "section": "trunk",
        "model": arch,
        "mode": mode,
        "size": size,
        "trunk_inputs": inputs,
        "trunk_logits": classes,
        "images_per_sec": inputs / out["seconds_per_step"],
        **out,
    }


def _task_setup(task: str, args):
    """(host-part batch, batch part, model, loss_fn, metric_fn) of a shipped config."""
    bindings = [f"build_trunk.width = {args.width}", f"DTYPE_POLICY = {args.policy!r}"]
    if args.units:
        bindings.append(f"build_trunk.units = {tuple(args.units)}")
    if args.reduced:
        bindings += ["EMBED_DIM = 16", "jigsaw_head.hidden = 32"]
    cli.parse_gin([f"imagenet/{task}.gin"], bindings)
    configured = {
        k: configurables.bound_value(f"pretrain.{k}")
        for k in ("model_fn", "loss_fn", "metric_fn")
    }
    pp_train = configurables.bound_value("pretrain.pp_train")
    if args.reduced:  # Rotation's 224 px crops at the reduced size
        pp_train = pp_train.replace("(224)", f"({args.size})")
    batch_pp = configurables.bound_value("pretrain.pp_train_batch") or ""
    parts = device_lib.split(pp_train)
    device_fn = device_lib.device_batch_fn(
        parts, get_preprocess_fn(batch_pp) if batch_pp else None
    )
    # Host-part output of real (random) JPEGs of an ImageNet-like size.
    rng = np.random.default_rng(1)
    host_fn = device_lib.host_example_fn(parts)
    side = args.image_side
    examples = [
        host_fn(
            {
                "image": tf.io.encode_jpeg(
                    rng.integers(0, 256, (side, side + side // 4, 3), np.uint8)
                )
            }
        )
        for _ in range(args.pretext_batch)
    ]
    raw = {k: tf.stack([e[k] for e in examples]) for k in examples[0]}
    spec = device_lib.output_spec(
        device_fn, tf.nest.map_structure(tf.TensorSpec.from_tensor, raw)
    )
    model = configured["model_fn"](pretext_lib.example_spec(spec))
    return raw, device_fn, model, configured["loss_fn"], configured["metric_fn"]


def pretext_rows(task: str, mode: str, args) -> list[dict]:
    """Device-built and pre-built rows of one task, and its trunk-only row."""
    policy, jit = MODES[mode]
    args.policy = policy
    raw, device_fn, model, loss_fn, metric_fn = _task_setup(task, args)
    built = device_fn(raw)
    rows = []
    for construction, batch, fn in (
        ("device", raw, device_fn),
        ("prebuilt", built, None),
    ):
        step = loop_lib.make_replica_step(
            model,
            keras.optimizers.SGD(0.01, momentum=0.9),
            loss_fn,
            global_batch_size=args.pretext_batch,
            metric_fn=metric_fn,
            jit_compile=jit,
            device_preprocess_fn=fn,
        )
        if not jit:  # a graph, as train runs it (not eager)
            step = tf.function(step)
        out = _timed(
            lambda s=step, b=batch: s(b)["loss"], steps=args.steps, rounds=args.rounds
        )
        rows.append(
            {
                "section": "pretext",
                "model": task,
                "mode": mode,
                "construction": construction,
                "source_images": args.pretext_batch,
                "images_per_sec": args.pretext_batch / out["seconds_per_step"],
                **out,
            }
        )
    image = built["image"]  # [B, K, h, w, C]
    inputs, size = image.shape[0] * image.shape[1], image.shape[2]
    # The pretext model's own trunk (Jigsaw's patch variant: stem stride 1),
    # so the ratio is the head, loss and construction, not another trunk.
    arch = configurables.bound_value("build_trunk.architecture")
    trunk = trunk_row(
        arch, mode, args, inputs=inputs, size=size, model=pretext_lib.get_trunk(model)
    )
    views = image.shape[1]
    for row in rows:
        row["trunk_inputs_per_sec"] = row["images_per_sec"] * views
        row["vs_trunk_only"] = row["trunk_inputs_per_sec"] / trunk["images_per_sec"]
    rows[0]["vs_prebuilt"] = rows[0]["images_per_sec"] / rows[1]["images_per_sec"]
    trunk.update(section="pretext_trunk_only", task=task)
    return [*rows, trunk]


def probe_row(args) -> dict:
    """Seconds per L-BFGS iteration on ``--probe_size`` random features."""
    n, d = args.probe_size
    c = args.probe_classes
    x = tf.random.stateless_normal([n, d], seed=[1, 2])
    teacher = tf.random.stateless_normal([d, c], seed=[3, 4])
    y = tf.argmax(
        x @ teacher + 2.0 * tf.random.stateless_normal([n, c], seed=[5, 6]), 1
    )

    def fit(iterations):
        return lbfgs.fit_logistic_regression(
            x,
            y,
            num_classes=c,
            l2=args.probe_l2,
            max_iterations=iterations,
            tolerance=1e-12,
            dtype=tf.float32,
        )

    start = time.perf_counter()
    fit(1)  # tracing and compilation
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    out = fit(args.probe_iterations)
    seconds = time.perf_counter() - start
    return {
        "section": "probe",
        "model": f"lbfgs {n}x{d}, {c} classes",
        "mode": "f32",
        "l2": args.probe_l2,
        "iterations": out.iterations,
        "seconds": seconds,
        "seconds_per_iteration": seconds / max(out.iterations, 1),
        "loss": out.loss,
        "warmup_seconds": warmup,
    }


def _plan(args) -> list[tuple[str, Callable[[], list[dict]]]]:
    """(name, run) in priority order."""
    size = args.size
    plan = [
        (
            f"{trunks_lib.BASELINE} bf16_xla",
            lambda: [
                trunk_row(
                    trunks_lib.BASELINE, "bf16_xla", args, inputs=args.batch, size=size
                )
            ],
        )
    ]
    for arch in args.archs:
        for mode in args.modes:
            plan.append(
                (
                    f"{arch} {mode}",
                    lambda a=arch, m=mode: [
                        trunk_row(a, m, args, inputs=args.batch, size=size)
                    ],
                )
            )
            if arch == args.archs[0] and mode == args.modes[0]:
                for task in TASKS:  # the end-to-end steps right after the first
                    plan.append(
                        (
                            f"{task} {mode}",
                            lambda t=task, m=mode: pretext_rows(t, m, args),
                        )
                    )
                plan.append(("probe", lambda: [probe_row(args)]))
    for task in TASKS:
        for mode in args.modes[1:]:
            plan.append(
                (f"{task} {mode}", lambda t=task, m=mode: pretext_rows(t, m, args))
            )
    return plan


def format_table(rows: list[dict], skipped: list[str], *, reduced: bool = False) -> str:
    """Markdown: images/s, ratio to the baseline, the pretext ratios.

    ``reduced``: a line under the table says that "vs baseline" then compares
    one-unit-per-stage trunks with the full baseline (plumbing, not speed).
    """
    base = next(
        (r["images_per_sec"] for r in rows if r["model"] == trunks_lib.BASELINE), None
    )
    header = (
        "section", "model", "mode", "construction", "img/s", "vs baseline",
        "vs trunk-only", "vs prebuilt", "warm-up s",
    )  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        if r["section"] == "probe":
            cells = [
                "probe",
                r["model"],
                "f32",
                "",
                f"{r['seconds_per_iteration']:.3f} s/it",
            ]
            cells += ["", "", "", f"{r['warmup_seconds']:.1f}"]
        else:
            trunk = r["section"] == "trunk" and base
            cells = [r["section"], r["model"], r["mode"], r.get("construction", "")]
            cells += [
                f"{r['images_per_sec']:.1f}",
                f"{r['images_per_sec'] / base:.2f}x" if trunk else "",
                f"{r['vs_trunk_only']:.2f}" if "vs_trunk_only" in r else "",
                f"{r['vs_prebuilt']:.2f}" if "vs_prebuilt" in r else "",
                f"{r['warmup_seconds']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if reduced:
        lines.append(
            "\n--reduced: the trunks have one unit per stage, so 'vs baseline' "
            "(the full keras ResNet50) checks the plumbing, not the speed; the "
            "other ratios compare like with like."
        )
    if skipped:
        lines.append(f"\nSkipped (time budget): {', '.join(skipped)}.")
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    try:
        n, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NxD such as 1280000x2048, got {text!r}"
        ) from None
    return n, d


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="revisit-benchmark accelerator", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--reduced", action="store_true", help="Tiny trunks and sizes (CPU, tests)."
    )
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument(
        "--modes", nargs="+", default=["bf16_xla", "f32_xla"], choices=list(MODES)
    )
    parser.add_argument(
        "--width", type=float, default=None, help="k (default 4; reduced 0.25)."
    )
    parser.add_argument(
        "--size", type=int, default=None, help="Trunk px (224; reduced 32)."
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="Trunk inputs per step (256; reduced 4).",
    )
    parser.add_argument(
        "--pretext_batch",
        type=int,
        default=None,
        help="Source images per pretext step (64; reduced 2).",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="Steps per round (10; reduced 1)."
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--probe_size",
        type=_size,
        default=None,
        help="NxD (1280000x2048; reduced 2000x64).",
    )
    parser.add_argument(
        "--probe_classes", type=int, default=None, help="(1000; reduced 10)"
    )
    parser.add_argument("--probe_iterations", type=int, default=20)
    parser.add_argument("--probe_l2", type=float, default=1e-3)
    parser.add_argument("--time_budget_s", type=float, default=420.0)
    parser.add_argument("--output", help="JSON results.")
    parser.add_argument("--table", help="Markdown table.")
    args = parser.parse_args(argv)
    full = {
        "width": 4.0,
        "size": 224,
        "batch": 256,
        "pretext_batch": 64,
        "steps": 10,
        "probe_size": (1_280_000, 2048),
        "probe_classes": 1000,
    }
    small = {
        "width": 0.25,
        "size": 32,
        "batch": 4,
        "pretext_batch": 2,
        "steps": 1,
        "probe_size": (2000, 64),
        "probe_classes": 10,
    }
    for key, value in (small if args.reduced else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.units = (1, 1, 1, 1) if args.reduced else None
    args.image_side = 300 if not args.reduced else 264  # >= jigsaw's 255 crop
    for name in (
        "batch",
        "pretext_batch",
        "steps",
        "rounds",
        "probe_classes",
        "probe_iterations",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("revisit_tf.pp.builder").setLevel(logging.WARNING)

    start, rows, skipped, last = time.perf_counter(), [], [], 0.0
    plan = _plan(args)
    for i, (name, run) in enumerate(plan, 1):
        elapsed = time.perf_counter() - start
        if elapsed + last > args.time_budget_s:
            skipped.append(name)
            continue
        t0 = time.perf_counter()
        new = run()
        last = time.perf_counter() - t0
        rows += new
        _logger.info(
            "[%d/%d] %s: %.1f img/s (%.1fs; %.0fs elapsed)",
            i,
            len(plan),
            name,
            new[0].get("images_per_sec", 0.0),
            last,
            time.perf_counter() - start,
        )
    table = format_table(rows, skipped, reduced=args.reduced)
    print(table)
    result = {
        "benchmark": "accelerator",
        "rows": rows,
        "skipped": skipped,
        "settings": {k: v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - start,
        "machine": machine_lib.machine_info(),
    }
    for path, text in (
        (args.output, json.dumps(result, indent=2, default=str)),
        (args.table, table + "\n"),
    ):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
