"""Stage 3 of the data flow: trunks, pretext heads and pretext models (Keras).

Contract:

* Input: an NHWC float batch ``image [N, H, W, C]`` as produced by the ``pp``
  stage (pretext views already flattened to the batch axis by the trainer).
* Output: a functional ``keras.Model`` whose output is a dict of endpoints
  named as in the paper code (reference ``original-system.md`` section 5.4):
  ``after_root``, ``block1`` .. ``block4`` (feature maps ``[N, h, w, c]``),
  ``pre_logits`` (``[N, c]``, global average pool) and, when a number of
  outputs is requested, ``logits`` (``[N, num_classes]``).
* Weight decay is carried by the layers as ``keras.regularizers.L2(wd / 2)``
  on kernels (reference section 6), so the training loop adds
  ``sum(model.losses)`` in training only.
* Layers are built-in Keras layers, plus RevNet's registered
  ``ReversibleStage``/``ReversibleUnit``/``ZeroPadChannels``, so models
  serialize with ``get_config``/``from_config`` and ``.keras`` files without
  ``custom_objects``.
* Every trunk takes ``data_format`` (the layout inside the trunk; inputs and
  endpoints stay NHWC), ``dtype_policy`` (mixed precision with a float32 head
  and float32 endpoints), ``sync_batchnorm`` and the widening factor ``width``.
* Builders take every option as an argument; nothing here reads gin, flags or
  environment variables (``revisit_tf.configurables`` registers the builders
  with gin).

Builders:

* ``build_trunk(architecture, ...)`` - the network factory (reference 5.5):
  ``resnet50_v1``, ``resnet50_v2``, ``revnet50``, ``vgg19``.
* ``build_resnet`` - ResNet50 v1 and v2 (and the v2 "(-)" variant without the
  final ReLU) with widening factor k (reference 5.1).
* ``build_revnet`` - RevNet50 (reference 5.2), with an invertible unit and
  memory-saving reversible backpropagation.
* ``build_vgg19`` - VGG19 with batch norm (reference 5.3); it also has
  ``block5`` and ``fc6`` endpoints and no ``after_root``.
* ``heads`` - the Jigsaw/RPL patch head (``build_patch_head``,
  ``PatchCombine``; reference 4.3, 4.4).
* ``pretext`` - trunk + head pretext models for the patch tasks
  (``build_jigsaw_model``, ``build_rel_patch_model``); Rotation, Exemplar and
  the supervised baseline use the trunk's own ``logits``.
"""

from revisit_tf.models.factory import ARCHITECTURES, build_trunk
from revisit_tf.models.heads import PatchCombine, build_patch_head
from revisit_tf.models.pretext import (
    REL_PATCH_TABLE,
    build_jigsaw_model,
    build_patch_model,
    build_rel_patch_model,
    get_table,
    get_trunk,
)
from revisit_tf.models.resnet import ENDPOINTS, build_resnet, count_params
from revisit_tf.models.revnet import build_revnet
from revisit_tf.models.vgg import build_vgg19

__all__ = [
    "ARCHITECTURES",
    "ENDPOINTS",
    "REL_PATCH_TABLE",
    "PatchCombine",
    "build_jigsaw_model",
    "build_patch_head",
    "build_patch_model",
    "build_rel_patch_model",
    "build_resnet",
    "build_revnet",
    "build_trunk",
    "build_vgg19",
    "count_params",
    "get_table",
    "get_trunk",
]
