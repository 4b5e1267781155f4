"""Stage 4: training under a tf.distribute strategy.

Contract: a model (image -> ``{"logits", endpoints...}``), a dataset function of
pretext batches ``{"image": [B, K, H, W, C], "label": [B, K]}`` and a strategy
-> checkpoints in ``<workdir>/checkpoints``, TensorBoard scalars in
``<workdir>/tensorboard``, a readable log. ``strategy`` makes strategies by
name, ``optim`` the reference schedule and SGD, ``losses`` per-row losses,
``checkpoint`` preemption-safe checkpoints, ``loop`` the explicit loop.
"""
