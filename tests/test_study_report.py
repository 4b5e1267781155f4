"""Tests for revisit_tf.study.report and .figures on synthetic study records.

The generator builds records from known per-configuration accuracies (the
paper's Table 1 and Figs. 2-8 axes): pretexts (rotation, exemplar,
supervised), trunks (resnet50_v1, revnet50, vgg19), widths 1 and 4, 3 seeds,
random-init and raw-pixel baselines, lbfgs at every endpoint, mlp, sgd with
curves, and a 10% label subset. ``test_correct`` is drawn per seed as
Bernoulli(p) so that ``test_top1`` is exactly its mean.
"""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from revisit_tf.study import figures
from revisit_tf.study.report import write_report

T_0975_DF2 = 4.30265273  # Student t quantile t_{0.975, 2} from tables.
N_TEST = 1500
N_BOOT = 2000
TRUNKS = ("resnet50_v1", "revnet50", "vgg19")
PRETEXTS = ("rotation", "exemplar", "supervised")
WIDTHS = ("1", "4")
SEEDS = ("0", "1", "2")
RES_EP = {
    "after_root": -0.25,
    "block1": -0.2,
    "block2": -0.15,
    "block3": -0.08,
    "block4": -0.02,
    "pre_logits": 0.0,
}
VGG_EP = {
    "block1": -0.25,
    "block2": -0.2,
    "block3": -0.1,
    "block4": 0.06,
    "block5": 0.03,
    "fc6": 0.02,
    "pre_logits": 0.0,
}
FINDINGS = ("F2", "F3", "F4", "F5a", "F5b", "F7", "F8")


def _base(pretext, trunk, against):
    table = {
        "rotation": {"resnet50_v1": 0.60, "revnet50": 0.66, "vgg19": 0.45},
        "exemplar": {"resnet50_v1": 0.52, "revnet50": 0.55, "vgg19": 0.56},
        "supervised": {"resnet50_v1": 0.75, "revnet50": 0.76, "vgg19": 0.70},
    }
    if "F2" in against and pretext == "rotation" and trunk == "vgg19":
        return 0.64  # rotation wins on every trunk
    return table[pretext][trunk]


class _Maker:
    def __init__(self, seed=0, n_test=N_TEST, with_correct=True, test_set="test"):
        self.rng = np.random.default_rng(seed)
        self.n_test = n_test
        self.with_correct = with_correct
        self.test_set = test_set
        self.records = []

    def add(self, levels, p, *, protocol="lbfgs", endpoint="pre_logits", **kw):
        p_seed = float(np.clip(p + self.rng.normal(0, 0.004), 0.01, 0.99))
        correct = self.rng.random(self.n_test) < p_seed
        pretext = levels["pretext"]
        rec = {
            "cell": "/".join(str(v) for v in levels.values() if v is not None),
            "levels": dict(levels),
            "baseline": pretext if pretext in ("random_init", "pixels") else None,
            "grids": ["table1"],
            "probe": {"lbfgs": "linear"}.get(protocol, protocol),
            "endpoint": endpoint,
            "protocol": protocol,
            "subset": 1.0,
            "fingerprint": f"fp-{protocol}",
            "test_top1": float(correct.mean()),
            "val_top1": None,
            "n_test": self.n_test,
            "test_correct": correct if self.with_correct else None,
            "curve": None,
            "pretext_metrics": {},
        }
        if self.test_set is not None:
            rec["test_set"] = self.test_set
        rec.update(kw)
        self.records.append(rec)
        return rec


def make_records(against=(), **maker_kw):
    """Records supporting every finding, except those named in ``against``."""
    m = _Maker(**maker_kw)
    truth = {}  # (pretext, trunk, width, protocol, endpoint, subset) -> [top1]
    for trunk in TRUNKS:
        eps = VGG_EP if trunk == "vgg19" else RES_EP
        if "F5a" in against and trunk != "vgg19":
            eps = {**eps, "block3": 0.12}
        for width in WIDTHS:
            bonus = 0.06 if width == "4" else 0.0
            if "F7" in against:
                bonus = -bonus
            for pretext in PRETEXTS:
                acc = _base(pretext, trunk, against) + bonus
                top1 = 0.80 if trunk != "vgg19" else 0.85
                if "F4" in against:
                    top1 = acc + 0.3
                for seed in SEEDS:
                    lv = {"pretext": pretext, "trunk": trunk, "width": width}
                    lv["seed"] = seed
                    metrics = {"top1": top1 + 0.001 * int(seed), "loss": 0.3}

                    def add(p, key, **kw):
                        r = m.add(lv, p, pretext_metrics=metrics, **kw)  # noqa: B023
                        truth.setdefault(key, []).append(r["test_top1"])  # noqa: B023
                        return r

                    for ep, off in eps.items():
                        add(
                            acc + off,
                            (pretext, trunk, width, "lbfgs", ep, 1.0),
                            endpoint=ep,
                        )
                    mlp = acc + 0.02
                    if "F3" in against:
                        mlp = 1.25 - acc
                    add(
                        mlp,
                        (pretext, trunk, width, "mlp", "pre_logits", 1.0),
                        protocol="mlp",
                    )
                    add(
                        acc - 0.15,
                        (pretext, trunk, width, "lbfgs", "pre_logits", 0.1),
                        subset=0.1,
                        fingerprint="fp-lbfgs-10",
                    )
                    epochs = np.arange(1, 21)
                    if "F8" in against:
                        curve_acc = acc + 0.1 * (1 - epochs / 20)
                    else:
                        curve_acc = acc - 0.15 * np.exp(-epochs / 5.0)
                    curve = [
                        {
                            "epoch": int(e),
                            "lr": 0.1,
                            "loss": 1.0,
                            "val_top1": None,
                            "test_top1": float(a),
                        }
                        for e, a in zip(epochs, curve_acc, strict=True)
                    ]
                    add(
                        float(curve_acc[-1]),
                        (pretext, trunk, width, "sgd", "pre_logits", 1.0),
                        protocol="sgd",
                        curve=curve,
                    )
            rand = {"pretext": "random_init", "trunk": trunk, "width": width}
            rand["seed"] = None
            r = m.add(rand, 0.20 + bonus / 3)
            truth[("random_init", trunk, width, "lbfgs", "pre_logits", 1.0)] = [
                r["test_top1"]
            ]
    pix = {"pretext": "pixels", "trunk": None, "width": None, "seed": None}
    r = m.add(pix, 0.25)
    truth[("pixels", None, None, "lbfgs", "pre_logits", 1.0)] = [r["test_top1"]]
    return m.records, truth


# --------------------------------------------------------------------------
# Parsing helpers.


def _verdicts(text):
    out = {}
    for fid, verdict in re.findall(
        r"### (F\w+)\. .*?\n\n\*\*Verdict: ([^*]+)\*\*", text
    ):
        out[fid] = verdict
    return out


def _tables(text):
    """Markdown tables of the Table 1 section: list of (header, rows)."""
    section = text.split("## Table 1", 1)[1].split("\n## ", 1)[0]
    tables, current = [], None
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = (cells, [])
                tables.append(current)
            elif not set(line) <= set("|-"):
                current[1].append(cells)
        else:
            current = None
    return tables


def _fmt(values):
    v = np.asarray(values, dtype=float)
    mean = v.mean()
    if v.size == 1:
        return f"{100 * mean:.1f} (n=1)"
    assert v.size == 3
    hw = T_0975_DF2 * v.std(ddof=1) / math.sqrt(3)
    return f"{100 * mean:.1f} ± {100 * hw:.1f} (n=3)"


def _plain(cell):
    return cell.replace("**", "").replace(" †", "")


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    records, truth = make_records()
    out = str(tmp_path_factory.mktemp("study_report"))
    paths = write_report(
        records,
        out,
        title="Synthetic study",
        notes=("1 stale row excluded",),
        n_boot=N_BOOT,
    )
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return records, truth, out, paths, text


def test_report_renders_every_table_and_figure(full_report):
    _, _, out, paths, text = full_report
    assert paths[0] == os.path.join(out, "README.md")
    for stem in (
        "fig2_pretext_by_trunk",
        "fig3_linear_vs_mlp",
        "fig4_pretext_vs_downstream",
        "fig5_endpoints",
        "fig7_widths",
        "fig8_sgd_epochs",
    ):
        for ext in ("png", "svg"):
            path = os.path.join(out, f"{stem}.{ext}")
            assert path in paths
            assert os.path.getsize(path) > 1000
        assert os.path.getsize(os.path.join(out, f"{stem}.png")) < 150_000
        assert f"]({stem}.png)" in text and f"({stem}.svg)" in text
    with open(os.path.join(out, "fig2_pretext_by_trunk.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Not drawn" not in text
    for section in ("## Table 1", "## Figures", "## Findings", "## All comparisons"):
        assert section in text
    assert "- 1 stale row excluded" in text
    assert "Raw pixels (endpoint `pre_logits`)" in text
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_table1_numbers_match_independent_computation(full_report):
    _, truth, _, _, text = full_report
    tables = _tables(text)
    assert len(tables) == 1
    header, rows = tables[0]
    assert header[0] == "Trunk"
    assert header[1:] == [
        "Rotation w1", "Rotation w4", "Exemplar w1", "Exemplar w4",
        "Supervised w1", "Supervised w4", "Random init w1", "Random init w4",
    ]  # fmt: skip
    assert [r[0] for r in rows] == list(TRUNKS)
    for row in rows:
        trunk = row[0]
        for col, cell in zip(header[1:], row[1:], strict=True):
            name, w = col.rsplit(" w", 1)
            pretext = {"Random init": "random_init"}.get(name, name.lower())
            key = (pretext, trunk, w, "lbfgs", "pre_logits", 1.0)
            assert _plain(cell) == _fmt(truth[key]), (trunk, col)
    pix = truth[("pixels", None, None, "lbfgs", "pre_logits", 1.0)]
    assert f"Raw pixels (endpoint `pre_logits`): {_fmt(pix)}." in text


def test_findings_supported_on_supporting_data(full_report):
    _, _, _, _, text = full_report
    verdicts = _verdicts(text)
    assert verdicts == {f: "supported" for f in FINDINGS}
    # Every claimed win carries a bootstrap.
    findings = text.split("## Findings", 1)[1].split("## All comparisons")[0]
    assert "paired bootstrap over 1500 test images, 3 vs 3 seeds" in findings
    rho = float(re.search(r"Spearman rho = ([-0-9.]+)", findings).group(1))
    assert rho > 0.95


def test_bold_and_dagger_placement_on_constructed_case(tmp_path):
    acc = {
        ("rotation", "resnet50_v1"): 0.70,
        ("exemplar", "resnet50_v1"): 0.60,
        ("supervised", "resnet50_v1"): 0.90,
        ("rotation", "vgg19"): 0.50,
        ("exemplar", "vgg19"): 0.65,
        ("supervised", "vgg19"): 0.80,
    }
    recs = []
    for (p, t), a in acc.items():
        recs.append(
            {
                "levels": {"pretext": p, "trunk": t, "width": "2", "seed": "0"},
                "baseline": None,
                "probe": "linear",
                "endpoint": "pre_logits",
                "protocol": "lbfgs",
                "subset": 1.0,
                "fingerprint": "fp",
                "test_top1": a,
                "n_test": 100,
                "test_correct": None,
            }
        )
    write_report(recs, str(tmp_path), title="t", n_boot=100)
    text = (tmp_path / "README.md").read_text()
    header, rows = _tables(text)[0]
    assert header == ["Trunk", "Rotation w2", "Exemplar w2", "Supervised w2"]
    table = {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in rows}
    assert table["resnet50_v1"]["Rotation w2"] == "**70.0 (n=1)** †"
    assert table["resnet50_v1"]["Exemplar w2"] == "60.0 (n=1)"
    assert table["resnet50_v1"]["Supervised w2"] == "90.0 (n=1) †"  # never bold
    assert table["vgg19"]["Rotation w2"] == "50.0 (n=1)"
    assert table["vgg19"]["Exemplar w2"] == "**65.0 (n=1)** †"
    assert table["vgg19"]["Supervised w2"] == "80.0 (n=1)"
    # No per-image correctness: differences, but no significance claims.
    assert "significance not assessed: no per-image test_correct" in text
    assert (
        "Rotation is ahead of Exemplar: +10.0 points (difference of seed means" in text
    )


def test_different_fingerprints_are_never_averaged(tmp_path):
    recs = []
    for fp, accs in (("fpA", (0.50, 0.52, 0.54)), ("fpB", (0.80, 0.82, 0.84))):
        for seed, a in enumerate(accs):
            recs.append(
                {
                    "levels": {"pretext": "rotation", "trunk": "resnet50_v1",
                               "width": "1", "seed": str(seed)},
                    "baseline": None,
                    "probe": "linear",
                    "endpoint": "pre_logits",
                    "protocol": "lbfgs",
                    "subset": 1.0,
                    "fingerprint": fp,
                    "test_top1": a,
                    "n_test": 100,
                    "test_correct": None,
                }
            )  # fmt: skip
    write_report(recs, str(tmp_path), title="fp", n_boot=100)
    text = (tmp_path / "README.md").read_text()
    tables = _tables(text)
    assert len(tables) == 2
    cells = [_plain(t[1][0][1]) for t in tables]
    assert cells == [_fmt([0.50, 0.52, 0.54]), _fmt([0.80, 0.82, 0.84])]
    pooled = np.mean([0.50, 0.52, 0.54, 0.80, 0.82, 0.84])
    assert f"{100 * pooled:.1f}" not in text and "(n=6)" not in text
    assert "### Protocol fingerprint `fpA`" in text
    assert "### Protocol fingerprint `fpB`" in text
    assert "2 protocol fingerprints" in text and "never" in text


def test_main_probes_keep_other_probes_out_of_table1(tmp_path):
    recs = []
    for probe, fp, accs in (
        ("linear", "fpA", (0.50, 0.52, 0.54)),
        ("endpoints", "fpB", (0.80, 0.82, 0.84)),
    ):
        for seed, a in enumerate(accs):
            recs.append(
                {
                    "levels": {"pretext": "rotation", "trunk": "resnet50_v1",
                               "width": "1", "seed": str(seed)},
                    "baseline": None,
                    "probe": probe,
                    "endpoint": "pre_logits",
                    "protocol": "lbfgs",
                    "subset": 1.0,
                    "fingerprint": fp,
                    "test_top1": a,
                    "n_test": 100,
                    "test_correct": None,
                }
            )  # fmt: skip
    write_report(recs, str(tmp_path), title="fp", n_boot=100, main_probes=["linear"])
    text = (tmp_path / "README.md").read_text()
    tables = _tables(text)
    assert len(tables) == 1
    assert _plain(tables[0][1][0][1]) == _fmt([0.50, 0.52, 0.54])
    assert _fmt([0.80, 0.82, 0.84]) not in text


def test_findings_not_supported_on_contrary_data(tmp_path):
    against = ("F2", "F3", "F4", "F5a", "F7", "F8")
    records, _ = make_records(against=against, n_test=1000, seed=1)
    write_report(
        records, str(tmp_path), title="against", n_boot=1000, draw_figures=False
    )
    verdicts = _verdicts((tmp_path / "README.md").read_text())
    for fid in against:
        assert verdicts[fid] == "not supported", fid
    assert verdicts["F5b"] == "supported"


def test_missing_data_gives_not_testable_lines(tmp_path):
    recs = [
        {
            "levels": {"pretext": "rotation", "trunk": "resnet50_v1"},
            "baseline": None,
            "probe": "linear",
            "endpoint": "pre_logits",
            "protocol": "lbfgs",
            "fingerprint": "fp",
            "test_top1": 0.5,
            "n_test": 10,
            "test_correct": None,
            "curve": None,
            "pretext_metrics": {},
        }
    ]
    paths = write_report(recs, str(tmp_path), title="sparse", n_boot=100)
    text = (tmp_path / "README.md").read_text()
    assert paths == [str(tmp_path / "README.md")]
    verdicts = _verdicts(text)
    assert set(verdicts) == set(FINDINGS)
    assert all(
        v.startswith("not testable with this study (missing ")
        for v in verdicts.values()
    )
    assert text.count("_Not drawn: ") == 6
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".png", ".svg"))]
    # No records at all: still a report, nothing testable.
    write_report([], str(tmp_path / "empty"), title="empty")
    empty = (tmp_path / "empty" / "README.md").read_text()
    assert "_Not shown: no lbfgs results" in empty
    assert all(v.startswith("not testable") for v in _verdicts(empty).values())


def test_cross_protocol_pairs_need_a_test_set_id(tmp_path):
    records, _ = make_records(n_test=200, test_set=None)
    records = [r for r in records if r["protocol"] in ("lbfgs", "mlp")]
    records = [r for r in records if r["endpoint"] == "pre_logits"]
    write_report(
        records, str(tmp_path), title="no test_set", n_boot=200, draw_figures=False
    )
    text = (tmp_path / "README.md").read_text()
    assert "different protocol fingerprints (fp-mlp vs fp-lbfgs)" in text
    assert _verdicts(text)["F3"] == "supported"  # the ranking needs no pairing


def _without_figures(text):
    head, rest = text.split("## Figures", 1)
    return head + rest.split("## Findings", 1)[1]


def test_report_is_deterministic(full_report, tmp_path):
    records, _, _, _, text = full_report
    write_report(
        records, str(tmp_path), title="Synthetic study",
        notes=("1 stale row excluded",), n_boot=N_BOOT, draw_figures=False,
    )  # fmt: skip
    again = (tmp_path / "README.md").read_text()
    assert "figures disabled" in again
    assert _without_figures(again) == _without_figures(text)
    small, _ = make_records(n_test=50)
    a = figures.figure7(small, str(tmp_path / "a"))
    b = figures.figure7(small, str(tmp_path / "b"))
    for pa, pb in zip(a, b, strict=True):
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            assert fa.read() == fb.read()


def test_figure_functions_accept_records_and_skip(tmp_path):
    records, _ = make_records(n_test=50)
    paths = figures.figure5(records, str(tmp_path / "f5"))
    assert paths == [str(tmp_path / "f5.png"), str(tmp_path / "f5.svg")]
    assert figures.figure8(records[:1], str(tmp_path / "f8")) == []
    data = figures.prepare_figure8([])
    assert data.reason and "curves" in data.reason
    assert figures.order_endpoints(["pre_logits", "fc6", "zz", "block1"]) == [
        "block1", "fc6", "pre_logits", "zz",
    ]  # fmt: skip
    assert figures.order_widths(["16", "4", "1"]) == ["1", "4", "16"]


def test_modules_import_neither_tensorflow_nor_gin():
    code = (
        "import sys; import revisit_tf.study.report, revisit_tf.study.figures; "
        "bad = [m for m in ('tensorflow', 'gin', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
