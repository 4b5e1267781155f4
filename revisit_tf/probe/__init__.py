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
  * ``lbfgs``: whole-batch multinomial logistic regression, L-BFGS with TFP's
    line search run on the logits, warm-started L2 path (the default probe);
  * ``sharded``: the same objective summed over shards streamed from the
    cache and reduced across a strategy's replicas (TFP ``lbfgs_minimize``);
  * ``sgd``: the release's SGD protocol, linear or MLP head (ref. 8.4, 8.5;
    Figs. 3, 8); ``knn``: cosine k-NN accuracy;
  * ``protocols``: runs one protocol on one endpoint's cached splits;
  * ``predictions``: compact JSON encoding of per-example test predictions;
  * ``fingerprint``: the hash of everything that defines a protocol.
"""
