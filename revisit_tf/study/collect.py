"""Study directory -> one record per probe result (the report's input).

Each current probe job's ``status.json`` names the lines of its cell's
``probe/results.jsonl`` that it wrote (``results_lines``), so only rows of the
spec's current jobs are read: rows an older spec (or a killed, rerun probe)
left in the same file are counted and reported, never mixed in.

Record fields: ``cell``, ``levels`` (axis -> level or None), ``baseline``,
``grids``, ``probe``, ``endpoint``, ``protocol``, ``subset``,
``fingerprint``, ``test_top1``, ``val_top1``, ``n_test``, ``test_correct``
(bool ``[n_test]`` or None), ``test_set`` (dataset, test split, pp and the
labels' digest: records with equal ids were scored on the same images),
``curve`` (SGD/MLP per-epoch list or None), ``pretext_metrics`` (the cell's
``train_metrics.json``, with ``top1`` = the pretext task's accuracy when it
has one; {} for baselines).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from revisit_tf.report import results as results_lib
from revisit_tf.study import spec as spec_lib
from revisit_tf.study import state


def _decode_correct(row: Mapping[str, Any]):
    encoded = row.get("test_predictions")
    if not encoded:
        return None
    from revisit_tf.probe import predictions  # NumPy only

    return predictions.decode_predictions(encoded)[1]


def _test_set(row: Mapping[str, Any]) -> str | None:
    """Which test images, in which order: dataset, split, pp, labels' digest.

    Rows of different protocols (L-BFGS vs MLP) have different fingerprints
    but may be paired when this id is equal.
    """
    spec = row.get("protocol_spec") or {}
    encoded = row.get("test_predictions") or {}
    if not spec or "labels_sha256" not in encoded:
        return None
    return ":".join(
        str(x)
        for x in (
            spec.get("dataset"),
            (spec.get("splits") or {}).get("test"),
            spec.get("pp"),
            encoded["labels_sha256"],
        )
    )


def collect(
    study_dir: str, spec: spec_lib.Spec, jobs: Sequence[spec_lib.Job]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of every finished probe job, and notes on what is missing.

    Returns:
      ``(records, notes)``; notes name probe jobs without results (failed,
      blocked, not run, run under another config) and rows left out.
    """
    cells = spec_lib.cell_index(spec)
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    claimed: dict[str, set[int]] = {}
    missing: dict[str, list[str]] = {}
    for job in jobs:
        if job.kind != "probe":
            continue
        status = state.read_status(study_dir, job.id) or {}
        st = status.get("state", "not run")
        if status and status.get("fingerprint") != job.fingerprint:
            st = "run under an older config"
        if st != "done" or "results_lines" not in status:
            missing.setdefault(st, []).append(job.id)
            continue
        workdir = state.cell_dir(study_dir, job.cell)
        path = results_lib.results_path(workdir)
        rows = results_lib.read_results([path])
        lo, hi = status["results_lines"]
        claimed.setdefault(path, set()).update(range(lo, hi))
        cell = cells[job.cell]
        metrics_path = os.path.join(workdir, "train_metrics.json")
        pretext_metrics = {}
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                pretext_metrics = json.load(f)
            # The pretext task's own accuracy (accuracy_metrics' "accuracy";
            # tasks without one, e.g. inpainting, have none).
            if "accuracy" in pretext_metrics:
                pretext_metrics["top1"] = pretext_metrics["accuracy"]
        for row in rows[lo:hi]:
            records.append(
                {
                    "cell": job.cell,
                    "levels": dict(cell.levels),
                    "baseline": cell.baseline,
                    "grids": list(cell.grids),
                    "probe": job.probe,
                    "endpoint": row["endpoint"],
                    "protocol": row.get("protocol", "lbfgs"),
                    "subset": float(row.get("subset", 1.0)),
                    "fingerprint": row.get("fingerprint"),
                    "test_top1": row["test_top1"],
                    "val_top1": row.get("val_top1"),
                    "n_test": row.get("n_test"),
                    "test_correct": _decode_correct(row),
                    "test_set": _test_set(row),
                    "curve": row.get("lr_curve"),
                    "pretext_metrics": pretext_metrics,
                }
            )
    for st, ids in sorted(missing.items()):
        shown = ", ".join(ids[:5]) + (
            f" and {len(ids) - 5} more" if len(ids) > 5 else ""
        )
        notes.append(f"{len(ids)} probe job(s) without results ({st}): {shown}.")
    for path, lines in sorted(claimed.items()):
        total = len(results_lib.read_results([path]))
        extra = total - len(lines)
        if extra > 0:
            notes.append(
                f"{extra} row(s) of {os.path.relpath(path, study_dir)} were left out: "
                "written by an earlier spec's jobs or by a probe run that was "
                "interrupted and rerun."
            )
    return records, notes
