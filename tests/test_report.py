"""Tests for revisit_tf.report: JSON-lines results and markdown tables."""

import json
import logging
import re

import numpy as np
import pytest

from revisit_tf.report import results, tables


def _probe_row(**overrides):
    row = {
        "model": "rotation",
        "endpoint": "pre_logits",
        "l2": 1e-4,
        "n_train": 1000,
        "n_val": 200,
        "n_test": 500,
        "iterations": 87,
        "converged": True,
        "train_top1": 0.91234,
        "val_top1": 0.5,
        "test_top1": 0.53749,
        "seconds": 12.345,
    }
    row.update(overrides)
    return row


def test_append_and_read_round_trip_with_numpy_values(tmp_path):
    path = tmp_path / "new" / "dir" / "results.jsonl"  # parents are created
    first = {
        "model": "rotation",
        "l2": np.float32(0.25),
        "iterations": np.int64(7),
        "converged": np.bool_(True),
        "weights_norm": np.array([1.5, 2.0]),
        "note": None,
    }
    second = {"model": "raw pixels", "test_top1": 0.125}
    results.append_result(str(path), first)
    results.append_result(path, second)

    text = path.read_text()
    assert text.count("\n") == 2 and text.endswith("\n")
    # Each line is standalone JSON; the numpy values became plain JSON values.
    assert json.loads(text.splitlines()[0]) == {
        "model": "rotation",
        "l2": 0.25,
        "iterations": 7,
        "converged": True,
        "weights_norm": [1.5, 2.0],
        "note": None,
    }
    assert results.read_results([str(path)]) == [
        json.loads(line) for line in text.splitlines()
    ]
    assert results.read_results([path])[1] == second


def test_append_rejects_unserialisable_values(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match=r"row\['loss'\] is nan"):
        results.append_result(path, {"loss": float("nan")})
    with pytest.raises(ValueError, match=r"row\['fn'\] has type function"):
        results.append_result(path, {"fn": lambda: 0})
    with pytest.raises(ValueError, match="row must be a mapping"):
        results.append_result(path, [1, 2])
    assert not path.exists() or path.read_text() == ""


def test_read_workdir_adds_workdir_and_keeps_order(tmp_path):
    workdir = tmp_path / "run1"
    other = tmp_path / "extra.jsonl"
    results.append_result(results.results_path(workdir), {"a": 1})
    results.append_result(results.results_path(workdir), {"a": 2, "workdir": "x"})
    results.append_result(other, {"a": 3})
    rows = results.read_results([workdir, other])
    assert rows == [
        {"a": 1, "workdir": str(workdir)},
        {"a": 2, "workdir": "x"},
        {"a": 3},
    ]


def test_read_rejects_paths_that_are_neither_file_nor_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results.read_results([tmp_path / "missing.jsonl"])
    with pytest.raises(FileNotFoundError, match="directory without probe"):
        results.read_results([tmp_path])
    with pytest.raises(ValueError, match="sequence of paths"):
        results.read_results(str(tmp_path))


def test_malformed_line_error_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,,}\n{"a": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: malformed JSON line"):
        results.read_results([path])
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object"):
        results.read_results([path])


def test_torn_last_line_is_skipped_on_read_and_repaired_on_append(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b"')  # crash in the middle of line 2
    with caplog.at_level(logging.WARNING):
        assert results.read_results([path]) == [{"a": 1}]
    assert "torn last line" in caplog.text

    results.append_result(path, {"a": 3})
    assert path.read_text() == '{"a": 1}\n{"a": 3}\n'

    # A complete last line that only lacks its newline is kept.
    path.write_text('{"a": 1}\n{"a": 2}')
    assert results.read_results([path]) == [{"a": 1}, {"a": 2}]
    results.append_result(path, {"a": 3})
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 3}\n'


def test_markdown_table_formats_by_column_key():
    rows = [
        {"name": "a|b", "test_top1": 0.53749, "l2": 1e-4, "seconds": 2.26, "ok": True},
        {"name": "c", "test_top1": np.float64(1.0), "l2": 0.0, "n": 3},
    ]
    columns = [
        ("name", "name"),
        ("test_top1", "top-1 (%)"),
        ("l2", "l2"),
        ("seconds", "s"),
        ("ok", "ok"),
        ("n", "n"),
    ]
    assert tables.markdown_table(rows, columns) == (
        "| name | top-1 (%) | l2 | s | ok | n |\n"
        "| --- | ---: | ---: | ---: | --- | ---: |\n"
        "| a\\|b | 53.7 | 1.0e-04 | 2.3 | yes | - |\n"
        "| c | 100.0 | 0 | - | - | 3 |\n"
    )


def test_markdown_table_rejects_percentages_and_bad_columns():
    with pytest.raises(ValueError, match=r"test_top1 must be a fraction in \[0, 1\]"):
        tables.markdown_table([{"test_top1": 53.7}], [("test_top1", "top-1")])
    with pytest.raises(ValueError, match="at least one"):
        tables.markdown_table([], [])
    with pytest.raises(ValueError, match=r"\(key, header\) pair"):
        tables.markdown_table([], [("only_key",)])


def test_probe_table_header_and_known_row():
    text = tables.probe_table([_probe_row()])
    lines = text.splitlines()
    assert lines[0] == (
        "| model | endpoint | test top-1 (%) | val top-1 (%) | train top-1 (%) "
        "| l2 | iters | converged | n train/val/test | seconds |"
    )
    assert lines[2] == (
        "| rotation | pre_logits | 53.7 | 50.0 | 91.2 | 1.0e-04 | 87 | yes "
        "| 1000/200/500 | 12.3 |"
    )
    assert len(lines) == 3


def test_probe_table_dedupes_newest_and_orders_models_then_depth():
    rows = [
        _probe_row(model="rotation", endpoint="pre_logits", test_top1=0.10),
        _probe_row(model="random init", endpoint="block4", test_top1=0.05),
        _probe_row(model="rotation", endpoint="block3", test_top1=0.20),
        _probe_row(model="rotation", endpoint="pre_logits", test_top1=0.30),  # newer
        _probe_row(
            model="raw pixels", endpoint="image", test_top1=0.04, published_top1=0.03
        ),
    ]
    lines = tables.probe_table(rows).splitlines()
    assert "published top-1 (%)" in lines[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(c[0], c[1], c[2]) for c in cells] == [
        ("rotation", "block3", "20.0"),
        ("rotation", "pre_logits", "30.0"),
        ("random init", "block4", "5.0"),
        ("raw pixels", "image", "4.0"),
    ]
    assert cells[3][5] == "3.0" and cells[0][5] == "-"  # published column


def test_probe_table_separates_workdirs_and_requires_keys():
    rows = [_probe_row(workdir="w1"), _probe_row(workdir="w2", test_top1=0.6)]
    lines = tables.probe_table(rows).splitlines()
    assert lines[0].startswith("| model | endpoint | workdir | test top-1 (%)")
    assert lines[2].startswith("| rotation | pre_logits | w1 | 53.7 |")
    assert lines[3].startswith("| rotation | pre_logits | w2 | 60.0 |")

    bad = _probe_row()
    del bad["test_top1"]
    with pytest.raises(ValueError, match=r"row 1 lacks \['test_top1'\]"):
        tables.probe_table([_probe_row(), bad])


def _fp_row(endpoint, top1, fingerprint="fp-a", **extra):
    spec = {"protocol": "lbfgs", "settings": {"l2_grid": [0.1]}, "subset": 1.0}
    spec.update(extra.pop("spec", {}))
    return _probe_row(
        endpoint=endpoint,
        test_top1=top1,
        fingerprint=fingerprint,
        protocol_spec=spec,
        **extra,
    )


def test_endpoint_table_orders_by_depth_and_marks_mixed_protocols():
    rows = [
        _fp_row("pre_logits", 0.50),
        _fp_row("block3", 0.40),
        _fp_row("block3", 0.45, model="random init"),
        # Same column, another protocol: must be marked, not silently mixed.
        _fp_row(
            "pre_logits",
            0.30,
            "fp-b",
            model="random init",
            spec={"settings": {"l2_grid": [0.2]}},
        ),
    ]
    text = tables.endpoint_table(rows)
    lines = text.splitlines()
    assert lines[0] == "| model | protocol | labels | block3 | pre_logits |"
    assert lines[2] == "| rotation | lbfgs | 100% | 40.0 | 50.0 [a] |"
    assert lines[3] == "| random init | lbfgs | 100% | 45.0 | 30.0 [b] |"
    assert "Protocols differ within column pre_logits" in text
    assert "[b] fingerprint fp-b (differs from [a] in: settings.l2_grid)" in text
    # One protocol per column: no marks, no note.
    clean = tables.endpoint_table(rows[:3])
    assert "[a]" not in clean and "Protocols differ" not in clean


def test_subset_table_has_one_column_per_fraction():
    rows = [
        _fp_row("pre_logits", 0.6, "f100", subset=1.0),
        _fp_row("pre_logits", 0.2, "f1", subset=0.01),
        _fp_row("pre_logits", 0.4, "f10", subset=0.1),
    ]
    lines = tables.subset_table(rows).splitlines()
    assert lines[0] == "| model | endpoint | protocol | 1% | 10% | 100% |"
    assert lines[2] == "| rotation | pre_logits | lbfgs | 20.0 | 40.0 | 60.0 |"


def test_probe_table_marks_rows_with_different_fingerprints():
    rows = [_fp_row("pre_logits", 0.5), _fp_row("pre_logits", 0.6, "fp-b")]
    text = tables.probe_table(rows)
    header = text.splitlines()[0]
    assert "| proto |" in header
    assert len([line for line in text.splitlines() if "| rotation |" in line]) == 2
    assert "Protocols differ within the table" in text
    # Rows written before fingerprints existed are marked unknown, not merged.
    old = _probe_row()
    text = tables.probe_table([old, _fp_row("pre_logits", 0.6)])
    assert "no fingerprint (older result)" in text


def test_report_tables_auto_adds_pivots_only_when_useful():
    single = tables.report_tables([_fp_row("pre_logits", 0.5)])
    assert "per endpoint" not in single and "per fraction" not in single
    rows = [_fp_row("pre_logits", 0.5), _fp_row("block4", 0.4)]
    assert "Test top-1 (%) per endpoint:" in tables.report_tables(rows)
    with pytest.raises(ValueError, match="kind must be one of"):
        tables.report_tables(rows, kind="pivot")


def test_tables_do_not_print_test_predictions_or_curves(tmp_path):
    from revisit_tf.probe import predictions

    labels = np.arange(500) % 10
    encoded = predictions.encode_predictions((labels + 1) % 10, labels)
    curve = [{"epoch": 1, "lr": 0.1, "loss": 2.0, "val_top1": 0.4, "test_top1": 0.5}]
    extra = dict(test_predictions=encoded, lr_curve=curve, protocol="sgd")
    rows = [
        _fp_row("pre_logits", 0.5, subset=1.0, **extra),
        _fp_row("block4", 0.4, subset=0.1, **extra),
    ]
    path = tmp_path / "results.jsonl"
    for row in rows:  # through the file, as revisit-report reads them
        results.append_result(path, row)
    read = results.read_results([path])
    assert read[0]["test_predictions"] == encoded
    for kind in tables.REPORT_KINDS:
        text = tables.report_tables(read, kind=kind)
        assert encoded["predictions"] not in text and "labels_sha256" not in text
        assert "lr_curve" not in text and "'epoch'" not in text
    assert tables.probe_table(read) == tables.probe_table(
        [
            {k: v for k, v in r.items() if k not in extra or k == "protocol"}
            for r in read
        ]
    )


# Issue 12: a value of the wrong type in a numeric column is an error, never
# a cell. A string under "test top-1 (%)" would be read as a percentage.


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("test_top1", "0.84", "a number"),
        ("test_top1", True, "a number"),
        ("val_top1", 84.42, r"\[0, 1\]"),
        ("l2", "1e-4", "a number"),
        ("iterations", "87", "a number"),
        ("n_test", [500], "a number"),
        ("seconds", {"wall": 1.0}, "a number"),
        ("converged", "yes", "true, false or null"),
    ],
)
def test_read_rejects_wrong_types_naming_file_line_and_field(
    tmp_path, field, value, expected
):
    path = tmp_path / "r.jsonl"
    good, bad = _probe_row(), _probe_row(**{field: value})
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: field {field!r}") as info:
        results.read_results([path])
    assert re.search(expected, str(info.value))
    assert repr(value) in str(info.value)


def test_read_accepts_nulls_and_numbers_in_numeric_fields(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [_probe_row(val_top1=None, l2=0, seconds=3), _probe_row(converged=None)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert results.read_results([path]) == rows


@pytest.mark.parametrize("value", ["0.53749", True, [0.5]])
def test_tables_reject_non_numbers_in_accuracy_columns(value):
    with pytest.raises(ValueError, match=r"test_top1 .*a number") as info:
        tables.probe_table([_probe_row(test_top1=value)])
    assert repr(value) in str(info.value)
    assert "rotation" in str(info.value)  # names the row
    with pytest.raises(ValueError, match="a number"):
        tables.format_value("l2", "1e-4")


def test_append_rejects_wrong_types_before_writing(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match=r"field 'test_top1' is '0.84' \(str\)"):
        results.append_result(path, _probe_row(test_top1="0.84"))
    assert not path.exists()
