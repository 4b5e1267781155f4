"""The only library module that imports gin: registers roots and builders.

Gin files bind the roots' arguments (``pretrain.*``, ``export_model.*``,
``linear_probe.*``), the probe protocols' (``LbfgsProbe.*``, ...) and
reference the registered builders by name
(``build_pretext_model.trunk_fn = @build_trunk``). Library code never sees gin.
Every gin file starts with ``import revisit_tf.configurables`` so that it can
be parsed on its own.
"""

from __future__ import annotations

import gin
from revisit_tf import experiments, resources
from revisit_tf.models import factory, heads, pretext
from revisit_tf.pp import permutations
from revisit_tf.probe import online, protocols
from revisit_tf.study import spec as study_spec
from revisit_tf.train import contrastive, losses, optim, reconstruction, triplet

# Roots: called by the binaries, so they need the configured (wrapped) function.
pretrain = gin.external_configurable(experiments.pretrain, module="revisit_tf")
export_model = gin.external_configurable(experiments.export_model, module="revisit_tf")
linear_probe = gin.external_configurable(experiments.linear_probe, module="revisit_tf")
# The study spec (gin/study/*.gin binds study.*); called by revisit-study.
study = gin.external_configurable(
    study_spec.make_spec, name="study", module="revisit_tf"
)

# Builders: only ever referenced from gin (`@build_trunk`), so registering
# them leaves the library functions themselves untouched.

# --- models: trunks, the pretext assembler, heads ---
gin.register(factory.build_trunk, module="revisit_tf.models")
gin.register(pretext.build_pretext_model, module="revisit_tf.models")
for _head in (
    heads.jigsaw_head,
    heads.rel_patch_head,
    heads.projection_head,
    heads.inpainting_decoder,
):
    gin.register(_head, module="revisit_tf.models")
gin.external_configurable(
    permutations.get_permutations, name="jigsaw_permutations", module="revisit_tf.pp"
)
# --- training: task losses and metrics (train.losses contract) ---
for _fn in (
    losses.softmax_xent,
    losses.accuracy_metrics,
    losses.classification_metrics,
    triplet.triplet_semihard,
    triplet.nearest_neighbour_metrics,
    contrastive.nt_xent,
    contrastive.contrastive_metrics,
    reconstruction.masked_l2,
    reconstruction.reconstruction_metrics,
):
    gin.register(_fn, module="revisit_tf.train")
# --- training: optimizers and learning-rate schedules ---
for _fn in (
    optim.sgd,
    optim.adam,
    optim.adamw,
    optim.lars,
    optim.reference_schedule,
    optim.cosine_schedule,
):
    gin.register(_fn, module="revisit_tf.train")
# --- probes ---
# Probe protocols (linear_probe.protocols): each class binds its own
# arguments (`LbfgsProbe.l2_grid = ...`). The gin-configurable classes replace
# the registry's, so a name ('lbfgs') honours the bindings as `@LbfgsProbe()`
# does.
for _name, _cls in list(protocols.REGISTRY.items()):
    protocols.REGISTRY[_name] = gin.external_configurable(
        _cls, module="revisit_tf.probe"
    )
# Online evaluation during pretraining (pretrain.online_eval_fn, probe/online.gin).
gin.external_configurable(
    online.OnlineEvaluator,
    name="online_evaluator",
    module="revisit_tf.probe",
    denylist=["write_row", "done_steps"],  # pretrain passes them
)


def gin_search_paths() -> list[str]:
    """Directories gin searches for ``--gin_file`` names and ``include`` lines.

    Only the package's own ``revisit_tf/configs`` (``resources.gin_dir``,
    found through ``importlib.resources`` in every kind of install), so
    ``--gin_file=demo/fashion_mnist_rotation.gin`` works from any working
    directory. (gin itself first tries a name as a path.)
    """
    return [resources.gin_dir()]


def bound_value(name: str, default=None):
    """The value gin binds to ``name`` (e.g. ``"pretrain.pp_train"``), or ``default``.

    A configurable reference (``@build_pretext_model``) comes back as the
    configured function, so library code (the benchmarks) can use what a
    shipped config binds without importing gin.
    """
    try:
        value = gin.query_parameter(name)
    except ValueError:  # not bound
        return default
    return getattr(value, "scoped_configurable_fn", value)
