"""Online evaluation during pretraining (probe.online, train.loop hooks).

The loop's generic hook: called at multiples of ``every_steps`` and at the
end, only on the chief, continued across resumes, its failures logged
without losing checkpoints, its cost measured. The evaluator through a smoke
``pretrain``: rows at the configured steps with online fingerprints, the kNN
number equal to ``knn.knn_top1`` on features of an export of that step's
trunk (the offline path), TensorBoard scalars read back, the cost fraction
in ``train_metrics.json``; patch inputs averaged as the export averages them;
the report keeps online rows out of the offline tables.
"""

import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import gin
from revisit_tf import cli, configurables
from revisit_tf import data as data_lib
from revisit_tf import pp as pp_lib
from revisit_tf.export import saved_model as export_lib
from revisit_tf.models import pretext
from revisit_tf.probe import features as features_lib
from revisit_tf.probe import fingerprint as fingerprint_lib
from revisit_tf.probe import knn as knn_lib
from revisit_tf.probe import online as online_lib
from revisit_tf.probe import subsets as subsets_lib
from revisit_tf.report import results as results_lib
from revisit_tf.report import tables
from revisit_tf.train import checkpoint as checkpoint_lib
from revisit_tf.train import loop as loop_lib
from revisit_tf.train import losses, optim

DEMO = "demo/fashion_mnist_rotation.gin"
BATCH = 4


# --- The loop's hook (train/loop.py), on a tiny model. ------------------------


class _Recorder:
    """A hook that records its calls; optionally raises or knows its steps."""

    def __init__(self, every_steps, name="rec", fail=False, done=None):
        self.every_steps, self.name, self.fail = every_steps, name, fail
        self.calls = []
        if done is not None:
            self.has_run = lambda step: step in done

    def __call__(self, step, model):
        self.calls.append((step, int(self.optimizer.iterations.numpy())))
        assert isinstance(model, keras.Model)
        if self.fail:
            raise RuntimeError("hook broke")
        return {"value": float(step)}


def _tiny_trunk(input_shape):
    """A two-layer trunk with named endpoints: fast to build and to trace."""
    image = keras.Input(input_shape)
    pre_logits = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3, activation="relu")(image)
    )
    logits = keras.layers.Dense(2)(pre_logits)
    return keras.Model(image, {"pre_logits": pre_logits, "logits": logits})


def _model_and_optimizer():
    keras.utils.set_random_seed(0)
    spec = {"image": tf.TensorSpec([2, 8, 8, 1]), "label": tf.TensorSpec([2], tf.int32)}
    model = pretext.build_pretext_model(spec, trunk_fn=_tiny_trunk, name="rotation")
    return model, optim.sgd(0.01)


def _train(workdir, total_steps, hooks, **kwargs):
    model, optimizer = _model_and_optimizer()
    for hook in hooks:  # the recorders read the live step counter
        if isinstance(hook, _Recorder):
            hook.optimizer = optimizer
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (BATCH, 2, 8, 8, 1)).astype("float32"),
        "label": np.tile(np.arange(2, dtype=np.int32), (BATCH, 1)),
    }

    def dataset_fn(ctx, start_step=0):
        return tf.data.Dataset.from_tensor_slices(batch).batch(BATCH).repeat()

    return loop_lib.train(
        model=model,
        optimizer=optimizer,
        strategy=tf.distribute.get_strategy(),
        dataset_fn=dataset_fn,
        total_steps=total_steps,
        global_batch_size=BATCH,
        workdir=workdir,
        loss_fn=losses.softmax_xent,
        steps_per_loop=2,
        checkpoint_every=100,
        hooks=hooks,
        **kwargs,
    )


def _checkpoint_steps(workdir):
    state = tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints"))
    return sorted(int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths)


def test_loop_hook_at_multiples_and_end_continues_on_resume(tmp_path):
    workdir = str(tmp_path / "run")
    hook = _Recorder(3)
    metrics = _train(workdir, 7, [hook])
    # At 3 and 6 (the loop stops there although steps_per_loop is 2) and at
    # the end; the model it sees is at that step.
    assert hook.calls == [(3, 3), (6, 6), (7, 7)]
    assert metrics["rec_seconds"] > 0 and 0 < metrics["rec_cost_fraction"] < 1
    assert metrics["rec_failures"] == 0
    assert metrics["loop_seconds"] > metrics["rec_seconds"]
    # The last checkpoint holds the cost of the hook that ran after its save.
    saved = checkpoint_lib.read_metrics(os.path.join(workdir, "checkpoints"), 7)
    assert saved["rec_seconds"] == metrics["rec_seconds"]
    acc = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    values = {
        e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("rec/value")
    }
    assert values == {3: 3.0, 6: 6.0, 7: 7.0}
    assert {"rec/seconds", "rec/cost_fraction"} <= set(acc.Tags()["tensors"])

    # A longer run resumes at 7 and continues the schedule: 9, 12, 13; its
    # cost carries over the first run's (the checkpoint's metrics).
    hook = _Recorder(3)
    again = _train(workdir, 13, [hook])
    assert hook.calls == [(9, 9), (12, 12), (13, 13)]
    # The step-7 checkpoint was saved before the hook ran there; its metrics
    # were rewritten after, so the resume carried all three calls over.
    assert again["rec_seconds"] > metrics["rec_seconds"]
    saved = checkpoint_lib.read_metrics(os.path.join(workdir, "checkpoints"), 13)
    assert saved["rec_seconds"] == again["rec_seconds"]
    assert saved["loop_seconds"] == again["loop_seconds"]

    # Resumed at a step on the schedule: a hook that says it has not run
    # there is called first; one without has_run is not.
    knows, plain = _Recorder(13, name="knows", done=set()), _Recorder(13)
    _train(workdir, 14, [knows, plain])
    assert knows.calls == [(13, 13), (14, 14)] and plain.calls == [(14, 14)]


def test_loop_hook_failure_is_logged_and_keeps_checkpoints(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    hook = _Recorder(2, fail=True)
    with caplog.at_level(logging.ERROR, logger=loop_lib.__name__):
        metrics = _train(workdir, 4, [hook])
    assert [s for s, _ in hook.calls] == [2, 4]
    assert metrics["step"] == 4 and metrics["rec_failures"] == 2
    assert _checkpoint_steps(workdir) == [4]
    assert "Hook 'rec' failed at step 2" in caplog.text
    assert "hook broke" in caplog.text  # the traceback


def test_loop_hook_not_called_off_the_chief(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_lib.strategy_lib, "is_chief", lambda strategy: False)
    hook = _Recorder(2)
    metrics = _train(str(tmp_path / "run"), 4, [hook])
    assert hook.calls == [] and metrics["step"] == 4
    assert metrics["rec_seconds"] == 0


def test_loop_refuses_bad_hooks(tmp_path):
    for bad in (_Recorder(0), _Recorder(2, name="a b"), object()):
        with pytest.raises(ValueError, match="every_steps"):
            _train(str(tmp_path / "run"), 1, [bad])
    with pytest.raises(ValueError, match="Two hooks"):
        _train(str(tmp_path / "run"), 1, [_Recorder(2), _Recorder(3)])


# --- The evaluator through a smoke pretrain (fashion_mnist_idx). --------------

ONLINE = [
    "pretrain.steps = 4",
    "pretrain.online_eval_every = 2",
    "online_evaluator.num_fit = 60",
    "online_evaluator.num_score = 40",
    "online_evaluator.pool_examples = 300",
    "online_evaluator.endpoints = ('pre_logits', 'block2')",
    "online_evaluator.knn_k = 5",
    "online_evaluator.max_iterations = 20",
    "online_evaluator.batch_size = 64",
]


def _subset_examples(split, num, pool):
    """The evaluator's subset, rebuilt from the data stage: ``(images, labels)``."""
    source = data_lib.get_source("fashion_mnist_idx", split).take(pool)
    labels = np.array([int(ex["label"]) for ex in source])
    keep = subsets_lib.balanced_subset(labels, num / pool, seed=0)
    ds = data_lib.make_eval_dataset(
        source, pp_lib.get_preprocess_fn("value_range(0, 1)"), batch_size=64
    )
    images = np.concatenate([b["image"].numpy() for b in ds])[keep]
    return images, labels[keep]


def test_pretrain_online_rows_tensorboard_cost_and_offline_parity(tmp_path):
    cli.parse_gin([DEMO, "probe/online.gin", "smoke.gin"], ONLINE)
    workdir = str(tmp_path / "rotation")
    configurables.pretrain(workdir=workdir)

    # Rows: steps 2 and 4, endpoint x method, online fingerprints.
    rows = results_lib.read_results([results_lib.online_results_path(workdir)])
    assert sorted((r["step"], r["endpoint"], r["protocol"]) for r in rows) == sorted(
        (s, e, m)
        for s in (2, 4)
        for e in ("pre_logits", "block2")
        for m in ("online_knn", "online_lbfgs")
    )
    for row in rows:
        assert row["online"] is True and fingerprint_lib.is_online(row)
        assert row["n_fit"] == 60 and row["n_score"] == 40
        assert row["fingerprint"] == fingerprint_lib.protocol_fingerprint(
            row["protocol_spec"]
        )
        assert "step" not in row["protocol_spec"]  # one curve, one protocol
    # Offline specs (same fields, without the online marks) fingerprint
    # differently, and a protocol cannot carry one mark without the other.
    for row in rows:
        offline = {**row["protocol_spec"], "protocol": row["protocol"][7:]}
        del offline["online"]
        assert not fingerprint_lib.is_online(offline)
        assert fingerprint_lib.protocol_fingerprint(offline) != row["fingerprint"]
        with pytest.raises(ValueError, match="online"):
            fingerprint_lib.protocol_fingerprint({**offline, "online": True})
    # Nothing reaches the offline probe's results.
    assert not os.path.exists(results_lib.results_path(workdir))

    # The kNN number at step 4 equals knn_top1 on features computed apart
    # from the evaluator: the trunk rebuilt and restored from the step-4
    # checkpoint, inputs rebuilt by the data stage and pp, pooled as the probe.
    trunk = gin.get_configurable("build_trunk")(input_shape=(28, 28, 1))
    assert checkpoint_lib.restore_trunk(workdir, trunk).endswith("ckpt-4")
    pp_export = pp_lib.get_preprocess_fn("value_range(-1, 1, 0, 1)")
    fit_images, fit_y = _subset_examples("train", 60, 300)
    score_images, score_y = _subset_examples("val", 40, 300)

    def extract(images, labels):
        del labels
        out = trunk(pp_export({"image": tf.constant(images)})["image"], training=False)
        return {
            e: tf.reshape(
                features_lib.pool_to_budget(out[e]), [len(images), -1]
            ).numpy()
            for e in ("pre_logits", "block2")
        }

    fit_f, score_f = extract(fit_images, fit_y), extract(score_images, score_y)
    by_key = {(r["step"], r["endpoint"], r["protocol"]): r for r in rows}
    for endpoint in ("pre_logits", "block2"):
        expected = knn_lib.knn_top1(
            fit_f[endpoint], fit_y, score_f[endpoint], score_y, k=5, num_classes=10
        )
        got = by_key[(4, endpoint, "online_knn")]["top1"]
        assert got == pytest.approx(expected, abs=1 / 40 + 1e-9), endpoint
        assert by_key[(4, endpoint, "online_knn")]["dim"] == fit_f[endpoint].shape[1]

    # TensorBoard: the trainer's event file has the scalars, equal to the rows.
    acc = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    for endpoint in ("pre_logits", "block2"):
        for method in ("knn", "lbfgs"):
            events = acc.Tensors(f"online/{endpoint}/{method}_top1")
            values = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events}
            assert values == pytest.approx(
                {s: by_key[(s, endpoint, f"online_{method}")]["top1"] for s in (2, 4)}
            )
    assert {"online/seconds", "online/cost_fraction"} <= tags

    # Cost: recorded with the run's metrics.
    with open(os.path.join(workdir, "train_metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["complete"] is True
    assert 0 < metrics["online_cost_fraction"] < 1 and metrics["online_seconds"] > 0
    assert metrics["online_failures"] == 0


def test_patch_inputs_are_averaged_as_the_export_averages(tmp_path):
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1))
    block1 = keras.layers.Conv2D(3, 3, activation="relu")(image)  # [6, 6, 3]
    pre_logits = keras.layers.GlobalMaxPooling2D()(block1)
    trunk = keras.Model(image, {"block1": block1, "pre_logits": pre_logits})
    pp_export = "crop_patches(3, 0, random=False)|standardize"
    pp_fn = pp_lib.get_preprocess_fn(pp_export)
    path = export_lib.export_saved_model(
        trunk,
        str(tmp_path / "export"),
        image_shape=(24, 24, 1),
        preprocess=lambda x: pp_fn({"image": x})["image"],
        parity_consumers=(),
    )
    images = np.random.default_rng(0).uniform(0, 1, (5, 24, 24, 1)).astype("float32")
    endpoints = ("pre_logits", "block1")
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": np.zeros(5, np.int64)}
    ).batch(5)
    offline, _ = features_lib.SavedModelFeatures(path, endpoints).extract(ds)
    patches = pp_fn({"image": tf.constant(images)})["image"].numpy()  # [5, 9, ...]
    assert patches.ndim == 5
    online = online_lib.TrunkFeatures(trunk, endpoints, batch_size=2)(patches)
    for e in endpoints:
        np.testing.assert_allclose(online[e], offline[e], rtol=1e-4, atol=1e-5)


# --- The report keeps online rows apart. ----------------------------------------


def _offline_row(model, top1, endpoint="pre_logits"):
    return {
        "model": model,
        "endpoint": endpoint,
        "protocol": "lbfgs",
        "fingerprint": "aaaaaaaaaaaa",
        "test_top1": top1,
    }


def _online_row(model, step, top1, endpoint="pre_logits", protocol="online_knn"):
    return {
        "model": model,
        "endpoint": endpoint,
        "protocol": protocol,
        "online": True,
        "step": step,
        "fingerprint": "bbbbbbbbbbbb",
        "top1": top1,
        "n_fit": 60,
        "n_score": 40,
        "protocol_spec": {"protocol": protocol, "online": True},
    }


def test_report_never_mixes_online_and_offline_rows():
    assert tables.ONLINE_KEY == fingerprint_lib.ONLINE_KEY
    rows = [
        _offline_row("rotation", 0.875),
        _online_row("rotation", 100, 0.61),
        _online_row("rotation", 200, 0.72),
        _offline_row("rotation", 0.80, endpoint="block4"),
        _online_row("rotation", 200, 0.70, protocol="online_lbfgs"),
    ]
    offline, online = tables.split_online(rows)
    assert len(offline) == 2 and len(online) == 3
    text = tables.report_tables(rows)
    offline_part, online_part = text.split("Online evaluation during pretraining")
    # Offline tables: exactly the offline numbers, no fingerprint note (one
    # protocol), no online number or protocol.
    assert "87.5" in offline_part and "80.0" in offline_part
    assert "61.0" not in offline_part and "72.0" not in offline_part
    assert "online" not in offline_part and "Protocols differ" not in offline_part
    # Online table: one line per (endpoint, method, step), steps in order.
    lines = [line for line in online_part.splitlines() if line.startswith("| rotation")]
    assert len(lines) == 3
    assert "| knn | 100 |" in lines[0] and "| knn | 200 |" in lines[1]
    assert "| lbfgs | 200 |" in lines[2]
    assert tables.report_tables(rows, kind="probe") == tables.probe_table(offline)
    assert tables.report_tables(rows, kind="endpoints") == tables.endpoint_table(
        offline
    )
    assert tables.report_tables(rows, kind="online") == tables.online_table(online)
    # Only online rows: only the online table; an offline row is refused there.
    assert "test top-1" not in tables.report_tables(online)
    with pytest.raises(ValueError, match="not an online row"):
        tables.online_table(rows)
    # A row marked online only in its protocol spec is still online.
    marked = {**_online_row("r", 1, 0.5), "online": None}
    assert tables.is_online_row(marked) and fingerprint_lib.is_online(marked)
