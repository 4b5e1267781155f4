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


STAGES = ("data", "pp", "models", "train", "export", "probe", "report", "study")
# data/pipeline.py derives per-example seeds with pp.rng (the one seed scheme
# both stages share); every other import goes down the data flow.
UPSTREAM_EXCEPTIONS = {("revisit_tf.data.pipeline", "revisit_tf.pp.rng")}


def _is_module(name: str) -> bool:
    path = os.path.join(os.path.dirname(ROOT), *name.split("."))
    return os.path.isdir(path) or os.path.exists(path + ".py")


def _module_name(relpath: str) -> str:
    name = "revisit_tf." + relpath[: -len(".py")].replace(os.sep, ".")
    return name.removesuffix(".__init__")


def _imports(relpath: str, text: str):
    """(imported module, underscored names used from it) of one module.

    Follows ``from revisit_tf.x import _y`` and ``alias._y`` where ``alias``
    is a ``revisit_tf`` module bound by an import (dunders are allowed)."""
    import ast

    tree = ast.parse(text, relpath)
    aliases: dict[str, str] = {}
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("revisit_tf"):
                    found.setdefault(a.name, set())
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "revisit_tf"
        ):
            for a in node.names:
                target = f"{node.module}.{a.name}"
                if _is_module(target):  # from revisit_tf.pp import rng
                    found.setdefault(target, set())
                    aliases[a.asname or a.name] = target
                    continue
                private = a.name.startswith("_") and not a.name.startswith("__")
                found.setdefault(node.module, set()).update([a.name] if private else [])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.setdefault(aliases[node.value.id], set()).add(node.attr)
    return found


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_no_module_imports_another_modules_underscored_names():
    offenders = []
    for relpath, text in _library_files():
        module = _module_name(relpath)
        for target, names in _imports(relpath, text).items():
            if names and target != module:
                offenders.append(f"{module} uses {target}: {sorted(names)}")
    assert offenders == []


def test_imports_follow_the_data_flow():
    """No stage imports a later one; in particular the probe stage does not
    import the training stage (the schedule lives in revisit_tf.schedules)."""
    offenders = []
    for relpath, text in _library_files():
        module = _module_name(relpath)
        source = _stage(module)
        for target in _imports(relpath, text):
            stage = _stage(target)
            if (
                source is None
                or stage is None
                or (module, target) in UPSTREAM_EXCEPTIONS
            ):
                continue
            if STAGES.index(stage) > STAGES.index(source):
                offenders.append(f"{module} -> {target}")
            if source == "probe" and stage == "train":
                offenders.append(f"{module} -> {target} (probe imports train)")
    assert offenders == []


def test_import_rules_can_fail(tmp_path):
    """The two rules above on a made-up module that breaks both."""
    text = (
        "from revisit_tf.probe import lbfgs\n"
        "from revisit_tf.train import optim\n"
        "x = lbfgs._check_features\n"
    )
    found = _imports(os.path.join("probe", "bad.py"), text)
    assert found["revisit_tf.probe.lbfgs"] == {"_check_features"}
    assert _stage("revisit_tf.train.optim") == "train"
    assert _stage(_module_name(os.path.join("probe", "bad.py"))) == "probe"
