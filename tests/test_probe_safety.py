"""Issue 12/13 ("nothing lost, ever") for the probe stage.

* feature-cache manifests are validated structurally and against the shard
  files' own ``.npy`` headers, and rebuilt when wrong;
* a full disk while caching gives a named error, leaves no partial file and
  loses nothing already cached;
* ``hash_directory`` hashes regular files only and refuses links out of the
  directory or to devices/fifos (it never reads ``/dev/zero``);
* L-BFGS reports ``converged`` only when the gradient test holds at the
  returned point (every solver path), and warns about badly scaled features.
"""

import errno
import hashlib
import json
import logging
import os
import resource
import signal

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf import faults, files
from revisit_tf.probe import cache as cache_lib
from revisit_tf.probe import lbfgs, sharded

SPEC = {"model": "abc", "endpoint": "pre_logits", "split": "train", "pp": "x"}


def _data(n=300, d=50, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 7, size=n)


def _batches(x, y, size=40):
    def build():
        for start in range(0, len(y), size):
            yield {"pre_logits": x[start : start + size]}, y[start : start + size]

    return build


def _read(*parts):
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


class _Counting:
    def __init__(self, build):
        self.build, self.calls = build, 0

    def __call__(self):
        self.calls += 1
        return self.build()


def _entry(tmp_path, x, y, spec=SPEC, shard_bytes=4096):
    cache = cache_lib.FeatureCache(tmp_path, shard_bytes=shard_bytes)
    return cache, cache.get_or_build({"pre_logits": spec}, _batches(x, y))["pre_logits"]


def _edit_manifest(entry, edit):
    path = os.path.join(entry.path, cache_lib.MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    manifest = edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


# ---------------------------------------------------------------------------
# Item 8: manifests validated structurally, and against the shards' rows.


def _set(path, value):
    def edit(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return m

    return edit


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda m: [m], "JSON object"),
        (lambda m: {k: v for k, v in m.items() if k != "shards"}, "shards"),
        (_set(["shards"], {"shard-00000.npy": {}}), "shards"),
        (_set(["shards", 0], {"name": "shard-00000.npy"}), "shards"),
        (_set(["shards", 0, 1], "20 rows"), "shards"),
        (_set(["shards", 0, 0], "../../etc/passwd"), "shard-00000.npy"),
        (_set(["num_examples"], "300"), "num_examples"),
        (_set(["dim"], None), "dim"),
        (_set(["labels"], {"bytes": 1}), "labels"),
        (_set(["labels", "crc32"], -1), "crc32"),
        (_set(["shards"], []), "shards"),
    ],
)
def test_structurally_wrong_manifest_is_rebuilt_not_a_crash(
    tmp_path, caplog, edit, what
):
    x, y = _data()
    cache, entry = _entry(tmp_path, x, y)
    _edit_manifest(entry, edit)
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(SPEC) is None
    assert entry.path in caplog.text and what in caplog.text
    build = _Counting(_batches(x, y))
    rebuilt = cache.get_or_build({"pre_logits": SPEC}, build)["pre_logits"]
    assert build.calls == 1
    got_x, got_y = rebuilt.load()
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)


def test_wrong_row_count_is_detected_from_the_shard_headers(tmp_path, caplog):
    """Rows moved between shards: totals agree, so only the files can tell."""
    x, y = _data()
    cache, entry = _entry(tmp_path, x, y)  # 20 rows per shard
    assert entry.shard_rows[:2] == [20, 20]

    def shift(m):
        m["shards"][0][1]["rows"] = 21
        m["shards"][1][1]["rows"] = 19
        return m

    _edit_manifest(entry, shift)
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(SPEC) is None
    assert "shard-00000.npy" in caplog.text and "rows" in caplog.text
    assert entry.path in caplog.text
    # Rebuilt; the streamed path (shard by shard, labels sliced by rows)
    # pairs every row with its own label again.
    rebuilt = cache.get_or_build({"pre_logits": SPEC}, _batches(x, y))["pre_logits"]
    source = sharded.ShardSource.from_cache(rebuilt)
    xs, ys = zip(*source.iter_shards(), strict=True)
    np.testing.assert_array_equal(np.concatenate(xs), x)
    np.testing.assert_array_equal(np.concatenate(ys), y)


@pytest.mark.parametrize(
    "edit",
    [
        _set(["num_examples"], 301),  # labels.npy holds 300
        _set(["dim"], 49),  # the shards hold 50 columns
    ],
    ids=["num_examples", "dim"],
)
def test_counts_disagreeing_with_the_files_are_detected(tmp_path, caplog, edit):
    x, y = _data()
    cache, entry = _entry(tmp_path, x, y)
    _edit_manifest(entry, edit)
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(SPEC) is None
    assert entry.path in caplog.text


def test_shard_bytes_are_those_numpy_writes(tmp_path):
    """The streamed writer's files are byte-identical to ``np.save``'s."""
    x, y = _data()
    _, entry = _entry(tmp_path, x, y)
    reference = tmp_path / "ref.npy"
    np.save(reference, x[:20], allow_pickle=False)
    with open(os.path.join(entry.path, "shard-00000.npy"), "rb") as f:
        assert f.read() == reference.read_bytes()
    np.save(reference, y.astype(np.int32), allow_pickle=False)
    with open(os.path.join(entry.path, cache_lib.LABELS), "rb") as f:
        assert f.read() == reference.read_bytes()


# ---------------------------------------------------------------------------
# Item 12: a full disk while caching.


@pytest.fixture
def file_size_limit():
    """Sets RLIMIT_FSIZE (SIGXFSZ ignored): writes past it fail as on a full disk.

    numpy's ``tofile`` then reports its short write ("N requested and M
    written") and ``os.write`` raises EFBIG, the two ways a full disk shows.
    """
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def set_limit(nbytes):
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))

    try:
        yield set_limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_full_disk_gives_a_named_error_and_loses_nothing(tmp_path, file_size_limit):
    x, y = _data(n=2000, d=64)
    cache = cache_lib.FeatureCache(tmp_path, shard_bytes=256 << 10)  # 1024 rows
    kept = cache.get_or_build({"pre_logits": SPEC}, _batches(x, y, 500))["pre_logits"]
    before = sorted(os.listdir(tmp_path))
    kept_files = {n: _read(kept.path, n) for n in os.listdir(kept.path)}
    other = {**SPEC, "split": "test"}
    file_size_limit(100_000)  # every 256 KiB shard write runs out of space
    with pytest.raises(cache_lib.CacheWriteError) as info:
        cache.get_or_build({"pre_logits": other}, _batches(x, y, 500))
    file_size_limit(resource.RLIM_INFINITY)
    message = str(info.value)
    assert "disk is full" in message
    assert "shard-00000.npy" in message and str(tmp_path) in message
    assert str(1024 * 64 * 4 + 128) in message  # the bytes of that shard file
    # No partial directory or temporary file is left, the old entry is intact.
    assert sorted(os.listdir(tmp_path)) == sorted(
        before + [cache_lib.spec_key(other) + ".lock"]
    )
    assert {n: _read(kept.path, n) for n in os.listdir(kept.path)} == kept_files
    build = _Counting(_batches(x, y))
    again = cache.get_or_build({"pre_logits": SPEC}, build, verify=True)
    assert build.calls == 0
    got_x, got_y = again["pre_logits"].load()
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)


def test_full_disk_while_writing_the_manifest(tmp_path, monkeypatch):
    x, y = _data()
    cache = cache_lib.FeatureCache(tmp_path, shard_bytes=4096)

    def full(path, data, *, fsync=True):
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))

    monkeypatch.setattr(files, "write_atomic", full)
    with pytest.raises(cache_lib.CacheWriteError, match="disk is full") as info:
        cache.get_or_build({"pre_logits": SPEC}, _batches(x, y))
    assert cache_lib.MANIFEST in str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == [cache_lib.spec_key(SPEC) + ".lock"]


def test_commit_fault_points_in_order_and_temp_names_unpredictable(tmp_path):
    x, y = _data()
    hits, names = [], []

    def hook(name):
        hits.append(name)
        if name == "cache.shards_written":
            partial = [n for n in os.listdir(tmp_path) if ".partial-" in n]
            names.extend(partial)
            assert cache_lib.MANIFEST not in os.listdir(tmp_path / partial[0])

    faults.install(hook)
    try:
        _entry(tmp_path, x, y)
    finally:
        faults.install(None)
    cache_points = [h for h in hits if h.startswith("cache.")]
    assert cache_points == [
        "cache.shards_written",
        "cache.manifest_written",
        "cache.entry_committed",
    ]
    # The partial directory's name is not just the key and the pid.
    key = cache_lib.spec_key(SPEC)
    (partial,) = names
    suffix = partial[len(f"{key}.partial-{os.getpid()}-") :]
    assert len(suffix) >= 16


def test_empty_split_error_names_the_dataset_and_split(tmp_path):
    cache = cache_lib.FeatureCache(tmp_path)
    spec = {**SPEC, "dataset": "fashion_mnist_idx", "split": "train[5:5]"}
    with pytest.raises(ValueError, match=r"fashion_mnist_idx.*'train\[5:5\]'.*empty"):
        cache.get_or_build({"pre_logits": spec}, lambda: iter(()))


# ---------------------------------------------------------------------------
# Item 13: hash_directory reads regular files inside the directory only.


def _export(tmp_path):
    root = tmp_path / "export"
    (root / "variables").mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(b"graph")
    (root / "variables" / "v.data").write_bytes(b"\x01" * 100)
    return root


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda root: os.symlink("/dev/zero", root / "variables" / "z"), "/dev/zero"),
        (lambda root: os.mkfifo(root / "fifo"), "fifo"),
        (lambda root: os.symlink(root.parent / "outside", root / "o"), "outside"),
        (lambda root: os.symlink(root / "variables", root / "vars"), "directory"),
    ],
    ids=["dev_zero", "fifo", "outside", "dir_link"],
)
def test_hash_directory_refuses_links_out_and_non_regular_files(
    tmp_path, alarm, make, what
):
    root = _export(tmp_path)
    (tmp_path / "outside").write_bytes(b"secret")
    make(root)
    with pytest.raises(cache_lib.UnsafeFileError, match=what) as info:
        cache_lib.hash_directory(root)
    assert str(root) in str(info.value)


@pytest.fixture
def alarm():
    """Fails a test that blocks (a fifo opened, /dev/zero read) instead of hanging."""

    def expire(signum, frame):
        raise TimeoutError("blocked for 20 s: read a fifo or a device?")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_hash_directory_follows_links_to_regular_files_inside(tmp_path):
    root = _export(tmp_path)
    plain = cache_lib.hash_directory(root)
    # The digest of a directory without links is the documented one.
    digest = hashlib.sha256()
    for rel, content in [("saved_model.pb", b"graph"), ("variables/v.data", None)]:
        digest.update(rel.encode() + b"\0")
        digest.update(content or (root / rel).read_bytes())
        digest.update(b"\0")
    assert plain == digest.hexdigest()
    os.symlink("variables/v.data", root / "alias")
    assert cache_lib.hash_directory(root) != plain  # the link is part of it


def test_hash_directory_does_not_skip_unreadable_subdirectories(tmp_path, monkeypatch):
    root = _export(tmp_path)
    scandir = os.scandir

    def unreadable(path="."):
        if os.path.basename(os.fspath(path)) == "variables":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unreadable)  # what os.walk lists with
    with pytest.raises(PermissionError, match="variables"):
        cache_lib.hash_directory(root)


def test_cache_never_reads_a_shard_replaced_by_a_device(tmp_path):
    x, y = _data()
    cache, entry = _entry(tmp_path, x, y)
    shard = os.path.join(entry.path, "shard-00002.npy")
    os.remove(shard)
    os.symlink("/dev/zero", shard)
    assert cache.lookup(SPEC) is None
    with pytest.raises(cache_lib.CacheError, match="regular file"):
        cache_lib.CachedFeatures(entry.path, SPEC)


# ---------------------------------------------------------------------------
# Item 9: convergence is reported only when the gradient test holds.


def _numpy_gradient_max(x, y, weights, bias, l2):
    """sup |dJ/d[W; b]| in float64 NumPy, independent of the solver."""
    x = x.astype(np.float64)
    z = x @ weights.astype(np.float64) + bias
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    r = (p - np.eye(weights.shape[1])[y]) / len(y)
    return max(np.abs(x.T @ r + l2 * weights).max(), np.abs(r.sum(axis=0)).max())


def _badly_scaled(scale=1e12):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    return x * scale + scale, y


_TOL = 1e-6


@pytest.mark.parametrize(
    "solver, precondition",
    [("lbfgs", False), ("lbfgs", True), ("tfp", False)],
    ids=["lbfgs", "lbfgs_preconditioned", "tfp"],
)
@pytest.mark.parametrize("scale", [1e9, 1e12])
def test_whole_batch_converged_only_if_gradient_test_holds(
    caplog, solver, precondition, scale
):
    x, y = _badly_scaled(scale)
    with caplog.at_level(logging.WARNING):
        fit = lbfgs.fit_logistic_regression(
            x, y, l2=1e-3, solver=solver, precondition=precondition, tolerance=_TOL
        )
    sup = _numpy_gradient_max(x, y, fit.weights, fit.bias, 1e-3)
    assert fit.gradient_max == pytest.approx(sup, rel=1e-5)
    assert fit.converged == (sup <= _TOL)
    if not fit.converged:
        assert "badly scaled" in caplog.text and "standardiz" in caplog.text
    assert not (fit.converged and fit.failed)


def test_sharded_converged_only_if_gradient_test_holds(caplog):
    x, y = _badly_scaled(1e9)
    source = sharded.ShardSource.from_arrays(x.astype(np.float32), y, rows_per_shard=64)
    objective = sharded.ShardedObjective(source, num_classes=3, l2=1e-3)
    with caplog.at_level(logging.WARNING):
        fit = sharded.fit_sharded(objective, tolerance=_TOL)
    sup = _numpy_gradient_max(x.astype(np.float32), y, fit.weights, fit.bias, 1e-3)
    assert fit.gradient_max == pytest.approx(sup, rel=1e-3)
    assert fit.converged == (sup <= _TOL)
    assert not fit.converged
    assert "badly scaled" in caplog.text


def test_non_finite_objective_is_never_converged():
    # Finite features whose logits overflow after the first step.
    x, y = _badly_scaled(1e200)
    for solver in lbfgs.SOLVERS:
        fit = lbfgs.fit_logistic_regression(x, y, l2=1e-3, solver=solver)
        finite = np.isfinite(fit.loss) and np.isfinite(fit.gradient_max)
        assert not fit.converged or (finite and fit.gradient_max <= 1e-6)


def test_healthy_fits_still_converge_with_the_same_numbers():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(400, 6))
    y = np.argmax(x[:, :3] + 0.3 * rng.normal(size=(400, 3)), axis=1)
    for solver, precondition in [("lbfgs", False), ("lbfgs", True), ("tfp", False)]:
        fit = lbfgs.fit_logistic_regression(
            x, y, l2=1e-3, solver=solver, precondition=precondition, tolerance=1e-8
        )
        sup = _numpy_gradient_max(x, y, fit.weights, fit.bias, 1e-3)
        assert fit.converged and not fit.failed and sup <= 1e-8
    fit32 = lbfgs.fit_logistic_regression(
        x.astype(np.float32), y, l2=1e-3, dtype=tf.float32, tolerance=1e-4
    )
    assert fit32.converged == (fit32.gradient_max <= 1e-4)
