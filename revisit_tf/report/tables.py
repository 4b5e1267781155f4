"""Markdown tables from result rows.

Place in the data flow: last step. Rows come from
``revisit_tf.report.results.read_results`` (or straight from the probe); the
returned markdown is what ``tools/report.py`` prints or writes.

Formatting is driven by the column key, so every table prints numbers alike:

  * accuracies (keys ending in ``top1``/``top5``) are fractions in [0, 1] in
    the rows and are printed in percent with one decimal, like the paper's
    tables (``0.5372 -> "53.7"``); a value outside [0, 1] is an error (it
    usually means a percentage slipped in);
  * ``l2`` (and keys ending in ``_l2``) in scientific notation (``"1.0e-04"``);
  * ``seconds`` with one decimal; other floats with 4 significant digits;
  * bools as ``yes``/``no``; a missing value or None as ``-`` (the paper's
    mark for "not reported").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Network-depth order of the trunk endpoints (reference section 5.4).
ENDPOINT_ORDER = (
    "after_root",
    "block1",
    "block2",
    "block3",
    "block4",
    "pre_logits",
    "logits",
)

_MISSING = "-"


def _is_accuracy(key: str) -> bool:
    return key.endswith(("top1", "top5"))


def format_value(key: str, value: Any) -> str:
    """Formats one cell; the rules are in the module docstring.

    Args:
        key: the column key (decides the number format).
        value: the row's value for it (None when absent).

    Returns:
        The cell text, with ``|`` escaped so it cannot break the table.

    Raises:
        ValueError: for an accuracy outside [0, 1] or a non-finite accuracy.
    """
    if hasattr(value, "item") and callable(value.item):  # NumPy scalar
        value = value.item()
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if _is_accuracy(key):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(
                    f"{key} must be a fraction in [0, 1]; got {value!r} "
                    "(percentages are formatted by the table, not stored)."
                )
            return f"{100.0 * value:.1f}"
        if key == "l2" or key.endswith("_l2"):
            return "0" if value == 0 else f"{value:.1e}"
        if isinstance(value, int):
            return str(value)
        if key == "seconds" or key.endswith("_seconds"):
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value).replace("|", r"\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]
) -> str:
    """Renders rows as a GitHub-flavoured markdown table.

    Numeric columns (every present value a number, not a bool) are
    right-aligned.

    Args:
        rows: mappings from column key to value; missing keys print ``-``.
        columns: ``(key, header)`` pairs, in display order.

    Returns:
        The table, lines joined by ``"\\n"``, ending with a newline.

    Raises:
        ValueError: for no columns, a malformed column spec, or a bad value
            (see ``format_value``).
    """
    if not columns:
        raise ValueError("columns must name at least one (key, header) pair.")
    for column in columns:
        if not (
            isinstance(column, tuple)
            and len(column) == 2
            and all(isinstance(part, str) for part in column)
        ):
            raise ValueError(
                f"each column must be a (key, header) pair of strings; got {column!r}."
            )
    header = "| " + " | ".join(h.replace("|", r"\|") for _, h in columns) + " |"
    rule = []
    for key, _ in columns:
        values = [row.get(key) for row in rows if row.get(key) is not None]
        numeric = bool(values) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        )
        rule.append("---:" if numeric else "---")
    lines = [header, "| " + " | ".join(rule) + " |"]
    for row in rows:
        cells = [format_value(key, row.get(key)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _endpoint_rank(endpoint: str) -> tuple[int, str]:
    if endpoint in ENDPOINT_ORDER:
        return ENDPOINT_ORDER.index(endpoint), ""
    return len(ENDPOINT_ORDER), endpoint


def _split_sizes(row: Mapping[str, Any]) -> str:
    sizes = [row.get(k) for k in ("n_train", "n_val", "n_test")]
    return "/".join(_MISSING if n is None else str(n) for n in sizes)


_REQUIRED_PROBE_KEYS = ("model", "endpoint", "test_top1")


def probe_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The linear-probe report: one line per (model, endpoint).

    Rows follow the probe's result schema (package docstring). Order and
    deduplication:

      * rows are keyed by ``(model, endpoint, workdir)`` (``workdir`` may be
        absent); when a key repeats, the later row wins, as files are append
        only and ``read_results`` keeps file and line order (later = newer);
      * models keep the order in which they first appear (the caller chooses
        it, e.g. by the order of the paths given to the report; the paper's
        tables are organised by model, too) and within a model endpoints go
        in network-depth order (``after_root`` ... ``pre_logits``,
        ``logits``, then unknown names alphabetically), the order of the
        paper's Fig. 5 comparison across depths;
      * if one (model, endpoint) comes from several workdirs, all are kept
        and a ``workdir`` column is added so the lines can be told apart;
      * a ``published top-1`` column appears when any row has
        ``published_top1`` (a fraction, like the other accuracies).

    Args:
        rows: result rows; each needs ``model``, ``endpoint`` and
            ``test_top1``; other fields print ``-`` when absent.

    Returns:
        Markdown text (see ``markdown_table``).

    Raises:
        ValueError: for a row that misses a required key (naming the row's
            index and the key) or has a malformed value.
    """
    latest: dict[tuple[str, str, str | None], Mapping[str, Any]] = {}
    model_order: dict[str, int] = {}
    arrival: dict[tuple[str, str, str | None], int] = {}
    for index, row in enumerate(rows):
        missing = [key for key in _REQUIRED_PROBE_KEYS if row.get(key) is None]
        if missing:
            raise ValueError(
                f"probe result row {index} lacks {missing}; required keys are "
                f"{list(_REQUIRED_PROBE_KEYS)}. Row: {dict(row)!r}"
            )
        key = (str(row["model"]), str(row["endpoint"]), row.get("workdir"))
        model_order.setdefault(key[0], len(model_order))
        arrival.setdefault(key, index)
        latest[key] = row  # later rows overwrite: newest wins

    keys = sorted(
        latest,
        key=lambda k: (model_order[k[0]], _endpoint_rank(k[1]), arrival[k]),
    )
    display = []
    for k in keys:
        row = dict(latest[k])
        row["n_splits"] = _split_sizes(row)
        display.append(row)

    columns = [("model", "model"), ("endpoint", "endpoint")]
    model_endpoints = [k[:2] for k in keys]
    if len(set(model_endpoints)) < len(model_endpoints):
        columns.append(("workdir", "workdir"))
    columns += [
        ("test_top1", "test top-1 (%)"),
        ("val_top1", "val top-1 (%)"),
        ("train_top1", "train top-1 (%)"),
    ]
    if any(row.get("published_top1") is not None for row in display):
        columns.append(("published_top1", "published top-1 (%)"))
    columns += [
        ("l2", "l2"),
        ("iterations", "iters"),
        ("converged", "converged"),
        ("n_splits", "n train/val/test"),
        ("seconds", "seconds"),
    ]
    return markdown_table(display, columns)
