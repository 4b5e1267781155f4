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

Online rows (``probe.online``: probes of the live trunk during pretraining,
marked ``online: true`` and by their protocol) are never mixed with offline
probe rows: ``report_tables`` splits the rows first, the offline tables get
only offline rows and the online rows get ``online_table`` of their own.

A value that is not a number (a string, a bool, a list) in a number column
(accuracies, ``l2``, ``seconds``) is an error naming the row and the field,
never a cell: ``"0.84"`` shown verbatim under ``test top-1 (%)`` would read
as 0.84%. (``results.read_results`` rejects such rows already, naming file and
line.)
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
# probe.fingerprint.ONLINE_KEY (the report imports no TensorFlow, so not from
# there; tests/test_online_eval.py checks they agree).
ONLINE_KEY = "online"


def _is_accuracy(key: str) -> bool:
    return key.endswith(("top1", "top5"))


def _is_number_column(key: str) -> bool:
    return (
        _is_accuracy(key)
        or key in ("l2", "seconds")
        or key.endswith(("_l2", "_seconds"))
    )


def format_value(key: str, value: Any) -> str:
    """Formats one cell; the rules are in the module docstring.

    Args:
        key: the column key (decides the number format).
        value: the row's value for it (None when absent).

    Returns:
        The cell text, with ``|`` escaped so it cannot break the table.

    Raises:
        ValueError: for an accuracy outside [0, 1] or a non-finite accuracy,
            or a non-number (string, bool, ...) in a number column.
    """
    if hasattr(value, "item") and callable(value.item):  # NumPy scalar
        value = value.item()
    if value is None:
        return _MISSING
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number and _is_number_column(key):
        raise ValueError(
            f"{key} must be a number; got {value!r} ({type(value).__name__}). "
            "A non-number is never printed in a number column."
        )
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
    for index, row in enumerate(rows):
        try:
            cells = [format_value(key, row.get(key)) for key, _ in columns]
        except ValueError as e:
            who = ", ".join(
                f"{k} {row[k]!r}" for k in ("model", "endpoint") if k in row
            )
            raise ValueError(f"row {index}{f' ({who})' if who else ''}: {e}") from None
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


def _check_required(rows: Sequence[Mapping[str, Any]]) -> None:
    for index, row in enumerate(rows):
        missing = [key for key in _REQUIRED_PROBE_KEYS if row.get(key) is None]
        if missing:
            raise ValueError(
                f"probe result row {index} lacks {missing}; required keys are "
                f"{list(_REQUIRED_PROBE_KEYS)}. Row: {dict(row)!r}"
            )


def _subset_label(fraction: Any) -> str:
    if fraction is None:
        return "100%"
    return f"{100 * float(fraction):.3g}%"


def _latest(rows: Sequence[Mapping[str, Any]], key_fn) -> list[Mapping[str, Any]]:
    """Newest row per key (files are append-only: later = newer), first-seen order."""
    latest: dict[Any, Mapping[str, Any]] = {}
    for row in rows:
        latest[key_fn(row)] = row
    order = {}
    for row in rows:
        order.setdefault(key_fn(row), len(order))
    return [latest[k] for k in sorted(latest, key=order.get)]


class _Protocols:
    """Letters for fingerprints, and the note that explains them.

    A result without a fingerprint (written before fingerprints existed) gets
    ``?``: its protocol is unknown, so it never silently matches another.
    """

    def __init__(self):
        self.letters: dict[str | None, str] = {}
        self.specs: dict[str | None, Mapping[str, Any] | None] = {}
        self.mixed: list[str] = []

    def letter(self, row: Mapping[str, Any]) -> str:
        fp = row.get("fingerprint")
        if fp not in self.letters:
            self.letters[fp] = "?" if fp is None else chr(ord("a") + len(self.letters))
            self.specs[fp] = row.get("protocol_spec")
        return self.letters[fp]

    def note(self) -> str:
        if not self.mixed:
            return ""
        lines = [
            "",
            f"Protocols differ within {', '.join(self.mixed)}: cells are marked "
            "with their protocol; compare only cells with the same mark.",
        ]
        specs = [(letter, self.specs[fp], fp) for fp, letter in self.letters.items()]
        first = specs[0][1]
        for letter, spec, fp in specs:
            if fp is None:
                lines.append(f"- [{letter}] no fingerprint (older result).")
                continue
            text = f"- [{letter}] fingerprint {fp}"
            if first is not None and spec is not None and spec is not first:
                keys = _differences(first, spec)
                text += f" (differs from [{specs[0][0]}] in: {', '.join(keys)})"
            lines.append(text + ".")
        return "\n".join(lines) + "\n"


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    def flat(spec, prefix=""):
        out = {}
        for k, v in spec.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = repr(v)
        return out

    fa, fb = flat(a), flat(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def probe_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The linear-probe report: one line per (model, endpoint[, protocol, subset]).

    Rows follow the probe's result schema (package docstring). Order and
    deduplication:

      * rows are keyed by ``(model, endpoint, workdir, protocol, subset,
        fingerprint)`` (each may be absent); when a key repeats, the later row
        wins, as files are append only and ``read_results`` keeps file and
        line order (later = newer);
      * models keep the order in which they first appear (the caller chooses
        it, e.g. by the order of the paths given to the report; the paper's
        tables are organised by model, too) and within a model endpoints go
        in network-depth order (``after_root`` ... ``pre_logits``,
        ``logits``, then unknown names alphabetically), the order of the
        paper's Fig. 5 comparison across depths;
      * if one (model, endpoint) comes from several workdirs, all are kept
        and a ``workdir`` column is added so the lines can be told apart;
      * ``protocol`` and ``subset`` columns appear when any row is not the
        default (L-BFGS on all labels);
      * rows measured under different protocol fingerprints are never shown
        as one column silently: a ``proto`` column marks each row's protocol
        and a note under the table lists the fingerprints and what differs;
      * a ``published top-1`` column appears when any row has
        ``published_top1`` (a fraction, like the other accuracies).

    Args:
        rows: result rows; each needs ``model``, ``endpoint`` and
            ``test_top1``; other fields print ``-`` when absent.

    Returns:
        Markdown text (see ``markdown_table``), plus the protocol note.

    Raises:
        ValueError: for a row that misses a required key (naming the row's
            index and the key) or has a malformed value.
    """
    _check_required(rows)

    def key(row):
        return (
            str(row["model"]),
            str(row["endpoint"]),
            row.get("workdir"),
            row.get("protocol"),
            row.get("subset"),
            row.get("fingerprint"),
        )

    model_order: dict[str, int] = {}
    arrival: dict[tuple, int] = {}
    for index, row in enumerate(rows):
        model_order.setdefault(str(row["model"]), len(model_order))
        arrival.setdefault(key(row), index)
    latest = _latest(rows, key)
    latest.sort(
        key=lambda r: (
            model_order[str(r["model"])],
            _endpoint_rank(str(r["endpoint"])),
            arrival[key(r)],
        )
    )
    protocols = _Protocols()
    display = []
    for row in latest:
        out = dict(row)
        out["n_splits"] = _split_sizes(row)
        out["proto"] = protocols.letter(row)
        if row.get("subset") is not None:
            out["subset_label"] = _subset_label(row["subset"])
        display.append(out)

    columns = [("model", "model"), ("endpoint", "endpoint")]
    model_endpoints = [
        (r["model"], r["endpoint"], r.get("protocol"), r.get("subset")) for r in latest
    ]
    if len(set(model_endpoints)) < len(model_endpoints) and any(
        r.get("workdir") for r in latest
    ):
        columns.append(("workdir", "workdir"))
    if any(r.get("protocol", "lbfgs") != "lbfgs" for r in latest):
        columns.append(("protocol", "protocol"))
    if any(r.get("subset", 1.0) not in (None, 1.0) for r in latest):
        columns.append(("subset_label", "labels"))
    if len(protocols.letters) > 1:
        columns.append(("proto", "proto"))
        protocols.mixed.append("the table")
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
    return markdown_table(display, columns) + protocols.note()


def _pivot(
    rows: Sequence[Mapping[str, Any]],
    *,
    row_key,
    row_columns: Sequence[tuple[str, str]],
    column_of,
    column_order,
) -> str:
    """Test top-1 of ``rows`` as a table: one line per ``row_key``, one column
    per ``column_of(row)``; mixed fingerprints within a column are marked."""
    _check_required(rows)
    latest = _latest(rows, lambda r: (row_key(r), column_of(r), r.get("fingerprint")))
    names = sorted({column_of(r) for r in latest}, key=column_order)
    lines: dict[Any, dict[str, Any]] = {}
    cells: dict[tuple[Any, str], list[Mapping[str, Any]]] = {}
    for row in latest:
        lines.setdefault(row_key(row), {k: row.get(k) for k, _ in row_columns})
        cells.setdefault((row_key(row), column_of(row)), []).append(row)
    protocols = _Protocols()
    for row in latest:
        protocols.letter(row)
    mixed_columns = []
    for name in names:
        fps = {r.get("fingerprint") for r in latest if column_of(r) == name}
        if len(fps) > 1:
            mixed_columns.append(name)
    protocols.mixed = [f"column {name}" for name in mixed_columns]
    display = []
    for line_key, line in lines.items():
        out = dict(line)
        for name in names:
            found = cells.get((line_key, name), [])
            texts = []
            for r in found:
                text = format_value("test_top1", r["test_top1"])
                if name in mixed_columns:
                    text += f" [{protocols.letter(r)}]"
                texts.append(text)
            out[f"col:{name}"] = " / ".join(texts) if texts else None
        display.append(out)
    columns = list(row_columns) + [(f"col:{n}", n) for n in names]
    return markdown_table(display, columns) + protocols.note()


def endpoint_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Test top-1 (%) per endpoint: one line per (model, protocol, labels).

    Columns go in network depth (``after_root`` ... ``logits``), as the
    paper's Fig. 5 compares representations across depth.

    Raises:
        ValueError: as ``probe_table``.
    """
    prepared = [
        {
            **r,
            "protocol": r.get("protocol", "lbfgs"),
            "labels": _subset_label(r.get("subset")),
        }
        for r in rows
    ]
    return _pivot(
        prepared,
        row_key=lambda r: (r["model"], r["protocol"], r["labels"], r.get("workdir")),
        row_columns=[
            ("model", "model"),
            ("protocol", "protocol"),
            ("labels", "labels"),
        ],
        column_of=lambda r: str(r["endpoint"]),
        column_order=_endpoint_rank,
    )


def subset_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Test top-1 (%) per fraction of training labels (paper Fig. 7).

    One line per (model, endpoint, protocol); columns from fewest labels to
    all.

    Raises:
        ValueError: as ``probe_table``.
    """
    prepared = [
        {
            **r,
            "protocol": r.get("protocol", "lbfgs"),
            "fraction": 1.0 if r.get("subset") is None else float(r["subset"]),
        }
        for r in rows
    ]
    return _pivot(
        prepared,
        row_key=lambda r: (r["model"], r["endpoint"], r["protocol"], r.get("workdir")),
        row_columns=[
            ("model", "model"),
            ("endpoint", "endpoint"),
            ("protocol", "protocol"),
        ],
        column_of=lambda r: _subset_label(r["fraction"]),
        column_order=lambda name: float(name.rstrip("%")),
    )


def is_online_row(row: Mapping[str, Any]) -> bool:
    """True for a row of an online evaluation (``ONLINE_KEY``, in the row or
    in its ``protocol_spec``): such rows never enter the offline tables."""
    spec = row.get("protocol_spec")
    return row.get(ONLINE_KEY) is True or (
        isinstance(spec, Mapping) and spec.get(ONLINE_KEY) is True
    )


def split_online(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """``(offline rows, online rows)``, each in the given order."""
    offline = [r for r in rows if not is_online_row(r)]
    online = [r for r in rows if is_online_row(r)]
    return offline, online


_REQUIRED_ONLINE_KEYS = ("model", "endpoint", "protocol", "step", "top1")


def online_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Online evaluation during pretraining: one line per (model, endpoint,
    method, step), steps ascending, the newest row of a repeated key winning.

    ``top-1`` is on the scored subset (``protocol_spec.splits.score``), not on
    a test split: compare it across steps and runs of one protocol, never with
    the offline probe's test top-1. Rows of several fingerprints get a
    ``proto`` mark and a note, as in ``probe_table``.

    Args:
        rows: online rows (``is_online_row``), each with ``model``,
            ``endpoint``, ``protocol``, ``step`` and ``top1``.

    Raises:
        ValueError: an offline row, a row that misses a required key, or a
            malformed value.
    """
    for index, row in enumerate(rows):
        if not is_online_row(row):
            raise ValueError(
                f"row {index} is not an online row; online_table takes only "
                "rows of probe.online (see split_online)."
            )
        missing = [k for k in _REQUIRED_ONLINE_KEYS if row.get(k) is None]
        if missing:
            raise ValueError(f"online row {index} lacks {missing}. Row: {dict(row)!r}")

    def key(row):
        return (
            str(row["model"]),
            row.get("workdir"),
            str(row["endpoint"]),
            str(row["protocol"]),
            int(row["step"]),
            row.get("fingerprint"),
        )

    model_order: dict[str, int] = {}
    for row in rows:
        model_order.setdefault(str(row["model"]), len(model_order))
    latest = _latest(rows, key)
    latest.sort(
        key=lambda r: (
            model_order[str(r["model"])],
            str(r.get("workdir")),
            _endpoint_rank(str(r["endpoint"])),
            str(r["protocol"]),
            int(r["step"]),
        )
    )
    protocols = _Protocols()
    display = []
    for row in latest:
        out = dict(row)
        out["method"] = str(row["protocol"]).removeprefix("online_")
        out["proto"] = protocols.letter(row)
        sizes = [row.get("n_fit"), row.get("n_score")]
        out["n_sizes"] = "/".join(_MISSING if n is None else str(n) for n in sizes)
        display.append(out)
    columns = [("model", "model")]
    names = [(r["model"], r["endpoint"], r["protocol"], r["step"]) for r in latest]
    if len(set(names)) < len(names):
        columns.append(("workdir", "workdir"))
    columns += [("endpoint", "endpoint"), ("method", "method"), ("step", "step")]
    if len(protocols.letters) > 1:
        columns.append(("proto", "proto"))
        protocols.mixed.append("the online table")
    columns += [
        ("top1", "online top-1 (%)"),
        ("train_top1", "fit top-1 (%)"),
        ("k", "k"),
        ("l2", "l2"),
        ("iterations", "iters"),
        ("n_sizes", "n fit/score"),
        ("seconds", "seconds"),
    ]
    return markdown_table(display, columns) + protocols.note()


REPORT_KINDS = ("auto", "probe", "endpoints", "subsets", "online")


def report_tables(rows: Sequence[Mapping[str, Any]], kind: str = "auto") -> str:
    """The report: ``probe_table`` and/or the per-endpoint / per-subset tables.

    Online rows (``is_online_row``) never enter the offline tables: they are
    split off first and shown only by ``online_table`` (``kind="online"``, or
    under ``"auto"`` after the offline tables).

    Args:
        rows: result rows (offline, online or both).
        kind: one of ``REPORT_KINDS``; ``"auto"`` prints the probe table and
            each pivot that has more than one column, then the online table
            if there are online rows.

    Raises:
        ValueError: unknown ``kind`` or bad rows.
    """
    if kind not in REPORT_KINDS:
        raise ValueError(f"kind must be one of {REPORT_KINDS}; got {kind!r}.")
    rows, online = split_online(rows)
    if kind == "online":
        return online_table(online)
    if kind == "auto" and online:
        online_part = (
            "Online evaluation during pretraining (top-1 (%) on the scored "
            "subset; not comparable with the offline probe):\n\n" + online_table(online)
        )
        if not rows:
            return online_part
        return report_tables(rows, kind="auto") + "\n" + online_part
    if kind == "probe":
        return probe_table(rows)
    if kind == "endpoints":
        return endpoint_table(rows)
    if kind == "subsets":
        return subset_table(rows)
    parts = [probe_table(rows)]
    if len({r.get("endpoint") for r in rows}) > 1:
        parts.append("Test top-1 (%) per endpoint:\n\n" + endpoint_table(rows))
    if len({r.get("subset", 1.0) for r in rows}) > 1:
        parts.append("Test top-1 (%) per fraction of labels:\n\n" + subset_table(rows))
    return "\n".join(parts)
