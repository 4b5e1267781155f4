"""Stage 3 of the data flow: trunks, pretext heads and pretext models (Keras).

Contract:

* Input: trunks take an NHWC float batch ``image [N, H, W, C]``; pretext
  models (``pretext.build_pretext_model``) take the whole ``pp`` batch dict
  and flatten the views ``[B, K, H, W, C] -> [B * K, H, W, C]`` themselves.
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
* ``pretext`` - ``build_pretext_model``, the one assembler of every pretext
  model: the batch dict in, views flattened, the trunk nested as ``trunk``,
  an optional head, ``{"logits", ..., **endpoints}`` out; ``get_trunk``.
* ``heads`` - head builders ``head_fn(endpoints, inputs) -> outputs``: the
  Jigsaw/RPL patch heads (``jigsaw_head``, ``rel_patch_head``; reference 4.3,
  4.4), SimCLR's ``projection_head`` and the inpainting decoder
  (``inpainting_decoder``). Rotation, Exemplar and the supervised baseline use
  the trunk's own ``logits``.
"""

from revisit_tf.models.factory import ARCHITECTURES, build_trunk
from revisit_tf.models.heads import (
    REL_PATCH_TABLE,
    PatchCombine,
    build_patch_head,
    inpainting_decoder,
    jigsaw_head,
    projection_head,
    rel_patch_head,
)
from revisit_tf.models.pretext import (
    TRUNK_NAME,
    build_pretext_model,
    example_spec,
    get_trunk,
    workdir_files,
)
from revisit_tf.models.resnet import ENDPOINTS, build_resnet, count_params
from revisit_tf.models.revnet import build_revnet
from revisit_tf.models.vgg import build_vgg19

__all__ = [
    "ARCHITECTURES",
    "ENDPOINTS",
    "REL_PATCH_TABLE",
    "TRUNK_NAME",
    "PatchCombine",
    "build_patch_head",
    "build_pretext_model",
    "build_resnet",
    "build_revnet",
    "build_trunk",
    "build_vgg19",
    "count_params",
    "example_spec",
    "get_trunk",
    "inpainting_decoder",
    "jigsaw_head",
    "projection_head",
    "rel_patch_head",
    "workdir_files",
]
