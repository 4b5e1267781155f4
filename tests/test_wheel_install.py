"""The package as a user installs it: wheel and sdist, outside the source tree.

One module-scoped build (``python -m build``: the sdist, then the wheel built
*from* that sdist, so a file missing from the sdist fails here too) and one
fresh virtual environment with the wheel installed: with
``REVISIT_TF_SLOW_TESTS=1`` at the *floors* of ``install_requires``
(``constraints-floors.txt``, so the ranges' floors are tested; the rest of
the suite runs the exact pins of ``constraints.txt``), by default on the
test environment's pinned dependencies (``env``).
From a directory outside the source tree that environment runs a smoke
train -> export -> probe from the shipped ``imagenet/rotation.gin`` with
``smoke.gin`` on mock ImageNet (``tests/wheel_smoke.py``). ``pip install
--target`` and ``pip install --user`` installs must find every gin file too.

The expected gin files are listed independently of the package: every
``*.gin`` under the repository's ``gin/``.

Needs the package registry (PyPI) for the build backend and the floors, as
``tools/setup_env.sh`` does; about two minutes.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW = os.environ.get("REVISIT_TF_SLOW_TESTS") == "1"
# smoke.gin's export_model.parity_consumers.
SMOKE_CONSUMERS = ("saved_model", "graph_session")
FLOORS = os.path.join(REPO, "constraints-floors.txt")
SOURCE_GIN = sorted(
    os.path.relpath(p, os.path.join(REPO, "gin"))
    for p in glob.glob(os.path.join(REPO, "gin", "**", "*.gin"), recursive=True)
)


def _run(args, *, cwd, env=None, timeout=900):
    """Runs ``args``; returns stdout; fails the test with the output's tail."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        args,
        cwd=cwd,
        env={**base, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{args} exited {proc.returncode}:\n" + (proc.stdout[-4000:])
    )
    return proc.stdout


def _pip(python, *args, cwd, env=None):
    return _run(
        [python, "-m", "pip", "--disable-pip-version-check", *args], cwd=cwd, env=env
    )


def _gin_files_under(paths):
    """``revisit_tf/configs/<x>.gin`` archive members -> sorted ``<x>.gin``."""
    prefix = "revisit_tf/configs/"
    return sorted(
        p.split(prefix, 1)[1] for p in paths if prefix in p and p.endswith(".gin")
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """``(wheel, sdist)`` built from the repository."""
    out = tmp_path_factory.mktemp("dist")
    work = tmp_path_factory.mktemp("src")
    # Build from a copy: the build writes egg-info and build/ next to setup.cfg.
    src = os.path.join(work, "revisit_tf_src")
    shutil.copytree(
        REPO,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__"
        ),
    )
    _run([sys.executable, "-m", "build", "--outdir", str(out), src], cwd=str(work))
    (wheel,) = glob.glob(os.path.join(out, "*.whl"))
    (sdist,) = glob.glob(os.path.join(out, "*.tar.gz"))
    return wheel, sdist


@pytest.fixture(scope="module")
def env(dist, tmp_path_factory):
    """A fresh venv with the wheel installed.

    With ``REVISIT_TF_SLOW_TESTS=1`` its dependencies are installed at the
    floors of ``install_requires`` (downloads; about 80 s). By default the
    wheel alone is installed (``--no-deps``) and the test environment's own
    site-packages (the pinned dependencies) is appended to the venv's path
    by a ``.pth`` file, after the wheel's: the smoke chain still runs the
    wheel's code and gin files from outside the source tree.
    """
    root = tmp_path_factory.mktemp("env")
    venv = os.path.join(root, "venv")
    _run([sys.executable, "-m", "venv", venv], cwd=str(root))
    python = os.path.join(venv, "bin", "python")
    if SLOW:
        _pip(python, "install", "-q", dist[0], "-c", FLOORS, cwd=str(root))
        return python
    _pip(python, "install", "-q", "--no-deps", dist[0], cwd=str(root))
    site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=str(root),
    ).strip()
    with open(os.path.join(site, "zz_test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_source_tree_gin_files_are_the_shipped_ones():
    from revisit_tf import resources

    assert len(SOURCE_GIN) >= 90
    assert resources.shipped_gin_files() == SOURCE_GIN
    assert os.path.realpath(resources.gin_dir()) == os.path.realpath(
        os.path.join(REPO, "gin")
    )


def test_wheel_and_sdist_hold_every_gin_file(dist):
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as z:
        assert _gin_files_under(z.namelist()) == SOURCE_GIN
    with tarfile.open(sdist) as t:
        assert _gin_files_under(t.getnames()) == SOURCE_GIN


@pytest.mark.skipif(
    not SLOW,
    reason="REVISIT_TF_SLOW_TESTS=1: the floors environment downloads and "
    "installs the dependencies (80 s); by default the wheel runs on the pins",
)
def test_floors_are_what_the_environment_got(env):
    """The fresh environment runs exactly the floors of install_requires."""
    floors = {}
    with open(FLOORS) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, version = line.split("==")
                floors[name.lower().replace("_", "-")] = version
    listed = json.loads(_pip(env, "list", "--format", "json", cwd=os.path.dirname(env)))
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in listed}
    assert {k: installed.get(k) for k in floors} == floors
    # Every floor is a requirement of the package, and each requirement's floor.
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    required = {}
    for line in cfg["options"]["install_requires"].split("\n"):
        if line.strip():
            name, spec = line.split(">=")
            required[name.strip().lower()] = spec.split(",")[0]
    assert set(required) == set(floors)
    for name, floor in required.items():
        assert floors[name].startswith(floor), (name, floor, floors[name])


def test_wheel_install_runs_a_smoke_chain_outside_the_source_tree(env, tmp_path):
    script = str(tmp_path / "wheel_smoke.py")
    shutil.copy(os.path.join(REPO, "tests", "wheel_smoke.py"), script)
    consumers = "all" if SLOW else "smoke"
    out = _run([env, script, str(tmp_path / "w"), consumers], cwd=str(tmp_path))
    (line,) = [x for x in out.splitlines() if x.startswith("WHEEL_SMOKE ")]
    summary = json.loads(line.split(" ", 1)[1])
    site = os.path.dirname(os.path.dirname(env))  # the venv
    assert summary["revisit_tf"].startswith(site), summary
    assert summary["gin_dir"].startswith(site), summary
    assert summary["codes"] == {"train": 0, "export": 0, "probe": 0}, out[-4000:]
    if SLOW:
        expected = ("saved_model", "graph_session", "tfsm_layer", "hub_keras_layer")
        expected += ("tflite",)
    else:
        expected = SMOKE_CONSUMERS
    assert summary["parity"] == dict.fromkeys(expected, "passed")
    assert [r["endpoint"] for r in summary["rows"]] == ["pre_logits"]
    assert 0.0 <= summary["rows"][0]["test_top1"] <= 1.0
    # The console scripts are installed (one TensorFlow start each, so with
    # REVISIT_TF_SLOW_TESTS=1 all of them answer --help, by default one).
    bin_dir = os.path.dirname(env)
    names = ("train", "export", "probe", "report", "study", "benchmark")
    for name in names:
        script = os.path.join(bin_dir, f"revisit-{name}")
        assert os.access(script, os.X_OK), script
        with open(script) as f:
            assert "revisit_tf." in f.read(), script
    for name in names if SLOW else ("study",):
        help_text = _run(
            [os.path.join(bin_dir, f"revisit-{name}"), "--help"], cwd=str(tmp_path)
        )
        assert "usage:" in help_text


def test_target_install_finds_every_gin_file(dist, env, tmp_path):
    target = str(tmp_path / "target")
    _pip(
        env,
        "install",
        "-q",
        "--no-deps",
        "--target",
        target,
        dist[0],
        cwd=str(tmp_path),
    )
    code = (
        "import json, revisit_tf; from revisit_tf import resources, cli; "
        "cli.parse_gin(['imagenet/rotation.gin', 'table1/jigsaw_vgg19_w8.gin', "
        "'smoke.gin'], []); "
        "print(json.dumps([revisit_tf.__file__, resources.gin_dir(), "
        "resources.shipped_gin_files()]))"
    )
    out = _run([env, "-c", code], cwd=str(tmp_path), env={"PYTHONPATH": target})
    module, gin_dir, shipped = json.loads(out.strip().splitlines()[-1])
    assert module.startswith(target) and gin_dir.startswith(target)
    assert shipped == SOURCE_GIN


def test_user_install_finds_every_gin_file(dist, tmp_path):
    # User site-packages are visible only in a venv with system site packages.
    venv = str(tmp_path / "user_venv")
    _run(
        [sys.executable, "-m", "venv", "--system-site-packages", venv],
        cwd=str(tmp_path),
    )
    python = os.path.join(venv, "bin", "python")
    user = {"PYTHONUSERBASE": str(tmp_path / "userbase")}
    _pip(python, "install", "-q", "--no-deps", "--user", dist[0], cwd=venv, env=user)
    code = (
        "import json, revisit_tf; from revisit_tf import resources; "
        "print(json.dumps([revisit_tf.__file__, resources.shipped_gin_files()]))"
    )
    out = _run([python, "-c", code], cwd=str(tmp_path), env=user)
    module, shipped = json.loads(out.strip().splitlines()[-1])
    assert module.startswith(str(tmp_path / "userbase")), module
    assert shipped == SOURCE_GIN
