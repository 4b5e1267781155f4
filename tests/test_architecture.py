"""The architecture rules that a grep can check (style guide 4.1, 4.2)."""

import glob
import os
import re

ROOT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "revisit_tf"
)
EDGES = {"configurables.py", "cli.py"}  # the only modules allowed to see gin/env
# Process edges of the study stage: the local executor hands its environment
# (plus thread caps) to the worker subprocesses it starts, and the slurm
# module's task entry point derives TF_CONFIG from SLURM's variables inside
# each sbatch task. Neither reads configuration from the environment.
PROCESS_EDGES = {"study/executors.py", "study/slurm.py"}


def _library_files():
    for path in sorted(glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)):
        with open(path) as f:
            yield os.path.relpath(path, ROOT), f.read()


def test_stage_folders_exist_in_data_flow_order():
    for stage in (
        "data",
        "pp",
        "models",
        "train",
        "export",
        "probe",
        "report",
        "study",
    ):
        init = os.path.join(ROOT, stage, "__init__.py")
        assert os.path.exists(init), stage
        with open(init) as f:
            text = f.read()
        assert text.startswith('"""'), f"{stage} needs a contract docstring"


def test_gin_only_at_the_edges():
    offenders = [
        name
        for name, text in _library_files()
        if re.search(r"^\s*(import gin|from gin)", text, re.M) and name not in EDGES
    ]
    assert offenders == []
    assert not any("gin.tf" in text for _, text in _library_files())


def test_library_reads_no_environment_or_flags():
    offenders = [
        name
        for name, text in _library_files()
        if name not in EDGES
        and (
            re.search(r"absl\.flags|from absl import flags|FLAGS\.", text)
            or (name not in PROCESS_EDGES and re.search(r"os\.environ", text))
        )
    ]
    assert offenders == []


# The export's parity gate loads each export as hub.KerasLayer users do.
HUB_CONSUMER_CHECKS = {os.path.join("export", "consumers.py")}


def test_no_tf_keras_in_library():
    offenders = [
        name
        for name, text in _library_files()
        if re.search(r"tf\.keras|import tf_keras|tensorflow_hub", text)
        and not (
            name in HUB_CONSUMER_CHECKS and not re.search(r"tf\.keras|tf_keras", text)
        )
    ]
    assert offenders == []
