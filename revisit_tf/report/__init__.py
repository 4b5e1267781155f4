"""Stage 7, report: probe result files -> paper-style markdown tables.

Contract:
  * input: JSON-lines files, one JSON object per line, as written by the probe
    stage into ``<workdir>/probe/results.jsonl`` (one line per model x
    endpoint: ``model``, ``endpoint``, ``l2``, ``n_train``/``n_val``/``n_test``,
    ``iterations``, ``converged``, ``train_top1``/``val_top1``/``test_top1`` as
    fractions in [0, 1], ``seconds``, optionally ``published_top1`` and
    ``workdir``);
    rows from ``linear_probe`` also carry ``protocol``, ``subset``,
    ``fingerprint``, ``protocol_spec`` and ``test_predictions`` (the final
    model's predicted class per test example: ``{n, dtype, predictions,
    correct, labels_sha256}``, see ``revisit_tf.probe.predictions``; equal
    ``labels_sha256`` = same test images in the same order), and SGD/MLP rows
    ``lr_curve`` (per epoch: ``epoch``, ``lr``, ``loss``, ``val_top1``,
    ``test_top1``); the tables print neither;
  * output: markdown text (``tables.report_tables``: ``probe_table``, and the
    per-endpoint and per-subset tables of the paper's Figs. 5 and 7),
    accuracies printed in percent as in the paper's Tables 1 and 2
    (reference section 12). Rows with different protocol fingerprints are
    never shown in one column without a mark and a note saying so.

Modules:
  * ``results``: ``append_result`` (crash-safe append of one line) and
    ``read_results`` (files or workdirs -> list of dicts);
  * ``tables``: ``markdown_table`` (generic, key-driven number formatting),
    ``probe_table`` (deduplicated, ordered probe report), ``endpoint_table``,
    ``subset_table`` and ``report_tables`` (what ``revisit-report`` prints).

The format is append-only like big_vision's metric logs: several probe runs
can write to the same file and results from many workdirs merge by
concatenation. Nothing here imports TensorFlow.
"""
