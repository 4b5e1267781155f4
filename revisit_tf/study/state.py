"""The on-disk state of a study directory (no TensorFlow).

Layout::

    STUDY/study.json              the expanded spec: cells, jobs, fingerprints
    STUDY/spec.gin                the spec as parsed (gin.config_str)
    STUDY/study.log               the runner's progress log
    STUDY/.lock                   held (flock) by the one runner of this study
    STUDY/jobs/<job id>/job.json      what to run (written before launch)
    STUDY/jobs/<job id>/status.json   running | done | failed | blocked | interrupted
    STUDY/jobs/<job id>/job.log       the job's stdout and stderr
    STUDY/cells/<cell id>/        the cell's workdir (config.gin, checkpoints,
                                  export/, probe/results.jsonl, logs)

Job and cell ids contain ``/`` (``rotation/resnet50_v1/1/0/train``), so the
directories nest. Every file is written whole through ``files.write_atomic``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from revisit_tf import files

FINAL_STATES = ("done", "failed", "blocked", "interrupted")


def job_dir(study_dir: str, job_id: str) -> str:
    return os.path.join(study_dir, "jobs", job_id)


def cell_dir(study_dir: str, cell_id: str) -> str:
    return os.path.join(study_dir, "cells", cell_id)


def log_path(study_dir: str, job_id: str) -> str:
    return os.path.join(job_dir(study_dir, job_id), "job.log")


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); it was written atomically, so the "
            "file was edited or the disk is damaged. Move it aside to rerun "
            "the job."
        ) from e


def write_job(study_dir: str, job: dict[str, Any]) -> None:
    os.makedirs(job_dir(study_dir, job["id"]), exist_ok=True)
    files.write_atomic(
        os.path.join(job_dir(study_dir, job["id"]), "job.json"),
        json.dumps(job, indent=1, sort_keys=True),
    )


def read_job(study_dir: str, job_id: str) -> dict[str, Any]:
    job = _read_json(os.path.join(job_dir(study_dir, job_id), "job.json"))
    if job is None:
        raise FileNotFoundError(f"no job.json for job {job_id!r} in {study_dir}.")
    return job


def write_status(study_dir: str, job_id: str, **status: Any) -> None:
    os.makedirs(job_dir(study_dir, job_id), exist_ok=True)
    files.write_atomic(
        os.path.join(job_dir(study_dir, job_id), "status.json"),
        json.dumps({"id": job_id, **status}, indent=1, sort_keys=True),
    )


def read_status(study_dir: str, job_id: str) -> dict[str, Any] | None:
    return _read_json(os.path.join(job_dir(study_dir, job_id), "status.json"))


def outputs_exist(study_dir: str, job: dict[str, Any]) -> bool:
    """Whether the files a finished job of this kind leaves are there."""
    workdir = cell_dir(study_dir, job["cell"])
    if job["kind"] == "train":
        # A preempted run writes it too, with "complete": false.
        metrics = _read_json(os.path.join(workdir, "train_metrics.json"))
        return isinstance(metrics, dict) and metrics.get("complete", True) is True
    if job["kind"] == "export":
        return os.path.exists(os.path.join(workdir, "export", "saved_model.pb"))
    return os.path.exists(os.path.join(workdir, "probe", "results.jsonl"))


def write_json(path: str, value: Any) -> None:
    files.write_atomic(path, json.dumps(value, indent=1, sort_keys=True))


def read_json(path: str) -> Any:
    return _read_json(path)
