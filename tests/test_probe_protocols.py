"""Tests for the other probe protocols: subsets, fingerprints, SGD, MLP, k-NN.

References: scikit-learn (k-NN, logistic regression), NumPy counts, and
data whose linear separability is known by construction.
"""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from revisit_tf.probe import fingerprint, knn, sgd, subsets

# --- label subsets (paper Fig. 7) ---


def test_subsets_are_class_balanced_reproducible_and_nested():
    rng = np.random.default_rng(0)
    # Imbalanced classes: 5000, 3000, 2000 rows.
    labels = rng.permutation(np.repeat([0, 1, 2], [5000, 3000, 2000]))
    one = subsets.balanced_subset(labels, 0.01, seed=3)
    ten = subsets.balanced_subset(labels, 0.10, seed=3)
    assert np.bincount(labels[one]).tolist() == [33, 33, 33]  # round(100 / 3)
    assert np.bincount(labels[ten]).tolist() == [333, 333, 333]
    assert np.array_equal(one, subsets.balanced_subset(labels, 0.01, seed=3))
    assert not np.array_equal(one, subsets.balanced_subset(labels, 0.01, seed=4))
    assert set(one) <= set(ten)  # nested within a seed
    assert np.all(np.diff(ten) > 0)  # sorted, unique
    full = subsets.balanced_subset(labels, 1.0, seed=3)
    assert np.array_equal(full, np.arange(10000))


def test_subset_of_a_rare_class_takes_all_it_has(caplog):
    labels = np.array([0] * 100 + [1] * 3)
    rows = subsets.balanced_subset(labels, 0.5, seed=0)  # 26 per class asked
    assert np.bincount(labels[rows]).tolist() == [26, 3]
    assert "fewer than 26 examples" in caplog.text


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, "ten", None])
def test_subset_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"fraction must be a float in \(0, 1\]"):
        subsets.balanced_subset(np.array([0, 1]), fraction)


def test_subset_names():
    assert [subsets.subset_name(f) for f in (0.01, 0.1, 0.5, 1.0, 0.005)] == [
        "1%",
        "10%",
        "50%",
        "100%",
        "0.5%",
    ]


# --- protocol fingerprints ---

_PROTOCOL = {
    "protocol": "lbfgs",
    "solver": {"l2_grid": [1e-2, 1e-3], "tolerance": 1e-4, "precision": "float32"},
    "dataset": "fashion_mnist_idx",
    "splits": {"train": "train", "val": "val", "test": "test"},
    "pp": "value_range(0, 1)",
    "pooling": "max",
    "subset": 1.0,
    "seed": 0,
    "version": "0.1.0",
}


def _changed(value):
    if isinstance(value, dict):
        key = sorted(value)[0]
        return {**value, key: _changed(value[key])}
    if isinstance(value, list):
        return value + [value[-1]]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return value + "x"


def test_fingerprint_changes_with_every_input_and_only_then():
    base = fingerprint.protocol_fingerprint(_PROTOCOL)
    assert len(base) == 12 and int(base, 16) >= 0
    # Same content, other key order and tuple instead of list: same print.
    reordered = dict(reversed(list(_PROTOCOL.items())))
    reordered["solver"] = {**_PROTOCOL["solver"], "l2_grid": (1e-2, 1e-3)}
    assert fingerprint.protocol_fingerprint(reordered) == base
    seen = {base}
    for key in _PROTOCOL:
        changed = {**_PROTOCOL, key: _changed(_PROTOCOL[key])}
        value = fingerprint.protocol_fingerprint(changed)
        assert value not in seen, key
        seen.add(value)
        assert fingerprint.protocol_differences(_PROTOCOL, changed) == [key]
    extra = {**_PROTOCOL, "k": 20}
    assert fingerprint.protocol_fingerprint(extra) not in seen


def test_fingerprint_requires_every_protocol_key():
    partial = {k: v for k, v in _PROTOCOL.items() if k != "pooling"}
    with pytest.raises(ValueError, match=r"protocol lacks \['pooling'\]"):
        fingerprint.protocol_fingerprint(partial)


# --- SGD linear probe and MLP (reference 8.4, 8.5; paper Figs. 3, 8) ---


def _gaussian(seed, n, d=10, c=3, spread=1.0):
    rng = np.random.default_rng(seed)
    centers = spread * np.random.default_rng(99).normal(size=(c, d))
    y = rng.integers(0, c, size=n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_sgd_linear_probe_matches_logistic_regression_and_logs_schedule():
    x, y = _gaussian(0, 3000)
    tx, ty = _gaussian(1, 2000)
    result = sgd.train_sgd_probe(
        x,
        y,
        eval_sets={"test": (tx, ty)},
        num_classes=3,
        batch_size=100,
        epochs=6,
        decay_epochs=(2, 4),
        seed=0,
    )
    base = 0.1 * 100 / 256  # linear scaling from batch 256 (reference 7.2)
    rates = [point["lr"] for point in result.curve]
    np.testing.assert_allclose(rates, [base] * 2 + [base / 10] * 2 + [base / 100] * 2)
    assert result.steps == 6 * 30
    with threadpool_limits(limits=1):
        ref = LogisticRegression(C=1e4, max_iter=2000).fit(x, y)
    assert abs(result.top1["test"] - ref.score(tx, ty)) < 0.02
    assert result.curve[-1]["loss"] < result.curve[0]["loss"]


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_sgd_predictions_and_per_epoch_top1(head):
    x, y = _gaussian(0, 600)
    vx, vy = _gaussian(1, 150)
    tx, ty = _gaussian(2, 211)
    result = sgd.train_sgd_probe(
        x,
        y,
        eval_sets={"val": (vx, vy), "test": (tx, ty)},
        num_classes=3,
        head=head,
        hidden=16,
        batch_size=50,
        epochs=3,
        decay_epochs=(2,),
        seed=0,
    )
    # The final head, in NumPy (no dropout at evaluation).
    p = {k: v.astype(np.float64) for k, v in result.params.items()}
    h = tx.astype(np.float64)
    if head == "mlp":
        h = np.maximum(h @ p["hidden_kernel"] + p["hidden_bias"], 0.0)
    expected = np.argmax(h @ p["kernel"] + p["bias"], axis=1)
    pred = result.predictions["test"]
    assert pred.dtype == np.int32 and pred.shape == (211,)
    assert np.mean(pred != expected) <= 1 / 211  # float32 vs float64 near-ties
    assert result.top1["test"] == np.mean(pred == ty)
    assert result.top1["val"] == np.mean(result.predictions["val"] == vy)
    assert [sorted(c) for c in result.curve] == [
        ["epoch", "loss", "lr", "test_top1", "val_top1"]
    ] * 3
    assert result.curve[-1]["test_top1"] == result.top1["test"]
    assert result.curve[-1]["val_top1"] == result.top1["val"]
    assert all(0.0 <= c["test_top1"] <= 1.0 for c in result.curve)
    assert result.curve[-1]["test_top1"] > 0.6  # chance is 1/3


def test_mlp_probe_fits_what_a_linear_probe_cannot():
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(4000, 2)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(int)  # XOR: not linearly separable
    kwargs = dict(
        eval_sets={"train": (x, y)},
        num_classes=2,
        batch_size=64,
        lr=0.5,
        epochs=15,
        decay_epochs=(10,),
        seed=0,
    )
    mlp = sgd.train_sgd_probe(x, y, head="mlp", hidden=64, **kwargs)
    linear = sgd.train_sgd_probe(x, y, head="linear", **kwargs)
    assert mlp.top1["train"] > 0.93
    assert linear.top1["train"] < 0.8  # no half-plane does much better than 2/3
    assert mlp.params["hidden_kernel"].shape == (2, 64)


def test_sgd_rejects_bad_settings():
    x, y = _gaussian(0, 50)
    with pytest.raises(ValueError, match="head must be one of"):
        sgd.train_sgd_probe(x, y, eval_sets={}, num_classes=3, head="deep")
    with pytest.raises(ValueError, match="batch_size 512 exceeds the 50"):
        sgd.train_sgd_probe(x, y, eval_sets={}, num_classes=3)
    with pytest.raises(ValueError, match="decay_epochs must be increasing"):
        sgd.train_sgd_probe(
            x, y, eval_sets={}, num_classes=3, batch_size=10, decay_epochs=(5, 2)
        )


# --- k-NN ---


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_scikit_learn_cosine_knn(k):
    x, y = _gaussian(3, 800, d=16, c=5, spread=0.5)
    qx, qy = _gaussian(4, 300, d=16, c=5, spread=0.5)
    ours = knn.knn_top1(x, y, qx, qy, k=k, block_size=128)
    with threadpool_limits(limits=1):
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        theirs = ref.fit(x, y).score(qx, qy)
    assert ours == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize("k", [1, 7])
def test_knn_predict_matches_scikit_learn_votes(k):
    x, y = _gaussian(5, 600, d=16, c=5, spread=0.5)
    qx, qy = _gaussian(6, 333, d=16, c=5, spread=0.5)
    ours = knn.knn_predict(x, y, qx, k=k, block_size=100)
    with threadpool_limits(limits=1):
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        theirs = ref.fit(x, y).predict(qx)
    assert ours.dtype == np.int32 and ours.shape == (333,)
    np.testing.assert_array_equal(ours, theirs)
    assert np.mean(ours == qy) == knn.knn_top1(x, y, qx, qy, k=k, block_size=100)


def test_knn_rejects_bad_k():
    x, y = _gaussian(3, 10)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 10\]"):
        knn.knn_top1(x, y, x, y, k=11)


# --- run_protocol: every protocol's rows carry the test predictions ---


def _split_entries(tmp_path, d=8, c=3):
    from revisit_tf.probe import cache as cache_lib
    from revisit_tf.probe import protocols as protocols_lib

    cache = cache_lib.FeatureCache(tmp_path / "cache", shard_bytes=4096)
    entries = {}
    for seed, (split, n) in enumerate([("train", 450), ("val", 150), ("test", 301)]):
        x, y = _gaussian(10 + seed, n, d=d, c=c, spread=0.7)
        entries[split] = cache.get_or_build(
            {"e": {"endpoint": "e", "split": split}},
            lambda x=x, y=y: [
                ({"e": x[i : i + 64]}, y[i : i + 64]) for i in range(0, len(y), 64)
            ],
        )["e"]
    assert entries["test"].num_shards > 2  # 128 rows per 4 KiB shard
    return protocols_lib.SplitEntries(**entries)


def _small_protocol(name: str, streamed: bool = False):
    """Protocol ``name`` with small settings; ``streamed`` forces shards."""
    from revisit_tf.probe import protocols as protocols_lib

    return {
        "lbfgs": lambda: protocols_lib.LbfgsProbe(
            l2_grid=(1e-1, 1e-3), max_resident_bytes=1 if streamed else 8 << 30
        ),
        "sgd": lambda: protocols_lib.SgdProbe(epochs=2, batch_size=50),
        "mlp": lambda: protocols_lib.MlpProbe(epochs=2, batch_size=50, hidden=16),
        "knn": lambda: protocols_lib.KnnProbe(k=5),
    }[name]()


def test_streamed_lbfgs_row_is_the_same_mapped_or_copied(tmp_path):
    """``LbfgsProbe.stream_mapped`` picks how shards are read (memory maps run
    in one graph, copies round by round), not the result: same l2 path, same
    test predictions, same fingerprint settings."""
    from revisit_tf.probe import protocols as protocols_lib

    entries = _split_entries(tmp_path)
    rows = {}
    for mapped in (True, False):
        protocol = protocols_lib.LbfgsProbe(
            l2_grid=(1e-1, 1e-3), max_resident_bytes=1, stream_mapped=mapped
        )
        rows[mapped] = protocols_lib.run_protocol(protocol, entries, subset=1.0)
        assert rows[mapped]["streamed"]
        assert "stream_mapped" not in protocol.settings()
    a, b = rows[True], rows[False]
    assert a["l2"] == b["l2"] and a["refit_iterations"] == b["refit_iterations"]
    assert [p["l2"] for p in a["l2_path"]] == [p["l2"] for p in b["l2_path"]]
    assert a["test_predictions"] == b["test_predictions"]


@pytest.mark.parametrize(
    "name, streamed",
    [("lbfgs", False), ("lbfgs", True), ("sgd", False), ("mlp", False), ("knn", False)],
)
def test_run_protocol_keeps_test_predictions(tmp_path, name, streamed):
    from revisit_tf.probe import predictions
    from revisit_tf.probe import protocols as protocols_lib

    entries = _split_entries(tmp_path)
    protocol = _small_protocol(name, streamed)
    out = protocols_lib.run_protocol(protocol, entries, subset=1.0)
    assert isinstance(out["warnings"], list)
    test_x, test_y = entries.arrays("test")
    pred, correct = predictions.decode_predictions(
        out["test_predictions"], labels=test_y
    )
    assert pred.shape == (301,) and out["test_predictions"]["n"] == 301
    assert out["test_top1"] == correct.mean()  # exactly, not approximately
    np.testing.assert_array_equal(correct, pred == test_y)
    train_x, train_y = entries.arrays("train")
    val_x, val_y = entries.arrays("val")
    if name == "knn":  # the vote itself, against scikit-learn
        with threadpool_limits(limits=1):
            ref = KNeighborsClassifier(
                n_neighbors=5, metric="cosine", algorithm="brute"
            )
            np.testing.assert_array_equal(
                pred, ref.fit(train_x, train_y).predict(test_x)
            )
    elif name == "lbfgs":  # the refit on train + val, against scikit-learn
        assert out["streamed"] is streamed
        both_x = np.concatenate([train_x, val_x]).astype(np.float64)
        both_y = np.concatenate([train_y, val_y])
        mean, std = both_x.mean(0), both_x.std(0)
        with threadpool_limits(limits=1):
            ref = LogisticRegression(C=1 / (out["l2"] * len(both_y)), max_iter=5000)
            ref.fit((both_x - mean) / std, both_y)
        theirs = ref.predict((test_x - mean) / std)
        assert np.mean(pred != theirs) <= 2 / 301  # solver tolerance 1e-4
    else:
        curve = out["lr_curve"]
        assert len(curve) == 2 and curve[-1]["test_top1"] == out["test_top1"]
        assert curve[-1]["val_top1"] == out["val_top1"]
    assert out["test_top1"] > 0.5  # chance is 1/3


def test_protocol_fingerprint_ignores_the_predictions():
    from revisit_tf.probe import protocols as protocols_lib

    record = protocols_lib.protocol_record(
        "lbfgs",
        dataset="d",
        splits={"train": "train", "val": "val", "test": "test"},
        pp="",
        pooling="max",
        subset=1.0,
        seed=0,
        version="0",
    )
    assert record == protocols_lib.protocol_record(
        protocols_lib.LbfgsProbe(),
        dataset="d",
        splits={"train": "train", "val": "val", "test": "test"},
        pp="",
        pooling="max",
        subset=1.0,
        seed=0,
        version="0",
    )
    assert "predictions" not in repr(record)
    # Pinned: the settings (not the outputs) define the fingerprint.
    # (518a1ea82106 since issue 14 added extend_l2; 9d791d2b8266 before.)
    assert fingerprint.protocol_fingerprint(record) == "518a1ea82106"


# --- the linear_probe root: protocols x subsets, cache reuse, streaming ---

_PIXEL_PROBE = dict(
    dataset="fashion_mnist_idx",
    train_split="train[:600]",
    val_split="train[-300:]",
    test_split="test[:300]",
    features="pixels",
    batch_size=200,
)


def _pixel_protocols(*names: str, streamed: bool = False):
    from revisit_tf.probe import protocols as protocols_lib

    made = {
        # The L2 path itself is tested in test_probe_lbfgs.py.
        "lbfgs": lambda: protocols_lib.LbfgsProbe(
            l2_grid=(1e-1,), max_resident_bytes=1 if streamed else 8 << 30
        ),
        "sgd": lambda: protocols_lib.SgdProbe(epochs=2, batch_size=64),
        "knn": lambda: protocols_lib.KnnProbe(k=5),
    }
    return tuple(made[n]() for n in names)


def test_linear_probe_runs_protocols_and_subsets_from_one_cache(tmp_path, caplog):
    from revisit_tf import experiments

    workdir = str(tmp_path / "w")
    rows = experiments.linear_probe(
        workdir,
        protocols=_pixel_protocols("lbfgs", "knn", "sgd"),
        subsets=(0.1, 1.0),
        **_PIXEL_PROBE,
    )
    assert [(r["protocol"], r["subset"]) for r in rows] == [
        (p, s) for p in ("lbfgs", "knn", "sgd") for s in (0.1, 1.0)
    ]
    assert [r["n_train"] for r in rows[:2]] == [60, 600]  # 6 per class x 10
    assert len({r["fingerprint"] for r in rows}) == 6
    for r in rows:  # pixels: far above chance (10%); SGD on 60 rows takes 2 steps
        low = 0.15 if (r["protocol"], r["subset"]) == ("sgd", 0.1) else 0.3
        assert low < r["test_top1"] <= 1.0, r
    assert rows[1]["refit_iterations"] > 0 and not rows[1]["streamed"]
    assert len(rows[4]["lr_curve"]) == 2
    from revisit_tf.probe import predictions
    from revisit_tf.report import results as results_lib

    written = results_lib.read_results([workdir])
    for r, w in zip(rows, written, strict=True):  # in every row, in the file too
        assert w["test_predictions"] == r["test_predictions"]
        _, correct = predictions.decode_predictions(r["test_predictions"])
        assert r["test_top1"] == correct.mean() and r["n_test"] == len(correct)
    assert len({r["test_predictions"]["labels_sha256"] for r in rows}) == 1
    assert set(rows[4]["lr_curve"][-1]) == {
        "epoch",
        "lr",
        "loss",
        "val_top1",
        "test_top1",
    }

    # A second run reuses the cached features and reproduces the fingerprints;
    # a forced streamed (sharded) run of the same protocol agrees.
    caplog.clear()
    with caplog.at_level("INFO"):
        again = experiments.linear_probe(
            workdir,
            protocols=_pixel_protocols("lbfgs", streamed=True),
            subsets=(1.0,),
            **_PIXEL_PROBE,
        )
    assert "Feature cache: wrote" not in caplog.text
    assert "Feature cache: using" in caplog.text
    (streamed,) = again
    assert streamed["streamed"] and streamed["fingerprint"] == rows[1]["fingerprint"]
    assert streamed["l2"] == rows[1]["l2"]
    assert abs(streamed["test_top1"] - rows[1]["test_top1"]) <= 2 / 300
    resident_pred, _ = predictions.decode_predictions(rows[1]["test_predictions"])
    streamed_pred, _ = predictions.decode_predictions(streamed["test_predictions"])
    assert np.sum(resident_pred != streamed_pred) <= 2

    table = experiments.report([workdir])
    assert "per fraction of labels" in table and "| sgd |" in table


def test_linear_probe_rejects_unknown_protocol_early(tmp_path):
    from revisit_tf import experiments

    with pytest.raises(ValueError, match="protocols must be among"):
        experiments.linear_probe(str(tmp_path), protocols=("svm",), **_PIXEL_PROBE)
    assert not (tmp_path / "probe").exists()


def test_precondition_is_part_of_the_lbfgs_protocol_fingerprint():
    from revisit_tf.probe import fingerprint as fingerprint_lib
    from revisit_tf.probe import protocols as protocols_lib

    on = protocols_lib.LbfgsProbe().settings()
    off = protocols_lib.LbfgsProbe(precondition=False).settings()
    assert on["precondition"] is True and off["precondition"] is False
    assert fingerprint_lib.protocol_fingerprint({**_PROTOCOL, "solver": on}) != (
        fingerprint_lib.protocol_fingerprint({**_PROTOCOL, "solver": off})
    )
    assert "precondition" not in protocols_lib.KnnProbe().settings()
