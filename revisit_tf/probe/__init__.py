"""Stage 6: probes of frozen features (the paper's evaluation suite).

Contract: a SavedModel from stage 5 (or raw pixels) and labelled splits ->
``[N, D]`` features per endpoint and split, extracted once into a sharded,
checked feature cache (``features``, ``cache``) -> one probe per (endpoint,
protocol, label subset) (``protocols``) -> JSON-lines rows ``{model,
endpoint, protocol, subset, fingerprint, train/val/test top-1,
test_predictions, ...}`` in ``<workdir>/probe/results.jsonl``.
``test_predictions`` (``predictions``) encodes the final model's predicted
class per test example plus a digest of the test labels, for paired
bootstraps over the same test images; SGD/MLP rows' ``lr_curve`` gives per
epoch ``epoch``, ``lr``, ``loss``, ``val_top1`` and ``test_top1``.

Modules, in data-flow order:
  * ``features``: SavedModel / pixel features, max-pooled to 9000 (ref. 8.2);
  * ``cache``: shards on disk keyed by a hash of (SavedModel content,
    endpoint, pooling, preprocessing, dataset, split); half-written or corrupt
    entries are detected and rebuilt;
  * ``subsets``: class-balanced, seeded, nested label subsets (Fig. 7);
  * ``validation``, ``model``, ``objective``, ``precondition``, ``solver``,
    ``sweep``: the L-BFGS probe by responsibility (input checks; fits and
    results; ``J`` and its gradient; the eigen-preconditioner; one L-BFGS
    driver with the line search on the logits; one L2 path that extends past
    an edge pick), behind ``lbfgs`` (whole-batch) and ``shard_data`` /
    ``sharded`` (streamed from the cache, reduced across replicas);
  * ``lbfgs_path``: the ``lbfgs`` protocol's path, refit and test predictions;
  * ``sgd``: the release's SGD protocol on cached features, linear or MLP
    head (ref. 8.4, 8.5; Figs. 3, 8); ``augmented``: the same on crops
    re-drawn at every step through the frozen export; ``knn``: cosine k-NN;
  * ``protocols``: the registered protocols; runs one on one endpoint's
    cached splits; ``online``: probes of the live trunk during pretraining;
  * ``predictions``: compact JSON encoding of per-example test predictions;
  * ``fingerprint``: the hash of everything that defines a protocol.
"""
