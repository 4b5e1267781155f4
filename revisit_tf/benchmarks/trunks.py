"""``revisit-benchmark trunks``: training-step speed of the trunks.

For each input size, times a full training step (forward in training mode,
softmax cross-entropy on a 1000-way head plus weight decay 1e-4 on every
kernel, backward, SGD with momentum) of
``keras.applications.ResNet50(weights=None)`` (the baseline, whose weight
decay the harness adds since the model has none) and of each requested trunk
at width k (with its own regularizers), with the same harness, batch and
inputs.
Rounds alternate between the models so that machine noise hits all of them
alike; the reported speed is the median over rounds, and the ratio is
``trunk images/s / baseline images/s`` measured in the same run.

``--revnet_memory`` also measures the peak allocator memory of one RevNet
training step with plain and with memory-saving (reversible) backprop.

Example::

    revisit-benchmark trunks --sizes 64 224 --batch 32 --output trunks.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from revisit_tf.benchmarks import machine as machine_lib
from revisit_tf.models import factory
from revisit_tf.models.resnet import count_params

_logger = logging.getLogger(__name__)

BASELINE = "keras.applications.ResNet50"
# Reference sections 5.5, 6: every trunk trains with weight decay 1e-4.
BASELINE_WEIGHT_DECAY = 1e-4


def build_baseline(size: int, num_classes: int = 1000) -> keras.Model:
    """``keras.applications.ResNet50(weights=None)`` returning logits."""
    return keras.applications.ResNet50(
        weights=None,
        input_shape=(size, size, 3),
        classes=num_classes,
        classifier_activation=None,
    )


def make_train_step(
    model: keras.Model, *, explicit_weight_decay: float = 0.0, jit_compile: bool = False
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A compiled SGD step of ``model`` (dict output with ``logits``, or logits).

    The loss is the mean cross-entropy plus ``model.losses`` (our trunks carry
    their weight decay as kernel regularizers, reference section 6) plus, if
    ``explicit_weight_decay`` is set, ``wd / 2 * sum(W**2)`` over every kernel
    (rank >= 2 variable). The baseline gets the paper's 1e-4 this way, so both
    models run the same training step. ``jit_compile``: the step as one XLA
    cluster. Logits are cast to float32 (a bfloat16 baseline's are not).
    """
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    kernels = [v for v in model.trainable_variables if len(v.shape) >= 2]

    @tf.function(jit_compile=jit_compile)
    def step(images, labels):
        with tf.GradientTape() as tape:
            out = model(images, training=True)
            logits = out["logits"] if isinstance(out, dict) else out
            logits = tf.cast(logits, tf.float32)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            )
            if model.losses:
                loss += tf.cast(tf.add_n(model.losses), tf.float32)
            if explicit_weight_decay:
                loss += (explicit_weight_decay / 2) * tf.add_n(
                    [tf.reduce_sum(tf.square(k)) for k in kernels]
                )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step


def time_steps(step, images, labels, steps: int) -> float:
    """Seconds for ``steps`` steps (the loss of the last one is fetched)."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(images, labels)
    float(loss)
    return time.perf_counter() - start


def benchmark_size(
    size: int,
    *,
    archs: Sequence[str],
    width: float,
    batch: int,
    steps: int,
    rounds: int,
    data_format: str,
    dtype_policy: str | None,
) -> list[dict]:
    """Rows for one input size: the baseline first, then each trunk."""
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (batch, size, size, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 1000, batch), tf.int32)
    models = {BASELINE: build_baseline(size)}
    for arch in archs:
        models[arch] = factory.build_trunk(
            arch,
            width=width,
            num_classes=1000,
            input_shape=(size, size, 3),
            data_format=data_format,
            dtype_policy=dtype_policy,
        )
    step_fns = {}
    for name, model in models.items():
        # The baseline has no weight decay of its own: give it the trunks' 1e-4.
        decay = BASELINE_WEIGHT_DECAY if name == BASELINE else 0.0
        step_fns[name] = make_train_step(model, explicit_weight_decay=decay)
        t0 = time.perf_counter()
        time_steps(step_fns[name], images, labels, 2)  # trace + warm up
        _logger.info(
            "%s @%d px: traced and warmed up in %.1fs",
            name,
            size,
            time.perf_counter() - t0,
        )
    rates = {name: [] for name in models}
    for r in range(rounds):
        for name in models:
            seconds = time_steps(step_fns[name], images, labels, steps)
            rates[name].append(batch * steps / seconds)
        _logger.info(
            "%d px round %d/%d: %s",
            size,
            r + 1,
            rounds,
            ", ".join(f"{n} {v[-1]:.1f} img/s" for n, v in rates.items()),
        )
    base = statistics.median(rates[BASELINE])
    rows = []
    for name, model in models.items():
        median = statistics.median(rates[name])
        rows.append(
            {
                "model": name,
                "width": None if name == BASELINE else width,
                "size": size,
                "batch": batch,
                "params": count_params(model),
                "images_per_sec": median,
                "images_per_sec_rounds": rates[name],
                "ratio_vs_baseline": median / base,
            }
        )
    return rows


def revnet_peak_memory(
    *, width: float, size: int, batch: int, units: Sequence[int]
) -> dict:
    """Peak allocator bytes of one RevNet training step, plain vs memory-saving."""
    device = tf.config.list_logical_devices("CPU")[0].name
    out = {}
    for memory_saving in (False, True):
        keras.utils.set_random_seed(0)
        model = factory.build_trunk(
            "revnet50",
            width=width,
            units=tuple(units),
            num_classes=1000,
            input_shape=(size, size, 3),
            memory_saving=memory_saving,
        )
        step = make_train_step(model)
        images = tf.random.uniform((batch, size, size, 3), -1, 1)
        labels = tf.zeros((batch,), tf.int32)
        time_steps(step, images, labels, 1)
        tf.config.experimental.reset_memory_stats(device)
        base = tf.config.experimental.get_memory_info(device)["current"]
        time_steps(step, images, labels, 1)
        peak = tf.config.experimental.get_memory_info(device)["peak"] - base
        out["memory_saving" if memory_saving else "plain"] = int(peak)
    out["ratio"] = out["memory_saving"] / out["plain"]
    out.update(width=width, size=size, batch=batch, units=list(units))
    return out


def _format_table(rows: list[dict]) -> str:
    lines = [
        f"{'model':<30} {'k':>4} {'px':>4} {'batch':>5} {'params':>12} "
        f"{'img/s':>8} {'vs baseline':>11}"
    ]
    for r in rows:
        k = "" if r["width"] is None else f"{r['width']:g}"
        lines.append(
            f"{r['model']:<30} {k:>4} {r['size']:>4} {r['batch']:>5} "
            f"{r['params']:>12,} {r['images_per_sec']:>8.1f} "
            f"{r['ratio_vs_baseline']:>10.2f}x"
        )
    return "\n".join(lines)


def _write_json(path: str, obj: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False) as f:
        json.dump(obj, f, indent=2)
    os.replace(f.name, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="revisit-benchmark trunks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--archs",
        nargs="+",
        default=["resnet50_v1"],
        choices=factory.ARCHITECTURES,
        help="Trunks to time against the baseline (default: resnet50_v1).",
    )
    parser.add_argument("--width", type=float, default=4, help="Widening factor k.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch", type=int, default=32, help="Images per step.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds.")
    parser.add_argument(
        "--data_format",
        default="channels_last",
        choices=["channels_last", "channels_first"],
    )
    parser.add_argument(
        "--dtype_policy",
        default=None,
        choices=["mixed_float16", "mixed_bfloat16"],
        help="Mixed precision for our trunks (the baseline stays float32).",
    )
    parser.add_argument(
        "--revnet_memory",
        action="store_true",
        help="Also measure the peak allocator memory of a RevNet50 training step "
        "(k = --width, 224 px, batch 8), plain vs memory-saving.",
    )
    parser.add_argument("--output", help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    rows = []
    for size in args.sizes:
        rows += benchmark_size(
            size,
            archs=args.archs,
            width=args.width,
            batch=args.batch,
            steps=args.steps,
            rounds=args.rounds,
            data_format=args.data_format,
            dtype_policy=args.dtype_policy,
        )
    print(_format_table(rows))
    result = {
        "benchmark": "trunks",
        "baseline": BASELINE,
        "rows": rows,
        "settings": vars(args),
        "machine": machine_lib.machine_info(),
    }
    if args.revnet_memory:
        memory = revnet_peak_memory(
            width=args.width, size=224, batch=8, units=(3, 4, 6, 3)
        )
        result["revnet_memory"] = memory
        print(
            f"RevNet50 k={args.width:g} 224px batch 8 peak training memory: plain "
            f"{memory['plain'] / 2**20:.1f} MiB, memory-saving "
            f"{memory['memory_saving'] / 2**20:.1f} MiB "
            f"({memory['ratio']:.2f}x)"
        )
    if args.output:
        _write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
