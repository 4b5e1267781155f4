"""The only library module that imports gin: registers roots and builders.

Gin files bind the roots' arguments (``pretrain.*``, ``export_model.*``,
``linear_probe.*``) and reference the registered builders by name
(``pretrain.model_fn = @build_trunk``). Library code never sees gin.
Every gin file starts with ``import revisit_tf.configurables`` so that it can
be parsed on its own.
"""

from __future__ import annotations

import os
import sysconfig

import gin
from revisit_tf import experiments
from revisit_tf.models import factory, pretext
from revisit_tf.pp import permutations
from revisit_tf.train import losses

# Roots: called by the binaries, so they need the configured (wrapped) function.
pretrain = gin.external_configurable(experiments.pretrain, module="revisit_tf")
export_model = gin.external_configurable(experiments.export_model, module="revisit_tf")
linear_probe = gin.external_configurable(experiments.linear_probe, module="revisit_tf")

# Builders: only ever referenced from gin (`@build_trunk`), so registering
# them leaves the library functions themselves untouched.

# --- models (trunks) ---
gin.register(factory.build_trunk, module="revisit_tf.models")
# --- pretext tasks: heads, losses, pretext models ---
gin.register(losses.softmax_xent, module="revisit_tf.train")
gin.register(losses.triplet_semihard, module="revisit_tf.train")
gin.register(losses.correct_top1, module="revisit_tf.train")
gin.register(losses.classification_metrics, module="revisit_tf.train")
gin.register(losses.nearest_neighbour_correct, module="revisit_tf.train")
gin.register(pretext.build_jigsaw_model, module="revisit_tf.models")
gin.register(pretext.build_rel_patch_model, module="revisit_tf.models")
gin.external_configurable(
    permutations.get_permutations, name="jigsaw_permutations", module="revisit_tf.pp"
)
# --- probes ---


def gin_search_paths() -> list[str]:
    """Directories holding the shipped gin files, most specific first.

    The source tree's ``gin/`` (editable installs, checkouts) and
    ``<prefix>/share/revisit_tf/gin`` (wheel installs, see setup.cfg
    data_files). Used so that ``--gin_file=demo/fashion_mnist_rotation.gin``
    works from any working directory.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.path.join(os.path.dirname(here), "gin"),
        os.path.join(sysconfig.get_path("data"), "share", "revisit_tf", "gin"),
    ]
    return [p for p in candidates if os.path.isdir(p)]
