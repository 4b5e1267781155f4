"""``revisit-benchmark probe``: our L-BFGS probe vs scikit-learn, same cached features.

Not a stage of the data flow. For each size (``--sizes``, default a
``60000 x 2048`` and a ``60000 x 4096`` problem with 10 classes) it writes
deterministic synthetic features into the feature cache (``probe/cache.py``),
reads them back, and solves the same multinomial logistic regression
(``l2 = 1 / (C N)``) with

  * ``ours``: ``lbfgs.fit_logistic_regression(solver="lbfgs")``, float32;
  * ``ours_precond`` (not in the default list): the same with
    ``precondition=True`` (``X^T X`` preconditioner, the probe protocol's
    default; it pays off on correlated features, e.g. ``--data fmnist_relu``);
  * ``ours_streamed`` (not in the default list): ``ours_precond``'s fit
    streamed from the training split's cache entry (``sharded.fit_sharded``,
    shards of ``--stream_shard_mb``); its rows give ``seconds_vs_whole_batch``
    against ``ours_precond`` on the same data (goal: within 1.5x);
  * ``tfp``: the same with ``solver="tfp"`` (``tfp.optimizer.lbfgs_minimize``,
    the probe before this benchmark existed);
  * ``sklearn``: ``LogisticRegression(solver="lbfgs", C=C)``, float32 input,
    its default ``tol=1e-4`` (the same gradient sup-norm as ours).

Every solution's objective ``J`` is recomputed here in float64 NumPy, and its
top-1 on a held-out set, so losses and accuracies are compared on equal terms.
Speed is a ratio against scikit-learn measured in the same run; every time is
the median of ``--repeats`` runs. Two comparisons:

  * default tolerance: each solver as a user would call it. Our first fit in a
    process also traces the solver (and on a CPU compiles the XLA product for
    the shape); that one-off cost is timed and shown in its own column, since
    an L2 sweep or a run over several endpoints of one shape pays it once.
  * equal final loss (the goal's comparison): the target is the lowest loss
    any run reached, times ``1 + --equal_loss_rtol``; ours and scikit-learn
    are each timed at the fewest iterations whose cold-start fit reaches it
    (found by bisection on the iteration cap; the row also shows the loss one
    iteration earlier, above the target).

A last run (``--stream_budget_mb``) streams features 4x larger than that
budget from the cache (``probe/sharded.py``) in a child process, and reports
its peak resident memory above the process's baseline next to the size of the
feature matrix, and its loss against the whole-batch solver.

``--path_size`` (off by default; ``imagenet`` = 256,000 x 2048, 1000
classes) adds the L2-path row: the ``lbfgs`` protocol's whole default path and
refit, streamed under a memory budget, against scikit-learn on the refit's
one L2 at equal loss (``benchmarks/probe_path.py``).

Features (``--data``, ``benchmarks/probe_data.py``): ``gaussian`` (default;
well conditioned, like standardized trunk features), ``fmnist_relu`` (random
ReLU features of Fashion-MNIST pixels: strongly correlated, ill conditioned)
or ``fmnist_pixels`` (the standardized pixels themselves, ``--sizes
60000x784 --classes 10``); the last two need the idx files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from revisit_tf import files
from revisit_tf.benchmarks import machine as machine_lib
from revisit_tf.benchmarks import probe_data, probe_path

_TEST_ROWS = 10_000
# name -> (lbfgs solver, precondition) of our probe; "sklearn" is the baseline.
_OURS = {
    "ours": ("lbfgs", False),
    "ours_precond": ("lbfgs", True),
    "tfp": ("tfp", False),
    "ours_streamed": ("lbfgs", True),
}
# Solvers of ours that stream the training split's cache entry shard by shard.
_STREAMED = ("ours_streamed",)
_STREAMED_OBJECTIVES: dict = {}  # (cache entry path, l2) -> ShardedObjective
_SOLVERS = (*_OURS, "sklearn")
_log = logging.getLogger("revisit_tf.benchmarks.probe")


def _parse_size(text: str) -> tuple[int, int]:
    return probe_path.parse_size(text, "a size")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="revisit-benchmark probe",
        description="L-BFGS probe vs scikit-learn LogisticRegression on cached "
        "features (seconds, iterations, final loss, accuracy, ratios).",
    )
    p.add_argument(
        "--sizes",
        type=_parse_size,
        nargs="+",
        default=[(60000, 2048), (60000, 4096)],
        help="training sizes NxD (default 60000x2048 60000x4096).",
    )
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--data", choices=probe_data.KINDS, default="gaussian")
    p.add_argument("--spread", type=float, default=0.05, help="gaussian class spread")
    p.add_argument(
        "--l2", type=float, default=1e-3, help="penalty l2 = 1 / (C N) (default 1e-3)"
    )
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    p.add_argument(
        "--equal_loss_rtol",
        type=float,
        default=1e-4,
        help="equal-loss rows: target = best loss * (1 + this)",
    )
    p.add_argument(
        "--solvers",
        nargs="*",
        choices=_SOLVERS,
        default=["ours", "tfp", "sklearn"],
    )
    p.add_argument(
        "--stream_budget_mb",
        type=float,
        default=256.0,
        help="streamed run on features 4x this size (0: skip).",
    )
    p.add_argument(
        "--stream_shard_mb",
        type=float,
        default=16.0,
        help="shard size of the training split's cache entry (ours_streamed "
        "streams it shard by shard; default 16 MB)",
    )
    p.add_argument("--cache_dir", help="feature cache (default: a temp dir)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_stream_child", help=argparse.SUPPRESS)
    probe_path.add_flags(p)
    return p


def _cached(
    args, cache_dir: str, n: int, d: int, seed: int, split: str, shard_bytes=None
):
    """The cache entry of ``--data`` features of size ``n x d`` (built once)."""
    spec = {
        "benchmark": "probe",
        "data": args.data,
        "spread": args.spread,
        "classes": args.classes,
        "n": n,
        "d": d,
        "seed": seed,
        "split": split,
    }

    def build():
        return probe_data.features(
            args.data, n, d, classes=args.classes, spread=args.spread, seed=seed,
            split=split,
        )  # fmt: skip

    return probe_data.cached_features(cache_dir, spec, build, shard_bytes=shard_bytes)


def _run_ours(
    x, y, args, name: str, *, max_iterations: int = 1000, tolerance=None,
    repeats: int | None = None, warmup: bool = True, entry=None,
) -> dict:  # fmt: skip
    """One of ``_OURS`` on ``x [N, D]``, ``y [N]`` (``entry``: the same rows in
    the feature cache, for the streamed solver)."""
    import tensorflow as tf

    from revisit_tf.probe import lbfgs, sharded

    solver, precondition = _OURS[name]

    def fit(iterations, tol):
        if name in _STREAMED:
            # Per fit, what a streamed fit pays for each l2 of a path: the Gram
            # pass and eigendecomposition, two passes over the shards per
            # iteration. The objective (its compiled per-shard functions) is
            # built once per entry, as a path shares it across its l2s.
            key = (entry.path, args.l2)
            if key not in _STREAMED_OBJECTIVES:
                _STREAMED_OBJECTIVES[key] = sharded.ShardedObjective(
                    sharded.ShardSource.from_cache(entry), num_classes=args.classes,
                    l2=args.l2, dtype=tf.float32,
                )  # fmt: skip
            objective = _STREAMED_OBJECTIVES[key]
            return sharded.fit_sharded(
                objective, tolerance=tol, max_iterations=iterations,
                precondition=precondition,
            )  # fmt: skip
        return lbfgs.fit_logistic_regression(
            x, y, num_classes=args.classes, l2=args.l2, tolerance=tol,
            max_iterations=iterations, dtype=tf.float32, solver=solver,
            precondition=precondition,
        )  # fmt: skip

    # The first fit of a process traces the solver (and, for large matrices on
    # a CPU, compiles the XLA product for this shape); a sweep over an l2 grid
    # pays it once. It is timed here and reported, not added to every fit.
    start = time.perf_counter()
    if warmup:
        fit(1, args.tolerance)
    overhead = time.perf_counter() - start if warmup else None
    tol = args.tolerance if tolerance is None else tolerance
    seconds, out = probe_data.median_time(
        lambda: fit(max_iterations, tol), args.repeats if repeats is None else repeats
    )
    return {
        "seconds": seconds,
        "first_fit_overhead_seconds": overhead,
        "iterations": out.iterations,
        "function_evaluations": out.function_evaluations,
        "line_search_evaluations": out.line_search_evaluations,
        "converged": out.converged,
        "weights": out.weights,
        "bias": out.bias,
    }


def _run_sklearn(
    x, y, args, *, max_iterations: int = 1000, tolerance: float | None = None,
    repeats: int | None = None,
) -> dict:  # fmt: skip
    import warnings

    from sklearn.linear_model import LogisticRegression

    tol = args.tolerance if tolerance is None else tolerance

    def fit():
        model = LogisticRegression(
            C=1.0 / (args.l2 * len(y)), solver="lbfgs", tol=tol, max_iter=max_iterations
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at a capped max_iter
            return model.fit(x, y)

    seconds, model = probe_data.median_time(
        fit, args.repeats if repeats is None else repeats
    )
    return {
        "seconds": seconds,
        "iterations": int(np.max(model.n_iter_)),
        "function_evaluations": None,
        "converged": bool(np.max(model.n_iter_) < max_iterations),
        "weights": model.coef_.T,
        "bias": model.intercept_,
    }


def _scored(out: dict, x, y, tx, ty, args, **fields) -> dict:
    """Replaces weights/bias by float64 NumPy loss and top-1 (same for all)."""
    w, b = out.pop("weights"), out.pop("bias")
    out.update(
        fields,
        loss=probe_data.objective64(x, y, w, b, args.l2),
        train_top1=probe_data.top1(x, y, w, b),
        test_top1=probe_data.top1(tx, ty, w, b),
    )
    return out


def _size_rows(args, cache_dir: str, n: int, d: int) -> tuple[list[dict], list[dict]]:
    t0 = time.perf_counter()
    shard_bytes = int(args.stream_shard_mb * 2**20)
    train = _cached(args, cache_dir, n, d, args.seed, "train", shard_bytes)
    test = _cached(args, cache_dir, _TEST_ROWS, d, args.seed + 1, "test")
    x, y = train.load()
    tx, ty = test.load()
    _log.info("%dx%d features from the cache in %.1fs.", n, d, time.perf_counter() - t0)
    size = f"{n}x{d}"
    rows = []
    for name in args.solvers:
        _log.info("%s: %s ...", size, name)
        if name == "sklearn":
            out = _run_sklearn(x, y, args)
        else:
            out = _run_ours(x, y, args, name, entry=train)
        rows.append(_scored(out, x, y, tx, ty, args, solver=name, size=size))
        seconds, iterations = out["seconds"], out["iterations"]
        _log.info("  %s: %.2fs, %d iterations.", name, seconds, iterations)
    base = next((r for r in rows if r["solver"] == "sklearn"), None)
    for r in rows:
        if base is not None:
            r["speedup_vs_sklearn"] = base["seconds"] / r["seconds"]
            r["loss_rel_diff_vs_sklearn"] = (r["loss"] - base["loss"]) / base["loss"]
            r["test_top1_diff_vs_sklearn"] = r["test_top1"] - base["test_top1"]
    _streamed_vs_whole(rows)
    equal = []
    if base is not None and any(r["solver"].startswith("ours") for r in rows):
        equal = _equal_loss_rows(x, y, tx, ty, args, size, rows, train)
        _streamed_vs_whole(equal)
    return rows, equal


def _streamed_vs_whole(rows: list[dict]) -> None:
    """``seconds_vs_whole_batch`` of each streamed row: its seconds over those
    of the whole-batch solver with the same settings (``ours_precond``)."""
    whole = next((r for r in rows if r["solver"] == "ours_precond"), None)
    for r in rows:
        if r["solver"] in _STREAMED and whole is not None:
            r["seconds_vs_whole_batch"] = r["seconds"] / whole["seconds"]


def _equal_loss_rows(
    x, y, tx, ty, args, size: str, rows: list[dict], entry
) -> list[dict]:
    """Ours (each ``ours*`` solver run) and scikit-learn timed to the same loss.

    Default tolerances stop the two solvers at different losses (their
    gradient norms are measured differently), so a ratio of those times
    compares unequal work. Here the target is ``L* (1 + rtol)``, with ``L*``
    the lowest loss of any run including a tight one of ours (tolerance / 100,
    all losses recomputed in float64 NumPy), and each solver is timed (median
    of ``--repeats``) at the smallest iteration cap whose cold-start fit
    reaches the target, found by bisection. Both solvers are deterministic
    descent methods, so a cap of k reproduces the first k iterations of the
    uncapped run.
    """
    names = [r["solver"] for r in rows if r["solver"].startswith("ours")]
    tight = _scored(
        _run_ours(x, y, args, names[0], tolerance=args.tolerance / 100, repeats=1,
                  warmup=False, entry=entry),
        x, y, tx, ty, args,
    )  # fmt: skip
    best = min([tight["loss"]] + [r["loss"] for r in rows])
    target = best * (1 + args.equal_loss_rtol)
    _log.info("%s: equal-loss target %.7f (best loss %.7f).", size, target, best)

    def runner(name):
        # Tolerance 1e-12: only the iteration cap stops the run.
        def run(k, repeats=1):
            if name in _OURS:
                out = _run_ours(
                    x, y, args, name, max_iterations=k, tolerance=1e-12,
                    repeats=repeats, warmup=False, entry=entry,
                )  # fmt: skip
            else:
                out = _run_sklearn(
                    x, y, args, max_iterations=k, tolerance=1e-12, repeats=repeats
                )
            return _scored(out, x, y, tx, ty, args)

        return run

    out = []
    for name in [*names, "sklearn"]:
        run = runner(name)
        high, high_row = _reaching(run, target)
        low = 0  # largest cap known to miss the target
        while high - low > 1:
            mid = (low + high) // 2
            row = run(mid)
            if row["loss"] <= target:
                high, high_row = mid, row
            else:
                low = mid
        missed = run(low) if low > 0 else None
        high_row = run(high, args.repeats)  # the timing reported: median
        high_row.update(
            solver=name,
            size=size,
            target_loss=target,
            best_loss=best,
            iteration_cap=high,
            loss_one_iteration_earlier=None if missed is None else missed["loss"],
        )
        _log.info(
            "  %s reaches it in %d iterations, %.2fs.", name, high, high_row["seconds"]
        )
        out.append(high_row)
    sk = out[-1]
    for r in out:
        r["speedup_vs_sklearn"] = sk["seconds"] / r["seconds"]
        r["test_top1_diff_vs_sklearn"] = r["test_top1"] - sk["test_top1"]
        r["loss_rel_diff_vs_sklearn"] = (r["loss"] - sk["loss"]) / sk["loss"]
    return out


def _reaching(run, target: float) -> tuple[int, dict]:
    """The first cap of 8, 16, 32, ... whose fit reaches ``target``."""
    k = 8
    while k <= 4096:
        row = run(k)
        if row["loss"] <= target:
            return k, row
        k *= 2
    raise RuntimeError(f"no run reached the target loss {target} in 4096 iterations.")


def _stream_child(args) -> dict:
    """In a fresh process: streamed fit; peak RSS above the pre-fit baseline."""
    import tensorflow as tf

    from revisit_tf.probe import cache as cache_lib
    from revisit_tf.probe import sharded

    spec = json.loads(args._stream_child)
    entry = cache_lib.CachedFeatures(spec["path"])
    source = sharded.ShardSource.from_cache(entry)
    objective = sharded.ShardedObjective(
        source, num_classes=args.classes, l2=args.l2, dtype=tf.float32
    )
    # ru_maxrss is a maximum over the process's life (TensorFlow's start-up
    # dominates it), so the resident set is sampled during the fit instead.
    sampler = probe_data.RssSampler()
    baseline, baseline_private = sampler.sizes()
    start = time.perf_counter()
    with sampler:
        fit = sharded.fit_sharded(objective, tolerance=args.tolerance)
    seconds = time.perf_counter() - start
    peak = sampler.peak
    np.savez(spec["params"], weights=fit.weights, bias=fit.bias)
    return {
        "seconds": seconds,
        "iterations": fit.iterations,
        "function_evaluations": fit.function_evaluations,
        "converged": fit.converged,
        "shards": entry.num_shards,
        "peak_rss_above_baseline_bytes": peak - baseline,
        "peak_private_above_baseline_bytes": sampler.peak_private - baseline_private,
    }


def _streamed_row(args, cache_dir: str) -> dict:
    budget = int(args.stream_budget_mb * 2**20)
    d = args.sizes[0][1]
    n = 4 * budget // (4 * d)  # float32: 4x the budget
    # Shards of budget / 16: the streamed objective holds about 7 shard-sized
    # buffers at once (the shard, its tensor, the standardized copy and its
    # temporaries, the next shard read ahead), about half the budget.
    shard_bytes = max(4096, budget // 16)
    entry = _cached(args, cache_dir, n, d, args.seed + 2, "stream", shard_bytes)
    params = os.path.join(cache_dir, "stream_params.npz")
    child_args = [
        sys.executable, "-m", "revisit_tf.benchmarks.probe",
        "--classes", str(args.classes), "--l2", str(args.l2),
        "--tolerance", str(args.tolerance), "--data", args.data,
        "--_stream_child", json.dumps({"path": entry.path, "params": params}),
    ]  # fmt: skip
    _log.info(
        "Streamed run: %dx%d (%.0f MB) in a child process ...",
        n,
        d,
        entry.nbytes / 2**20,
    )
    proc = subprocess.run(child_args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"streamed child failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    x, y = entry.load()
    with np.load(params) as p:
        row["loss"] = probe_data.objective64(x, y, p["weights"], p["bias"], args.l2)
        row["train_top1"] = probe_data.top1(x, y, p["weights"], p["bias"])
    whole = _run_ours(x, y, args, "ours")
    whole_loss = probe_data.objective64(x, y, whole["weights"], whole["bias"], args.l2)
    row.update(
        solver="ours streamed",
        size=f"{n}x{d}",
        feature_bytes=entry.nbytes,
        budget_bytes=budget,
        whole_batch_seconds=whole["seconds"],
        whole_batch_loss=whole_loss,
        loss_rel_diff_vs_whole_batch=(row["loss"] - whole_loss) / whole_loss,
    )
    return row


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _table(rows: list[dict], equal: list[dict], streamed: dict | None, args) -> str:
    head = (
        "| size | solver | seconds | first-fit overhead | iters | f-evals |"
        " final loss | train top-1 | test top-1 | speed-up vs sklearn |"
        " loss rel. diff | top-1 diff |"
    )
    lines = [
        f"Default tolerance {args.tolerance:g}, median of {args.repeats} runs:",
        "",
        head,
        "|" + "---|" * 12,
    ]
    for r in rows:
        diff = r.get("test_top1_diff_vs_sklearn")
        overhead = r.get("first_fit_overhead_seconds")
        cells = [
            r["size"],
            r["solver"],
            f"{r['seconds']:.2f}",
            "-" if overhead is None else f"{overhead:.2f}",
            str(r["iterations"]),
            _fmt(r.get("function_evaluations"), "d"),
            f"{r['loss']:.7f}",
            f"{100 * r['train_top1']:.2f}",
            f"{100 * r['test_top1']:.2f}",
            _fmt(r.get("speedup_vs_sklearn"), ".2f") + "x",
            _fmt(r.get("loss_rel_diff_vs_sklearn"), "+.1e"),
            _fmt(None if diff is None else 100 * diff, "+.2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if equal:
        lines += [
            "",
            f"Equal final loss: each solver at the fewest iterations whose "
            f"cold-start fit reaches best loss x (1 + {args.equal_loss_rtol:g}), "
            f"median of {args.repeats} runs:",
            "",
            "| size | solver | iterations | seconds | target loss | final loss |"
            " loss one iteration earlier | test top-1 | speed-up vs sklearn |"
            " top-1 diff |",
            "|" + "---|" * 10,
        ]
        for r in equal:
            cells = [
                r["size"],
                r["solver"],
                str(r["iteration_cap"]),
                f"{r['seconds']:.2f}",
                f"{r['target_loss']:.7f}",
                f"{r['loss']:.7f}",
                _fmt(r["loss_one_iteration_earlier"], ".7f"),
                f"{100 * r['test_top1']:.2f}",
                f"{r['speedup_vs_sklearn']:.2f}x",
                f"{100 * r['test_top1_diff_vs_sklearn']:+.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    for r in [*rows, *equal]:
        if "seconds_vs_whole_batch" in r:
            kind = "equal loss" if "iteration_cap" in r else "default tolerance"
            lines.append(
                f"\n{r['size']} {kind}: streamed {r['seconds']:.2f}s = "
                f"{r['seconds_vs_whole_batch']:.2f}x the whole-batch ours_precond "
                "(same data, same settings)."
            )
    text = "\n".join(lines)
    if streamed:
        s = streamed
        mb = 2**20
        text += (
            f"\n\nStreamed ({s['size']}, {s['feature_bytes'] / mb:.0f} MB = "
            f"{s['feature_bytes'] / s['budget_bytes']:.1f}x the "
            f"{s['budget_bytes'] / mb:.0f} MB budget, {s['shards']} shards): "
            f"{s['seconds']:.2f}s, {s['iterations']} iterations, "
            f"{s['function_evaluations']} passes, peak RSS "
            f"+{s['peak_rss_above_baseline_bytes'] / mb:.0f} MB (private "
            f"+{s['peak_private_above_baseline_bytes'] / mb:.0f} MB); loss "
            f"{s['loss']:.7f} vs whole-batch {s['whole_batch_loss']:.7f} (rel. diff "
            f"{s['loss_rel_diff_vs_whole_batch']:+.1e}; whole-batch in memory "
            f"{s['whole_batch_seconds']:.2f}s)."
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; prints the table; returns 0."""
    args = _parser().parse_args(argv)
    if args._stream_child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(_stream_child(args)))
        return 0
    if args._path_child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(probe_path.child(args)))
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        rows, equal = [], []
        if args.solvers:  # `--solvers` with no name: only the streamed run
            for n, d in args.sizes:
                size_rows, size_equal = _size_rows(args, cache_dir, n, d)
                rows += size_rows
                equal += size_equal
        streamed = _streamed_row(args, cache_dir) if args.stream_budget_mb > 0 else None
        path = probe_path.path_row(args, cache_dir) if args.path_size else None
    result = {
        "settings": {
            "sizes": [f"{n}x{d}" for n, d in args.sizes],
            "classes": args.classes,
            "data": args.data,
            "spread": args.spread,
            "l2": args.l2,
            "tolerance": args.tolerance,
            "repeats": args.repeats,
            "equal_loss_rtol": args.equal_loss_rtol,
            "cpu_count": os.cpu_count(),
            "path_size": args.path_size and "{}x{}".format(*args.path_size),
            "path_classes": args.path_classes,
            "sklearn_budget_s": args.sklearn_budget_s,
        },
        "machine": machine_lib.machine_info(),
        "rows": rows,
        "equal_loss": equal,
        "streamed": streamed,
        "path": path,
    }
    print(_table(rows, equal, streamed, args))
    if path is not None:
        print("\n" + probe_path.table(path))
    if args.output:
        files.write_atomic(args.output, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
