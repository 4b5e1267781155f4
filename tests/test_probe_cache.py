"""Tests for revisit_tf.probe.cache: sharded feature cache, crash safety."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from revisit_tf.probe import cache as cache_lib

SPEC = {"model": "abc", "endpoint": "pre_logits", "split": "train", "pp": "x"}


def _batches(x, y, size=40, crash_after=None):
    def build():
        for i, start in enumerate(range(0, len(y), size)):
            if crash_after is not None and i == crash_after:
                raise RuntimeError("simulated crash")
            yield (
                {
                    "pre_logits": x[start : start + size],
                    "other": x[start : start + size, :3],
                },
                y[start : start + size],
            )

    return build


def _data(n=300, d=50):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 7, size=n)


class _Counting:
    def __init__(self, build):
        self.build, self.calls = build, 0

    def __call__(self):
        self.calls += 1
        return self.build()


def test_round_trip_shards_and_reuse(tmp_path):
    x, y = _data()
    cache = cache_lib.FeatureCache(tmp_path, shard_bytes=4096)  # 20 rows/shard
    build = _Counting(_batches(x, y))
    entry = cache.get_or_build({"pre_logits": SPEC}, build)["pre_logits"]
    assert build.calls == 1
    assert (entry.num_examples, entry.dim, entry.num_shards) == (300, 50, 15)
    got_x, got_y = entry.load()
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    assert got_y.dtype == np.int32
    np.testing.assert_array_equal(
        np.concatenate([s for s, _ in entry.iter_shards()]), x
    )
    # Same spec: read back, not rebuilt; a different spec gets its own entry.
    again = cache.get_or_build({"pre_logits": dict(SPEC)}, build)["pre_logits"]
    assert build.calls == 1 and again.path == entry.path
    other = cache.get_or_build({"pre_logits": {**SPEC, "split": "val"}}, build)
    assert build.calls == 2 and other["pre_logits"].path != entry.path


def test_rereads_are_aligned_and_a_file_changed_in_use_stops_named(tmp_path):
    """After its first (CRC-checked) read a shard is read straight into a
    64-byte-aligned buffer, so a streamed probe shares it with TensorFlow;
    a file rewritten meanwhile with another header is refused, not loaded."""
    from revisit_tf.probe import arrays

    x, y = _data()
    cache = cache_lib.FeatureCache(tmp_path, shard_bytes=4096)
    entry = cache.get_or_build({"pre_logits": SPEC}, _batches(x, y))["pre_logits"]
    first, _ = entry.shard(3)
    for _ in range(2):
        again, labels = entry.shard(3)
        np.testing.assert_array_equal(again, x[60:80])
        np.testing.assert_array_equal(labels, y[60:80])
        assert again.ctypes.data % arrays.ALIGNMENT == 0 and again.flags.writeable
        assert again.ctypes.data != first.ctypes.data  # a fresh buffer per read
    # Same size, other header: a float64 array of half the rows.
    (name,) = [n for n in sorted(os.listdir(entry.path)) if "00003" in n]
    path = os.path.join(entry.path, name)
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        np.save(f, np.zeros((10, 50), np.float64))
    with open(path, "ab") as f:
        f.write(b"\0" * (size - os.path.getsize(path)))
    assert os.path.getsize(path) == size
    with pytest.raises(cache_lib.CacheError, match="holds float64"):
        entry.shard(3)


def test_mapped_shards_equal_reads_share_memory_and_a_changed_file_stops_named(
    tmp_path,
):
    """``mapped_shard`` maps each file once (its CRC-32 checked on the mapped
    bytes), returns the same rows as ``shard`` without a copy, and refuses a
    file that was rewritten in place, replaced or removed since it was mapped
    (reading a truncated mapping would be a SIGBUS, not an error)."""
    from revisit_tf.probe import arrays

    x, y = _data()
    cache = cache_lib.FeatureCache(tmp_path, shard_bytes=4096)
    entry = cache.get_or_build({"pre_logits": SPEC}, _batches(x, y))["pre_logits"]
    first, labels = entry.mapped_shard(3)
    np.testing.assert_array_equal(first, x[60:80])
    np.testing.assert_array_equal(labels, y[60:80])
    assert arrays.is_shareable(first)  # aligned, writeable (private), float32
    again, _ = entry.mapped_shard(3)
    assert again.ctypes.data == first.ctypes.data  # the same mapping, no copy
    mapped = np.concatenate([entry.mapped_shard(i)[0] for i in range(15)])
    np.testing.assert_array_equal(mapped, x)

    def path(index):
        return os.path.join(entry.path, f"shard-{index:05d}.npy")

    # A file corrupted before it is mapped (here by a fresh reader of the entry):
    # the CRC-32 of the mapped bytes.
    with open(path(5), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(cache_lib.CacheError, match="CRC-32 mismatch"):
        cache_lib.CachedFeatures(entry.path).mapped_shard(5)
    # Rewritten in place, same size and header: the mapping would change.
    entry.mapped_shard(4)
    with open(path(4), "rb") as f:
        content = f.read()
    time.sleep(0.01)
    with open(path(4), "r+b") as f:
        f.write(content)
    with pytest.raises(cache_lib.CacheError, match="replaced or modified"):
        entry.mapped_shard(4)
    # Replaced by another file (a rename), then removed.
    entry.mapped_shard(6)
    shutil.copyfile(path(6), path(6) + ".new")
    os.replace(path(6) + ".new", path(6))
    with pytest.raises(cache_lib.CacheError, match="replaced or modified"):
        entry.mapped_shard(6)
    os.remove(path(7))
    with pytest.raises(cache_lib.CacheError, match="missing"):
        entry.mapped_shard(7)
    with pytest.raises(IndexError):
        entry.mapped_shard(15)


def test_key_ignores_key_order_and_container_type():
    a = {"grid": (1, 2), "b": 1, "a": "x"}
    b = {"a": "x", "b": 1, "grid": [1, 2]}
    assert cache_lib.spec_key(a) == cache_lib.spec_key(b)
    assert cache_lib.spec_key(a) != cache_lib.spec_key({**a, "b": 2})


def test_exception_mid_write_leaves_nothing_and_next_call_rebuilds(tmp_path):
    x, y = _data()
    cache = cache_lib.FeatureCache(tmp_path, shard_bytes=4096)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.get_or_build({"pre_logits": SPEC}, _batches(x, y, crash_after=4))
    assert cache.lookup(SPEC) is None
    entry = cache.get_or_build({"pre_logits": SPEC}, _batches(x, y))["pre_logits"]
    np.testing.assert_array_equal(entry.load()[0], x)


def test_killed_process_mid_write_is_rebuilt(tmp_path):
    """A process killed (os._exit) while writing leaves a partial dir only."""
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from revisit_tf.probe import cache as cache_lib
        x = np.ones((300, 50), np.float32)
        def build():
            for i in range(0, 300, 40):
                if i >= 160:
                    os._exit(9)  # dies without cleanup, mid-write
                yield {{"pre_logits": x[i:i + 40]}}, np.zeros(40, int)
        cache_lib.FeatureCache({str(tmp_path)!r}, shard_bytes=4096).get_or_build(
            {{"pre_logits": {SPEC!r}}}, build)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    key = cache_lib.spec_key(SPEC)
    partial = [n for n in os.listdir(tmp_path) if n.startswith(key + ".partial-")]
    assert len(partial) == 1 and os.listdir(tmp_path / partial[0])  # shards written
    cache = cache_lib.FeatureCache(tmp_path, shard_bytes=4096)
    assert cache.lookup(SPEC) is None  # never used half-written

    x, y = _data()
    entry = cache.get_or_build({"pre_logits": SPEC}, _batches(x, y))["pre_logits"]
    np.testing.assert_array_equal(entry.load()[0], x)
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest", "spec"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, damage):
    x, y = _data()
    cache = cache_lib.FeatureCache(tmp_path, shard_bytes=4096)
    entry = cache.get_or_build({"pre_logits": SPEC}, _batches(x, y))["pre_logits"]
    shard = os.path.join(entry.path, "shard-00003.npy")
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 10)
    elif damage == "flip_byte":
        with open(shard, "r+b") as f:
            f.seek(-5, os.SEEK_END)
            byte = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "no_manifest":
        os.remove(os.path.join(entry.path, cache_lib.MANIFEST))
    else:  # a manifest written for another spec under this key
        path = os.path.join(entry.path, cache_lib.MANIFEST)
        with open(path) as f:
            text = f.read().replace('"split": "train"', '"split": "test"')
        with open(path, "w") as f:
            f.write(text)

    if damage == "flip_byte":  # same size: caught by the CRC when read
        with pytest.raises(cache_lib.CacheError, match="CRC-32 mismatch"):
            cache_lib.CachedFeatures(entry.path, SPEC).load()
        assert cache.lookup(SPEC) is not None  # cheap open check passes
    else:
        assert cache.lookup(SPEC) is None
    build = _Counting(_batches(x, y))
    rebuilt = cache.get_or_build({"pre_logits": SPEC}, build, verify=True)
    assert build.calls == 1
    np.testing.assert_array_equal(rebuilt["pre_logits"].load()[0], x)


def test_bad_batches_are_rejected(tmp_path):
    cache = cache_lib.FeatureCache(tmp_path)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="has 4 rows but the batch has 3 labels"):
        cache.get_or_build({"e": SPEC}, lambda: [({"e": x}, np.zeros(3, int))])
    with pytest.raises(ValueError, match="has no 'e'"):
        cache.get_or_build({"e": SPEC}, lambda: [({"f": x}, np.zeros(4, int))])
    with pytest.raises(ValueError, match="non-finite"):
        cache.get_or_build({"e": SPEC}, lambda: [({"e": x * np.nan}, np.zeros(4, int))])
    with pytest.raises(ValueError, match="shard_bytes must be >= 4096"):
        cache_lib.FeatureCache(tmp_path, shard_bytes=10)
    assert os.listdir(tmp_path) == [cache_lib.spec_key(SPEC) + ".lock"]


def test_hash_directory_sees_content_changes(tmp_path):
    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"graph")
    (tmp_path / "variables" / "v.data").write_bytes(b"\x00" * 100)
    first = cache_lib.hash_directory(tmp_path)
    assert cache_lib.hash_directory(tmp_path) == first
    (tmp_path / "variables" / "v.data").write_bytes(b"\x00" * 99 + b"\x01")
    assert cache_lib.hash_directory(tmp_path) != first
