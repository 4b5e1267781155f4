"""Stage 3 of the data flow: trunks (and, later, pretext heads) as Keras models.

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
* Only built-in Keras layers are used: models serialize with
  ``get_config``/``from_config`` and ``.keras`` files without custom objects.
* Builders take every option as an argument; nothing here reads gin, flags or
  environment variables (``revisit_tf.configurables`` registers the builders
  with gin).

Builders:

* ``build_resnet`` - ResNet50 v1 and v2 (and the v2 "(-)" variant without the
  final ReLU) with widening factor k (reference 5.1).
"""

from revisit_tf.models.resnet import ENDPOINTS, build_resnet, count_params

__all__ = ["ENDPOINTS", "build_resnet", "count_params"]
