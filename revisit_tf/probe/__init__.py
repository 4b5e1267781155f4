"""Stage 6: the linear probe.

Contract: a SavedModel from stage 5 (or raw pixels) and labelled splits ->
``[N, D]`` features per endpoint (``features``) -> multinomial logistic
regression with an L2 penalty solved by TFP's L-BFGS, the penalty chosen on the
validation split (``lbfgs``) -> JSON-lines rows ``{model, endpoint, l2,
train/val/test top-1, ...}`` in ``<workdir>/probe/results.jsonl``.
"""
