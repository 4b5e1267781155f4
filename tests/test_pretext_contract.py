"""The pretext contract (issue 10): every task through one assembler and one seam.

* Every shipped task trains, exports and (the new ones) probes through the
  same roots, with ``pretrain.model_fn = @build_pretext_model`` and a loss
  and metric of the ``(batch, outputs)`` signature.
* The loop, the export and the two roots that drive them name no task: their
  code (docstrings and comments aside) has none of the tasks' vocabulary.
* A per-pixel loss goes through the loop with the right denominator.

Adding a task: put its demo config in ``TASKS`` (docs/adding_a_pretext.md).
"""

import ast
import inspect
import io
import json
import os
import tokenize

import numpy as np
import pytest
import tensorflow as tf

import gin
from revisit_tf import cli, configurables, experiments
from revisit_tf.export import saved_model as export_lib
from revisit_tf.models import factory, heads, pretext
from revisit_tf.train import checkpoint as checkpoint_lib
from revisit_tf.train import loop as loop_lib
from revisit_tf.train import losses, reconstruction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Demo config of every shipped task -> (head builder, loss, metric names).
TASKS = {
    "rotation": (None, "softmax_xent", {"accuracy"}),
    "exemplar": (None, "triplet_semihard", {"accuracy"}),
    "jigsaw": ("jigsaw_head", "softmax_xent", {"accuracy"}),
    "rel_patch_location": ("rel_patch_head", "softmax_xent", {"accuracy"}),
    "supervised": (None, "softmax_xent", {"accuracy", "top5_accuracy"}),
    "simclr": ("projection_head", "nt_xent", {"accuracy"}),
    "inpainting": ("inpainting_decoder", "masked_l2", {"psnr"}),
}
PROBED = ("simclr", "inpainting")  # the older tasks' probes are in test_cli
# Words of the tasks, their labels, heads and outputs: none may appear in the
# code of the loop, the export or the roots that drive them. (Endpoint names
# such as pre_logits and the export's generic patch-averaging signature for
# rank-5 preprocessing, reference 8.3, are not task words.)
TASK_WORDS = (
    "rotat",
    "exemplar",
    "jigsaw",
    "rel_patch",
    "simclr",
    "inpaint",
    "triplet",
    "permutation",
    "contrastive",
    "label",
    "views",
    "head",
    "mask",
    "target",
)


def _selector(name):
    """The configurable a gin reference binding names (None when unbound)."""
    try:
        value = gin.query_parameter(name)
    except ValueError:  # not bound: the builder's default (None)
        return None
    return None if value is None else value.selector


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_and_exports_through_the_same_roots(task, tmp_path):
    head, loss, metric_names = TASKS[task]
    cli.parse_gin(
        [f"demo/fashion_mnist_{task}.gin", "smoke.gin"],
        ["pretrain.steps = 2", "pretrain.checkpoint_every = 2"],
    )
    assert _selector("pretrain.model_fn") == "build_pretext_model"
    assert _selector("build_pretext_model.head_fn") == head
    assert _selector("pretrain.loss_fn") == loss
    # Training and export build the trunk with the same TRUNK macro.
    assert _selector("TRUNK/macro.value") == "build_trunk"
    for key in ("build_pretext_model.trunk_fn", "export_model.trunk_fn"):
        assert gin.query_parameter(key).scoped_selector == "TRUNK/gin.macro", key
    workdir = str(tmp_path / task)
    metrics = configurables.pretrain(workdir=workdir)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    assert set(metrics) - {"step", "loss", "task_loss"} == metric_names | {
        "learning_rate",
        "examples_per_sec",
    }
    path = configurables.export_model(workdir=workdir)
    loaded = export_lib.load(path)
    rep = loaded.signatures["representation"](images=tf.random.uniform([3, 28, 28, 1]))
    assert rep["pre_logits"].shape[0] == 3
    assert np.isfinite(rep["pre_logits"].numpy()).all()
    if task in PROBED:
        (row,) = configurables.linear_probe(workdir=workdir)
        assert row["endpoint"] == "pre_logits" and 0 <= row["test_top1"] <= 1


def test_export_restores_the_trunk_that_was_trained(tmp_path):
    """The export's trunk (checkpoint key ``trunk``) is the trained model's."""
    cli.parse_gin(
        ["demo/fashion_mnist_jigsaw.gin", "smoke.gin"],
        ["pretrain.steps = 2", "pretrain.checkpoint_every = 2"],
    )
    workdir = str(tmp_path / "jigsaw")
    configurables.pretrain(workdir=workdir)
    trunk_fn = gin.query_parameter("TRUNK/macro.value").scoped_configurable_fn
    model_fn = gin.query_parameter("pretrain.model_fn").scoped_configurable_fn
    spec = {
        "image": tf.TensorSpec([9, 10, 10, 1]),
        "label": tf.TensorSpec([8], tf.int32),
    }
    model = model_fn(spec)
    trained = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    tf.train.Checkpoint(model=model).restore(trained).expect_partial()
    trunk = trunk_fn(input_shape=(10, 10, 1))
    before = [w.copy() for w in trunk.get_weights()]
    checkpoint_lib.restore_trunk(workdir, trunk)
    weights = pretext.get_trunk(model).get_weights()
    assert len(weights) == len(trunk.get_weights()) > 0
    for a, b in zip(weights, trunk.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights, strict=True))
    with open(os.path.join(workdir, "permutations.json")) as f:
        assert json.load(f)["num_permutations"] == 100  # the head's workdir file


def _code_words(source: str) -> set[str]:
    """Identifiers, attributes and string constants of ``source``, no docs/comments."""
    tree = ast.parse(source)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(
            node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
        ):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                docs.add(doc)
    words = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            words.add(tok.string.lower())
        elif tok.type == tokenize.STRING:
            value = ast.literal_eval(tok.string) if "f" not in tok.string[:2] else ""
            if value not in docs:
                words.add(str(value).lower())
    return words


def test_loop_export_and_roots_name_no_task():
    sources = {
        "train/loop.py": inspect.getsource(loop_lib),
        "experiments.pretrain": inspect.getsource(experiments.pretrain),
        "experiments.export_model": inspect.getsource(experiments.export_model),
    }
    export_dir = os.path.join(REPO, "revisit_tf", "export")
    for name in sorted(os.listdir(export_dir)):
        if name.endswith(".py"):
            with open(os.path.join(export_dir, name)) as f:
                sources[f"export/{name}"] = f.read()
    offenders = {
        where: sorted(w for w in _code_words(source) if any(t in w for t in TASK_WORDS))
        for where, source in sources.items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    # The test can fail: the words are found in code that has them.
    assert "jigsaw_head" in _code_words(inspect.getsource(heads))


def test_a_per_pixel_loss_gets_the_global_batch_denominator():
    """Inpainting through the loop: task loss = mean over examples of masked MSE.

    The old loop inferred rows per example from the label's rank, so a
    per-pixel target [B, H, W, C] would have been read as H rows per image.
    """
    spec = {
        "image": tf.TensorSpec([8, 8, 1]),
        "target": tf.TensorSpec([8, 8, 1]),
        "mask": tf.TensorSpec([8, 8, 1]),
    }
    trunk_fn = lambda input_shape: factory.build_trunk(  # noqa: E731
        "resnet50_v1", width=0.25, units=(1, 1, 1, 1), input_shape=input_shape
    )
    model = pretext.build_pretext_model(
        spec, trunk_fn=trunk_fn, head_fn=heads.inpainting_decoder
    )
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    mask = np.zeros((4, 8, 8, 1), np.float32)
    for b, side in enumerate((2, 4, 6, 8)):  # a different region per example
        mask[b, :side, :side] = 1
    batch = {
        "image": tf.constant(target * (1 - mask)),
        "target": tf.constant(target),
        "mask": tf.constant(mask),
    }
    _, task_loss, grads, sums = loop_lib.loss_and_gradients(
        model,
        reconstruction.masked_l2,
        batch,
        global_batch_size=4,
        metric_fn=reconstruction.reconstruction_metrics,
    )
    pred = model(batch, training=True)["logits"].numpy()  # same BN statistics
    per_example = [
        ((pred[b] - target[b]) ** 2 * mask[b]).sum() / mask[b].sum() for b in range(4)
    ]
    np.testing.assert_allclose(float(task_loss), np.mean(per_example), rtol=1e-4)
    assert all(g is not None for g in grads) and set(sums) == {"psnr"}
    # Half the global batch on this replica: half the share, as two replicas.
    _, half, _, _ = loop_lib.loss_and_gradients(
        model, reconstruction.masked_l2, batch, global_batch_size=8
    )
    np.testing.assert_allclose(float(half), float(task_loss) / 2, rtol=1e-4)
    assert losses.examples_in(batch) == 4
