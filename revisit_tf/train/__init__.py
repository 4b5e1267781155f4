"""Stage 4: training under a tf.distribute strategy.

Contract: a pretext model (``models.pretext.build_pretext_model``: the batch
dict -> ``{"logits", ..., **endpoints}``), a dataset function of per-replica
batches (a dict whose leading axis is ``B`` source examples, e.g.
``{"image": [B, K, H, W, C], "label": [B, K]}``), the task's
``loss_fn(batch, outputs) -> [B]`` and ``metric_fn(batch, outputs) ->
{name: [B]}``, an optimizer and a strategy -> checkpoints in
``<workdir>/checkpoints``, TensorBoard scalars in ``<workdir>/tensorboard``,
a readable log. The loop averages the per-example loss over the global batch
and knows nothing else of the task.

Modules: ``strategy`` makes strategies by name; ``optim`` the optimizers
(``sgd``, ``adam``, ``adamw``, ``lars`` from ``lars``) and schedules
(``reference_schedule``, ``cosine_schedule``); ``losses`` the contract, its
helpers and the classification objectives; ``triplet`` (Exemplar),
``contrastive`` (SimCLR) and ``reconstruction`` (inpainting) the other
objectives; ``checkpoint`` preemption-safe checkpoints; ``loop`` the explicit
loop.
"""
