"""revisit_tf: "Revisiting Self-Supervised Visual Representation Learning".

Kolesnikov, Zhai and Beyer, CVPR 2019, re-implemented in Keras 3 / TensorFlow 2.
The package is laid out in data-flow order, one sub-package per stage:

1. ``data``    - sources by name -> ``{"image": uint8 [H,W,C], "label": int64}``,
                 sharded/shuffled/batched input pipelines.
2. ``pp``      - pretext preprocessing: registered ops composed by ``|``-strings;
                 every pretext label is made here.
3. ``models``  - trunks (ResNet50 v1, ...) as Keras functional models with named
                 endpoints ``after_root``, ``block1``..``block4``, ``pre_logits``.
4. ``train``   - an explicit training loop under a ``tf.distribute`` strategy.
5. ``export``  - a SavedModel reusable TF-Hub style (every endpoint by name).
6. ``probe``   - linear logistic-regression probe solved with TFP's L-BFGS.
7. ``report``  - JSON-lines results -> markdown tables.
8. ``study``   - a grid of pretext x trunk x width x seed run as a resumable
                 DAG of jobs (local or SLURM) and drawn as the paper's
                 Table 1 and Figs. 2-8.

``experiments`` holds the roots that chain the stages; ``configurables`` is the
only library module that knows about gin.
"""

__version__ = "0.1.0"
