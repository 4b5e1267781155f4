"""The L2-path row of ``revisit-benchmark probe`` (``--path_size``): the probe as run.

The ImageNet-shaped CPU row of issue 14: ``--path_size imagenet`` is
256,000 x 2048 features with 1000 classes (``--path_classes``), plus val and
test splits of ``--path_eval_rows`` rows each, in the feature cache. The
``lbfgs`` protocol with its defaults (``protocols.LbfgsProbe``: the default
L2 grid, extended past an edge pick, the eigen-preconditioner, tolerance
1e-4, then the refit on train + val) runs through ``lbfgs_path.fit_path``
exactly as ``revisit-probe`` runs it:

  * ``streamed``: ``max_resident_bytes`` = ``--path_budget_mb``, so the
    training matrix (4x the budget or more at the defaults) is streamed from
    cache shards of budget / 16; peak resident memory above the child's
    baseline is sampled and reported next to the budget, the feature bytes
    and the ``[N, C]`` logits the solver keeps resident (two float32 copies:
    the logits and the direction's logits);
  * ``whole_batch`` (``--path_whole_batch``, default on): the same data held
    in memory, for the streamed / whole-batch ratio (goal: within 1.5x).

Each runs in a child process (a fresh TensorFlow, its own memory). Then
scikit-learn's ``LogisticRegression(solver="lbfgs")`` solves the refit's
problem alone (one l2: the selected one, on train + val standardized as the
refit was, ``C = 1 / (l2 N)``) until its loss is at most the streamed refit's
times ``1 + --equal_loss_rtol`` (equal loss as in the other equal-loss rows;
every loss recomputed in float64 NumPy): caps 8, 16, 32, ...
iterations from a cold start, then bisection. A run that would push
scikit-learn's total past ``--sklearn_budget_s`` (default 1800 s) is not
started: the row then says ``extrapolated`` and gives the seconds per
iteration measured, a lower bound (the last cap's iterations were not
enough) and an estimate that assumes its loss approaches the optimum
(taken 1e-5 relative below ours) geometrically at the rate of its last two
caps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from typing import Any

import numpy as np

from revisit_tf.benchmarks import probe_data

IMAGENET = (256_000, 2048)
_log = logging.getLogger("revisit_tf.benchmarks.probe")


def parse_size(text: str, what: str = "--path_size") -> tuple[int, int]:
    """``NxD`` (or, for ``--path_size``, ``imagenet``: 256000x2048) -> ``(N, D)``.

    Raises:
        argparse.ArgumentTypeError: not of that form, N < 20 or D < 1.
    """
    if what == "--path_size" and text.lower() == "imagenet":
        return IMAGENET
    form = "NxD or 'imagenet'" if what == "--path_size" else "NxD, e.g. 60000x2048"
    try:
        n, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} is {form}; got {text!r}.") from None
    if n < 20 or d < 1:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: need N >= 20 and D >= 1.")
    return n, d


def add_flags(p: argparse.ArgumentParser) -> None:
    """The row's flags (module docstring)."""
    p.add_argument(
        "--path_size",
        type=parse_size,
        help="run the L2-path row on NxD training features ('imagenet': "
        "256000x2048); off by default (hours on a CPU at that size).",
    )
    p.add_argument("--path_classes", type=int, default=1000)
    p.add_argument(
        "--path_eval_rows", type=int, default=10_000, help="val and test rows each"
    )
    p.add_argument(
        "--path_budget_mb",
        type=float,
        help="memory budget of the streamed run (max_resident_bytes; shards of "
        "a sixteenth). Default: a quarter of the training matrix.",
    )
    p.add_argument(
        "--path_whole_batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the path whole-batch on the same data (the ratio).",
    )
    p.add_argument(
        "--sklearn_budget_s",
        type=float,
        default=1800.0,
        help="scikit-learn's total time on the row; beyond it, extrapolated.",
    )
    p.add_argument("--_path_child", help=argparse.SUPPRESS)


def _entries(args, cache_dir: str, shard_bytes: int) -> dict[str, Any]:
    n, d = args.path_size
    out = {}
    for offset, (split, rows) in enumerate(
        [("train", n), ("val", args.path_eval_rows), ("test", args.path_eval_rows)]
    ):
        seed = args.seed + 10 + offset
        spec = {
            "benchmark": "probe_path",
            "data": args.data,
            "spread": args.spread,
            "classes": args.path_classes,
            "n": rows,
            "d": d,
            "seed": seed,
            "split": split,
        }

        def build(rows=rows, seed=seed, split=split):
            return probe_data.features(
                args.data, rows, d, classes=args.path_classes, spread=args.spread,
                seed=seed, split=split,
            )  # fmt: skip

        out[split] = probe_data.cached_features(
            cache_dir, spec, build, shard_bytes=shard_bytes
        )
    return out


def child(args) -> dict[str, Any]:
    """In a fresh process: ``fit_path`` with the protocol's defaults, timed."""
    from revisit_tf.probe import cache as cache_lib
    from revisit_tf.probe import lbfgs_path, protocols

    spec = json.loads(args._path_child)
    entries = protocols.SplitEntries(
        *(cache_lib.CachedFeatures(spec[s]) for s in ("train", "val", "test"))
    )
    probe = protocols.LbfgsProbe(max_resident_bytes=spec["max_resident_bytes"])
    sampler = probe_data.RssSampler()
    baseline, baseline_private = sampler.sizes()
    start = time.perf_counter()
    with sampler:
        fit = lbfgs_path.fit_path(probe, entries, None)
    seconds = time.perf_counter() - start
    final = fit.final
    np.savez(
        spec["params"],
        weights=final.best.weights,
        bias=final.best.bias,
        mean=final.standardizer.mean,
        scale=final.standardizer.scale,
    )
    fields = lbfgs_path.row_fields(fit, refit=True)
    return {
        "seconds": seconds,
        "streamed": fit.streamed,
        "l2": fields["l2"],
        "l2_path": fields["l2_path"],
        "l2_extended": fields["l2_extended"],
        "refit_iterations": fields["refit_iterations"],
        "refit_seconds": final.best.seconds,
        "converged": fields["converged"],
        "val_top1": fields["val_top1"],
        "test_top1": float(np.mean(fit.test_predictions == fit.test_labels)),
        "warnings": fields["warnings"],
        "peak_rss_above_baseline_bytes": sampler.peak - baseline,
        "peak_private_above_baseline_bytes": sampler.peak_private - baseline_private,
    }


def _run_child(args, entries, params: str, max_resident_bytes: int) -> dict:
    spec = {s: e.path for s, e in entries.items()}
    spec.update(params=params, max_resident_bytes=max_resident_bytes)
    argv = [
        sys.executable, "-m", "revisit_tf.benchmarks.probe",
        "--_path_child", json.dumps(spec),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the path child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sklearn_to(z, y, l2: float, target: float, budget_s: float) -> dict[str, Any]:
    """scikit-learn's fewest iterations (cold start) to ``loss <= target``."""
    from sklearn.linear_model import LogisticRegression

    runs: list[tuple[int, float, float]] = []  # (cap, seconds, loss)

    def run(k: int) -> tuple[float, float, bool]:
        model = LogisticRegression(
            C=1.0 / (l2 * len(y)), solver="lbfgs", tol=1e-12, max_iter=k
        )
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at the cap
            model.fit(z, y)
        seconds = time.perf_counter() - start
        loss = probe_data.objective64(z, y, model.coef_.T, model.intercept_, l2)
        runs.append((k, seconds, loss))
        _log.info("  sklearn, %d iterations: %.1fs, loss %.7f.", k, seconds, loss)
        return seconds, loss, int(np.max(model.n_iter_)) < k

    spent = 0.0
    seconds, _, _ = run(2)
    spent += seconds
    per_iteration = seconds / 2
    k, low, high = 8, 2, None
    while high is None:
        if spent + per_iteration * k > budget_s:
            break
        seconds, loss, stopped = run(k)
        spent += seconds
        per_iteration = seconds / k
        if loss <= target:
            high = k
        elif stopped:  # scipy's own stopping test ended it short of our loss
            return {
                "reached": False,
                "extrapolated": False,
                "iterations": None,
                "iterations_known_short": k,
                "seconds": seconds,
                "loss": loss,
                "seconds_spent": spent,
                "note": "stopped by its own test above our loss",
            }
        else:
            low, k = k, 2 * k
    if high is None:
        return extrapolate(runs, per_iteration, target, budget_s)
    while high - low > 1 and spent + per_iteration * high <= budget_s:
        mid = (low + high) // 2
        seconds, loss, _ = run(mid)
        spent += seconds
        if loss <= target:
            high = mid
        else:
            low = mid
    k, seconds, loss = next(r for r in runs if r[0] == high)
    return {
        "reached": True,
        "extrapolated": False,
        "iterations": k,
        "iterations_known_short": low,
        "seconds": seconds,
        "loss": loss,
        "seconds_spent": spent,
    }


def extrapolate(runs, per_iteration: float, target: float, budget_s: float):
    """The budget ran out before the target: a lower bound and an estimate."""
    capped = sorted(r for r in runs if r[0] >= 8)
    k_last, _, loss_last = capped[-1] if capped else runs[-1]
    estimate = None
    if len(capped) >= 2:
        # L_k - L* shrinking geometrically at the rate of the last two caps,
        # with L* (unknown) taken 1e-5 relative below our loss (tolerance 1e-4).
        floor = target * (1 - 1e-5)
        (k0, _, l0), (k1, _, l1) = capped[-2], capped[-1]
        if l0 > l1 > target:
            rate = math.log((l0 - floor) / (l1 - floor)) / (k1 - k0)
            needed = k1 + math.log((l1 - floor) / (target - floor)) / rate
            estimate = per_iteration * needed
    return {
        "reached": False,
        "extrapolated": True,
        "iterations": None,
        "iterations_known_short": k_last,
        "seconds": None,
        "seconds_lower_bound": per_iteration * k_last,
        "seconds_estimate": estimate,
        "seconds_per_iteration": per_iteration,
        "loss": loss_last,
        "seconds_spent": sum(r[1] for r in runs),
        "budget_seconds": budget_s,
    }


def path_row(args, cache_dir: str) -> dict[str, Any]:
    """Builds the features, runs the children and scikit-learn; the row."""
    n, d = args.path_size
    matrix = 4 * n * d
    budget = int(args.path_budget_mb * 2**20) if args.path_budget_mb else matrix // 4
    shard_bytes = max(4096, budget // 16)
    t0 = time.perf_counter()
    entries = _entries(args, cache_dir, shard_bytes)
    _log.info(
        "Path row: %dx%d, %d classes (%.0f MB; budget %.0f MB, %d shards) "
        "built in %.0fs.",
        n, d, args.path_classes, matrix / 2**20, budget / 2**20,
        entries["train"].num_shards, time.perf_counter() - t0,
    )  # fmt: skip
    params = os.path.join(cache_dir, "path_params.npz")
    _log.info("Path row: the lbfgs protocol, streamed, in a child process ...")
    streamed = _run_child(args, entries, params, budget)
    _log.info(
        "  streamed: %.1fs, l2 %.0e, refit %d iterations, test %.2f%%.",
        streamed["seconds"], streamed["l2"], streamed["refit_iterations"],
        100 * streamed["test_top1"],
    )  # fmt: skip
    whole = None
    if args.path_whole_batch:
        _log.info("Path row: the same, whole-batch, in a child process ...")
        whole = _run_child(args, entries, params + ".whole.npz", 1 << 62)
        _log.info("  whole-batch: %.1fs.", whole["seconds"])

    # The refit's problem: train + val, standardized with the refit's map.
    x, y = entries["train"].load()
    vx, vy = entries["val"].load()
    with np.load(params) as p:
        w, b, mean, scale = p["weights"], p["bias"], p["mean"], p["scale"]
    z = np.concatenate([x, vx])
    del x, vx
    z -= mean.astype(np.float32)
    z /= scale.astype(np.float32)
    y = np.concatenate([y, vy])
    l2 = streamed["l2"]
    ours_loss = probe_data.objective64(z, y, w, b, l2)
    target = ours_loss * (1 + args.equal_loss_rtol)
    _log.info("Path row: scikit-learn at l2 %.0e to loss %.7f ...", l2, target)
    sk = _sklearn_to(z, y, l2, target, args.sklearn_budget_s)
    sk_seconds = sk["seconds"] if sk["reached"] else sk.get("seconds_estimate")
    return {
        "size": f"{n}x{d}",
        "classes": args.path_classes,
        "eval_rows": args.path_eval_rows,
        "feature_bytes": matrix,
        "budget_bytes": budget,
        "logits_bytes": 2 * 4 * (n + args.path_eval_rows) * args.path_classes,
        "shards": entries["train"].num_shards,
        "streamed": streamed,
        "whole_batch": whole,
        "streamed_vs_whole_batch": None
        if whole is None
        else streamed["seconds"] / whole["seconds"],
        "refit_loss": ours_loss,
        "target_loss": target,
        "sklearn": sk,
        "sklearn_one_l2_vs_our_path": None
        if sk_seconds is None
        else sk_seconds / streamed["seconds"],
    }


def table(row: dict[str, Any]) -> str:
    """The row as a few lines of markdown."""
    mb = 2**20
    s, w, sk = row["streamed"], row["whole_batch"], row["sklearn"]
    path = ", ".join(
        f"{p['l2']:.0e}{'*' if p['extended'] else ''}: {p['iterations']} it "
        f"{p['seconds']:.0f}s val {100 * p['val_top1']:.1f}"
        for p in s["l2_path"]
    )
    lines = [
        f"L2-path row ({row['size']}, {row['classes']} classes, "
        f"{row['eval_rows']} val and test rows; the lbfgs protocol's defaults):",
        "",
        f"- streamed: {s['seconds']:.1f}s for the path and the refit "
        f"(budget {row['budget_bytes'] / mb:.0f} MB for {row['feature_bytes'] / mb:.0f}"
        f" MB of features in {row['shards']} shards; peak RSS "
        f"+{s['peak_rss_above_baseline_bytes'] / mb:.0f} MB, private "
        f"+{s['peak_private_above_baseline_bytes'] / mb:.0f} MB (the rest is page "
        "cache of mapped shards), of which the resident "
        f"logits are {row['logits_bytes'] / mb:.0f} MB); selected l2 {s['l2']:.0e}, "
        f"refit {s['refit_iterations']} iterations ({s['refit_seconds']:.1f}s), "
        f"val {100 * s['val_top1']:.2f}%, test {100 * s['test_top1']:.2f}%.",
        f"- path (* past the grid's edge): {path}.",
    ]
    if w is not None:
        lines.append(
            f"- whole-batch on the same data: {w['seconds']:.1f}s (peak RSS "
            f"+{w['peak_rss_above_baseline_bytes'] / mb:.0f} MB, l2 {w['l2']:.0e}, "
            f"test {100 * w['test_top1']:.2f}%); streamed / whole-batch = "
            f"{row['streamed_vs_whole_batch']:.2f}x."
        )
    if sk["reached"]:
        lines.append(
            f"- scikit-learn, the refit's problem alone (one l2), to our loss "
            f"{row['refit_loss']:.7f} x (1 + rtol) = {row['target_loss']:.7f}: "
            f"{sk['iterations']} iterations, "
            f"{sk['seconds']:.1f}s = {row['sklearn_one_l2_vs_our_path']:.2f}x our "
            "whole streamed path + refit."
        )
    elif not sk["extrapolated"]:
        lines.append(
            f"- scikit-learn, the refit's problem alone (one l2): {sk['note']} "
            f"({sk['loss']:.7f} > {row['target_loss']:.7f}) after "
            f"{sk['iterations_known_short']} iterations, {sk['seconds']:.1f}s."
        )
    else:
        estimate = sk["seconds_estimate"]
        lines.append(
            f"- scikit-learn, the refit's problem alone (one l2): not at our loss "
            f"{row['refit_loss']:.7f} after {sk['iterations_known_short']} "
            f"iterations (loss {sk['loss']:.7f}); the next cap would pass the "
            f"{sk['budget_seconds']:.0f}s budget, so its time is EXTRAPOLATED: "
            f"> {sk['seconds_lower_bound']:.0f}s (lower bound, "
            f"{sk['seconds_per_iteration']:.2f}s per iteration)"
            + (
                ""
                if estimate is None
                else f", about {estimate:.0f}s at its last convergence rate "
                f"= {row['sklearn_one_l2_vs_our_path']:.1f}x our path + refit"
            )
            + "."
        )
    return "\n".join(lines)
