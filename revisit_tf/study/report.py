"""Study report: records -> README.md with Table 1, Figs. 2-8 and findings.

Place in the data flow: last step of stage 8 (``study``). The runner
collects one *record* per probe result and calls ``write_report``; the
report reproduces the layout of Kolesnikov, Zhai, Beyer, "Revisiting
Self-Supervised Visual Representation Learning" (CVPR 2019): Table 1
(trunks x pretexts x widths, linear evaluation), the analogues of Figs. 2,
3, 4, 5, 7 and 8 (``revisit_tf.study.figures``), and a verdict on each of
the paper's findings with the numbers behind it.

Record (a plain mapping per probe result)::

    cell            "rotation/resnet50_v1/1/0"
    levels          axis -> level (str) or None; "pretext", "trunk" always
                    present, "width", "seed" optional, other axes are part
                    of a configuration's identity
    baseline        None | "random_init" | "pixels" (levels["pretext"] is
                    then the baseline's name); "supervised" is a pretext
    probe           spec probe name (display only)
    endpoint        trunk endpoint ("after_root" ... "pre_logits")
    protocol        "lbfgs" | "mlp" | "sgd" | "knn"
    subset          fraction of training labels (paper Fig. 7), default 1.0
    fingerprint     protocol fingerprint; never pooled across
    test_top1       fraction in [0, 1] (val_top1 optional)
    n_test          number of test images
    test_correct    bool [n_test] or None (per-image correctness, same
                    images and order for one fingerprint)
    test_set        optional id of the test images; lets records of
                    *different* fingerprints (lbfgs vs mlp) be paired
    curve           sgd/mlp: [{"epoch", "lr", "loss", "val_top1",
                    "test_top1"}, ...] or None
    pretext_metrics training metrics, "top1" = pretext-task accuracy

Statistics (``revisit_tf.study.stats``): a *configuration* is all records
equal but for the seed, under one fingerprint; its accuracy is the mean over
seeds with a 95% Student-t half-width. Every "A beats B" statement is a
paired bootstrap over the test images (``paired_bootstrap``, ``n_boot``
replicates, seed 0, so the report is deterministic): A and B need the same
fingerprint, or equal ``test_set`` ids, and ``test_correct`` on every seed;
otherwise the statement gives the difference of means and says why its
significance is not assessed. "Significant" means p < 0.05.

Verdicts (each "supported", "not supported" or "not testable with this
study (missing ...)"):

  * F2 (Fig. 2) architecture changes which pretext wins: supported when for
    two trunks (same width and fingerprint) the best self-supervised pretexts
    P != Q swap order, with P - Q significant on one trunk and Q - P on the
    other;
  * F3 (Fig. 3) an MLP probe keeps the linear ranking: supported when the
    Spearman correlation of linear and MLP accuracy across configurations is
    >= 0.7 and the mean MLP - linear difference is within 5 points;
  * F4 (Fig. 4) pretext accuracy does not predict downstream accuracy across
    trunks: supported when, for one pretext and width, the trunk with the
    lower pretext accuracy is significantly better downstream;
  * F5a (Fig. 5) residual trunks: pre_logits is the best endpoint or within
    1 point of it (or not significantly worse), for every configuration;
  * F5b (Fig. 5) VGG: an earlier endpoint significantly beats pre_logits,
    for every configuration;
  * F7 (Fig. 7) wider is better: the widest width beats the narrowest in
    every (pretext, trunk, label subset), significantly in at least half;
  * F8 (Fig. 8) the SGD probe keeps improving: final-epoch accuracy is above
    the accuracy half-way through training for every configuration (a
    t-interval over seeds: curves have no per-image correctness).

Nothing here imports TensorFlow or gin.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

from revisit_tf.study import figures as F
from revisit_tf.study.stats import (
    BootstrapResult,
    Config,
    Interval,
    group_records,
    paired_bootstrap,
    t_interval,
)

ALPHA = 0.05
F3_MIN_SPEARMAN = 0.7
F3_MAX_MEAN_DIFF = 0.05
F5_CLOSE = 0.01
README = "README.md"
_NOT_SELF_SUPERVISED = (F.SUPERVISED, *F.BASELINES)

# (key, file stem, caption, prepare, draw, takes main_endpoint)
_FIGURES = (
    (
        "fig2",
        "fig2_pretext_by_trunk",
        "Fig. 2 analogue: linear-probe accuracy of each pretext per trunk "
        "(error bars: 95% t-interval over seeds)",
        F.prepare_figure2,
        F.figure2,
        True,
    ),
    (
        "fig3",
        "fig3_linear_vs_mlp",
        "Fig. 3 analogue: linear (lbfgs) vs MLP probe accuracy (dotted: y = x)",
        F.prepare_figure3,
        F.figure3,
        True,
    ),
    (
        "fig4",
        "fig4_pretext_vs_downstream",
        "Fig. 4 analogue: pretext-task accuracy vs downstream accuracy "
        "(colour: trunk, marker size: width)",
        F.prepare_figure4,
        F.figure4,
        True,
    ),
    (
        "fig5",
        "fig5_endpoints",
        "Fig. 5 analogue: linear-probe accuracy by endpoint depth",
        F.prepare_figure5,
        F.figure5,
        False,
    ),
    (
        "fig7",
        "fig7_widths",
        "Fig. 7 analogue: accuracy vs widening factor, per fraction of labels",
        F.prepare_figure7,
        F.figure7,
        True,
    ),
    (
        "fig8",
        "fig8_sgd_epochs",
        "Fig. 8 analogue: SGD probe accuracy vs epoch (mean over seeds, band: min-max)",
        F.prepare_figure8,
        F.figure8,
        False,
    ),
)


# --------------------------------------------------------------------------
# Formatting.


def _fmt_iv(iv: Interval) -> str:
    """``"87.3 ± 1.2 (n=3)"`` in percent; ``"87.3 (n=1)"`` for one seed."""
    if math.isnan(iv.half_width):
        return f"{100 * iv.mean:.1f} (n={iv.n})"
    return f"{100 * iv.mean:.1f} ± {100 * iv.half_width:.1f} (n={iv.n})"


def _fmt_p(p: float, n_boot: int) -> str:
    if p <= 0.0:
        return f"p < {1.0 / n_boot:g}"
    if p < 0.001:
        return f"p = {p:.1e}"
    return f"p = {p:.3f}"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _full_label(c: Config) -> str:
    text = F.config_label(c) + f" ({c.protocol}@{c.endpoint}"
    if not F.is_full(c.subset):
        text += f", {100 * c.subset:g}% labels"
    return text + ")"


# --------------------------------------------------------------------------
# Paired comparisons.


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One "A vs B" statement: difference of means and its paired bootstrap."""

    topic: str
    a: Config
    b: Config
    diff: float
    boot: BootstrapResult | None
    why_not: str | None

    @property
    def significant(self) -> bool | None:
        """p < 0.05 with A ahead; None when no bootstrap was possible."""
        if self.boot is None:
            return None
        return self.boot.p_value < ALPHA and self.diff > 0

    def text(self) -> str:
        """``"+3.1 points (95% CI [+2.0, +4.2], p < 0.0001; ...)"``."""
        if self.boot is None:
            return (
                f"{_pts(self.diff)} points (difference of seed means; "
                f"significance not assessed: {self.why_not})"
            )
        b = self.boot
        tail = "" if b.p_value < ALPHA else "; not significant at 5%"
        return (
            f"{_pts(b.diff)} points (95% CI [{_pts(b.low)}, {_pts(b.high)}], "
            f"{_fmt_p(b.p_value, b.n_boot)}; paired bootstrap over {b.n} test "
            f"images, {b.n_a} vs {b.n_b} seeds{tail})"
        )

    def verb(self) -> str:
        """``"beats"`` only when significant; ``text()`` says why not."""
        if self.diff <= 0:
            return "does not beat"
        return "beats" if self.significant else "is ahead of"


class _Comparator:
    def __init__(self, n_boot: int):
        self.n_boot = n_boot
        self.done: dict[tuple, Comparison] = {}
        self.order: list[Comparison] = []

    def __call__(self, topic: str, a: Config, b: Config) -> Comparison:
        key = (a.key, b.key)
        if key in self.done:
            return self.done[key]
        diff = a.accuracy.mean - b.accuracy.mean
        boot, why = None, None
        same_test = a.fingerprint == b.fingerprint or (
            a.test_set is not None and a.test_set == b.test_set
        )
        ca, cb = a.correct(), b.correct()
        if not same_test:
            why = (
                f"different protocol fingerprints ({a.fingerprint} vs "
                f"{b.fingerprint}) and no common test_set id"
            )
        elif ca is None or cb is None:
            side = _full_label(a) if ca is None else _full_label(b)
            why = f"no per-image test_correct for {side}"
        elif ca.shape[1] != cb.shape[1]:
            why = f"different test sets ({ca.shape[1]} vs {cb.shape[1]} images)"
        else:
            boot = paired_bootstrap(ca, cb, n_boot=self.n_boot, seed=0)
            diff = boot.diff
        comp = Comparison(topic, a, b, diff, boot, why)
        self.done[key] = comp
        self.order.append(comp)
        return comp

    def table(self) -> list[str]:
        if not self.order:
            return ["No pairwise comparisons were possible with these records."]
        lines = [
            "| # | Topic | A | B | A - B (points) | 95% CI | p | seeds A/B | images |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for i, c in enumerate(self.order, 1):
            if c.boot is None:
                ci, p, seeds, imgs = "-", f"not assessed: {c.why_not}", "-", "-"
            else:
                b = c.boot
                ci = f"[{_pts(b.low)}, {_pts(b.high)}]"
                p = _fmt_p(b.p_value, b.n_boot)
                seeds, imgs = f"{b.n_a}/{b.n_b}", str(b.n)
            lines.append(
                f"| {i} | {c.topic} | {_full_label(c.a)} | {_full_label(c.b)} | "
                f"{_pts(c.diff)} | {ci} | {p} | {seeds} | {imgs} |"
            )
        return lines


# --------------------------------------------------------------------------
# Table 1.


def _table1(
    configs: Sequence[Config], main_endpoint: str, cmp: _Comparator, notes: list[str]
) -> list[str]:
    sel = F.linear_main(configs, main_endpoint, pixels=True)
    out = [
        "## Table 1: linear evaluation (lbfgs, all labels, endpoint "
        f"`{main_endpoint}`)",
        "",
    ]
    if not sel:
        return out + [
            f"_Not shown: no lbfgs results on all labels at endpoint "
            f"`{main_endpoint}`._",
            "",
        ]
    fps = F.ordered_unique(c.fingerprint for c in sel)
    if len(fps) > 1:
        by_ident: dict[tuple, list[str]] = {}
        for c in sel:
            by_ident.setdefault((c.key[0], c.baseline), []).append(c.fingerprint)
        shared = sum(1 for v in by_ident.values() if len(v) > 1)
        msg = (
            f"Table 1 records come under {len(fps)} protocol fingerprints "
            f"({', '.join(fps)}); each fingerprint is a separate table and no "
            "numbers are pooled across them"
        )
        if shared:
            msg += (
                f" ({shared} configuration(s) were measured under more than one "
                "fingerprint and appear in several tables)"
            )
        notes.append(msg + ".")
        out += [f"_{msg}._", ""]
    out += [
        "Cells: mean ± half-width of the 95% Student-t interval over seeds, in "
        "percent (n = seeds). **Bold**: best self-supervised pretext of the row "
        "at that width (supervised and baselines excluded; only where two or "
        "more compete). †: best trunk of the column (where two or more trunks "
        "have a value).",
        "",
    ]
    for fp in fps:
        out += _table1_one(
            [c for c in sel if c.fingerprint == fp], fp, len(fps) > 1, cmp
        )
    return out


def _table1_one(
    cs: Sequence[Config], fp: str, several: bool, cmp: _Comparator
) -> list[str]:
    trained = [c for c in cs if c.baseline is None]
    rand = [c for c in cs if c.pretext == "random_init"]
    pix = [c for c in cs if c.pretext == "pixels"]
    probes = F.ordered_unique(p for c in cs for p in c.probes)
    out = [f"### Protocol fingerprint `{fp}`", ""] if several else []
    out += [
        f"Probe(s): {', '.join(probes) or '-'}; protocol fingerprint `{fp}`.",
        "",
    ]
    cell: dict[tuple, Config] = {}
    for c in trained + rand:
        cell[(c.trunk, c.extra, c.pretext, c.width)] = c
    rows = F.ordered_unique((c.trunk, c.extra) for c in trained)
    rows += [r for r in F.ordered_unique((c.trunk, ()) for c in rand) if r not in rows]
    widths = F.order_widths(c.width for c in trained)
    pretexts = F.ordered_unique(c.pretext for c in trained)
    columns = [
        (p, w)
        for p in pretexts
        for w in widths
        if any(c.pretext == p and c.width == w for c in trained)
    ]
    columns += [("random_init", w) for w in F.order_widths(c.width for c in rand)]

    def get(row, col):
        (trunk, extra), (p, w) = row, col
        found = cell.get((trunk, extra, p, w))
        if found is None and p == "random_init":
            found = cell.get((trunk, (), p, w))
        return found

    statements: list[str] = []
    if rows and columns:
        bold: set[tuple] = set()
        for row in rows:
            for w in widths:
                comp = [
                    (col, get(row, col))
                    for col in columns
                    if col[1] == w and col[0] not in _NOT_SELF_SUPERVISED
                ]
                comp = [(col, c) for col, c in comp if c is not None]
                if len(comp) < 2:
                    continue
                best = max(c.accuracy.mean for _, c in comp)
                bold |= {(row, col) for col, c in comp if c.accuracy.mean == best}
                ranked = sorted(comp, key=lambda x: -x[1].accuracy.mean)
                first, second = ranked[0][1], ranked[1][1]
                r = cmp("best vs runner-up pretext", first, second)
                statements.append(
                    f"{_row_name(row)}{_w(w)}: {F.pretext_label(first.pretext)} "
                    f"{r.verb()} {F.pretext_label(second.pretext)}: {r.text()}."
                )
                sup = get(row, (F.SUPERVISED, w))
                if sup is not None:
                    r = cmp("supervised vs best self-supervised", sup, first)
                    statements.append(
                        f"{_row_name(row)}{_w(w)}: Supervised vs "
                        f"{F.pretext_label(first.pretext)}: {r.text()}."
                    )
        top: set[tuple] = set()
        for col in columns:
            vals = [(row, get(row, col)) for row in rows]
            vals = [(row, c) for row, c in vals if c is not None]
            if len(vals) >= 2:
                best = max(c.accuracy.mean for _, c in vals)
                top |= {(row, col) for row, c in vals if c.accuracy.mean == best}
        header = ["Trunk"] + [
            F.pretext_label(p) + (f" {F.width_label(w)}" if w is not None else "")
            for p, w in columns
        ]
        out += [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for row in rows:
            cells = [_row_name(row)]
            for col in columns:
                c = get(row, col)
                if c is None:
                    cells.append("-")
                    continue
                text = _fmt_iv(c.accuracy)
                if (row, col) in bold:
                    text = f"**{text}**"
                if (row, col) in top:
                    text += " †"
                cells.append(text)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        # Trained vs random init of the same trunk (and width, if it has one).
        for row in rows:
            for col in columns:
                if col[0] in F.BASELINES:
                    continue
                c = get(row, col)
                rnd = get(row, ("random_init", col[1])) or get(
                    row, ("random_init", None)
                )
                if c is None or rnd is None:
                    continue
                r = cmp("trained vs random init", c, rnd)
                statements.append(
                    f"{_row_name(row)}: {F.config_label(c, with_trunk=False)} "
                    f"{r.verb()} random init: {r.text()}."
                )
    for c in pix:
        out.append(f"Raw pixels (endpoint `{c.endpoint}`): {_fmt_iv(c.accuracy)}.")
    if pix:
        out.append("")
    if statements:
        out += ["Statements on this table:", ""]
        out += [f"- {s}" for s in statements]
        out.append("")
    return out


def _row_name(row: tuple) -> str:
    trunk, extra = row
    return (trunk or "-") + "".join(f" ({k}={v})" for k, v in extra)


def _w(width: str | None) -> str:
    return "" if width is None else f" {F.width_label(width)}"


# --------------------------------------------------------------------------
# Findings.


@dataclasses.dataclass
class Finding:
    """One of the paper's findings and this study's verdict on it."""

    fid: str
    title: str
    verdict: str
    lines: list[str]

    def markdown(self) -> list[str]:
        out = [f"### {self.fid}. {self.title}", "", f"**Verdict: {self.verdict}**", ""]
        out += [f"- {line}" for line in self.lines]
        return out + [""]


def _untestable(missing: str) -> str:
    return f"not testable with this study (missing {missing})"


def _self_supervised(c: Config) -> bool:
    return c.baseline is None and c.pretext not in _NOT_SELF_SUPERVISED


def _finding2(configs, main, cmp) -> Finding:
    title = "Architecture changes which pretext wins (paper Fig. 2)"
    sel = [c for c in F.linear_main(configs, main) if _self_supervised(c)]
    verdicts, lines, swaps = [], [], False
    for fp, width, extra in F.ordered_unique(
        (c.fingerprint, c.width, c.extra) for c in sel
    ):
        cs = [c for c in sel if (c.fingerprint, c.width, c.extra) == (fp, width, extra)]
        table: dict[str, dict[str, Config]] = {}
        for c in cs:
            table.setdefault(c.trunk, {})[c.pretext] = c
        table = {t: v for t, v in table.items() if len(v) >= 2}
        if len(table) < 2:
            continue
        where = f"width {width}" if width is not None else "all widths"
        where += "".join(f", {k}={v}" for k, v in extra) + f", fp {fp}"
        best = {
            t: max(v.values(), key=lambda c: c.accuracy.mean) for t, v in table.items()
        }
        desc = "; ".join(
            f"{t}: {F.pretext_label(b.pretext)} {100 * b.accuracy.mean:.1f}"
            for t, b in best.items()
        )
        lines.append(f"{where}: best pretext per trunk: {desc}.")
        winners = F.ordered_unique(b.pretext for b in best.values())
        if len(winners) == 1:
            lines.append(f"{where}: {F.pretext_label(winners[0])} wins on every trunk.")
            verdicts.append("no")
            continue
        found, swaps = "no", True
        trunks = list(table)
        for i, t1 in enumerate(trunks):
            for t2 in trunks[i + 1 :]:
                p, q = best[t1].pretext, best[t2].pretext
                if p == q or q not in table[t1] or p not in table[t2]:
                    continue
                r1 = cmp("F2 pretext order on trunk", table[t1][p], table[t1][q])
                r2 = cmp("F2 pretext order on trunk", table[t2][q], table[t2][p])
                lines.append(
                    f"{where}: on {t1} {F.pretext_label(p)} {r1.verb()} "
                    f"{F.pretext_label(q)}: {r1.text()}; on {t2} "
                    f"{F.pretext_label(q)} {r2.verb()} {F.pretext_label(p)}: "
                    f"{r2.text()}."
                )
                if r1.significant and r2.significant:
                    found = "yes"
                elif (
                    found == "no"
                    and None in (r1.significant, r2.significant)
                    and r1.diff > 0
                    and r2.diff > 0
                ):
                    found = "means"
        verdicts.append(found)
    if not verdicts:
        return Finding(
            "F2",
            title,
            _untestable(
                "two trunks with two or more self-supervised pretexts each, "
                f"lbfgs at {main} on all labels"
            ),
            lines,
        )
    if "yes" in verdicts:
        return Finding("F2", title, "supported", lines)
    if "means" in verdicts:
        lines.append(
            "The order swaps by the means; its significance could not be assessed."
        )
        return Finding("F2", title, "supported", lines)
    if swaps:
        lines.append("No significant swap of the pretext order between trunks.")
    return Finding("F2", title, "not supported", lines)


def _finding3(configs, main, cmp) -> Finding:
    title = "An MLP probe changes the ranking little and gains little (paper Fig. 3)"
    pairs = F.linear_mlp_pairs(configs, main)
    lines, verdicts = [], []
    for (fl, fm), items in pairs.items():
        items = [(c, m) for c, m in items if c.baseline is None]
        if len(items) < 3:
            lines.append(
                f"lbfgs {fl} / mlp {fm}: only {len(items)} configuration(s) with "
                "both probes (need 3 for a rank correlation)."
            )
            continue
        x = np.array([c.accuracy.mean for c, _ in items])
        y = np.array([m.accuracy.mean for _, m in items])
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            lines.append(f"lbfgs {fl} / mlp {fm}: no variation in accuracy.")
            continue
        rho = float(_scipy_stats.spearmanr(x, y).statistic)
        tau = float(_scipy_stats.kendalltau(x, y).statistic)
        d = t_interval(y - x)
        hw = "" if math.isnan(d.half_width) else f" ± {100 * d.half_width:.1f}"
        lines.append(
            f"lbfgs {fl} vs mlp {fm}, {len(items)} configurations: Spearman "
            f"rho = {rho:.3f}, Kendall tau = {tau:.3f}; mean MLP - linear = "
            f"{_pts(d.mean)}{hw} points (95% t-interval over configurations)."
        )
        comps = [cmp("F3 MLP vs linear", m, c) for c, m in items]
        sig = sum(1 for r in comps if r.significant)
        neg = sum(
            1
            for r in comps
            if r.boot is not None and r.diff < 0 and r.boot.p_value < ALPHA
        )
        if any(r.boot is None for r in comps):
            why = next(r.why_not for r in comps if r.boot is None)
            lines.append(f"Per-configuration MLP - linear not tested ({why}).")
        else:
            lines.append(
                f"Per configuration, the MLP is significantly better in {sig} and "
                f"significantly worse in {neg} of {len(comps)} (comparisons table)."
            )
        ok = rho >= F3_MIN_SPEARMAN and abs(d.mean) <= F3_MAX_MEAN_DIFF
        verdicts.append(ok)
    if not verdicts:
        return Finding(
            "F3",
            title,
            _untestable(
                f"three or more configurations with both lbfgs and mlp at {main} "
                "on all labels"
            ),
            lines,
        )
    lines.append(
        f"Criterion: Spearman rho >= {F3_MIN_SPEARMAN} and |mean difference| <= "
        f"{100 * F3_MAX_MEAN_DIFF:.0f} points."
    )
    return Finding(
        "F3", title, "supported" if all(verdicts) else "not supported", lines
    )


def _finding4(configs, main, cmp) -> Finding:
    title = (
        "Pretext-task accuracy does not predict downstream accuracy across "
        "architectures (paper Fig. 4)"
    )
    sel = [
        c
        for c in F.linear_main(configs, main)
        if c.baseline is None and c.pretext_top1() is not None
    ]
    lines, tested, supported, by_means = [], 0, False, False
    for p, fp, width, extra in F.ordered_unique(
        (c.pretext, c.fingerprint, c.width, c.extra) for c in sel
    ):
        cs = [
            c
            for c in sel
            if (c.pretext, c.fingerprint, c.width, c.extra) == (p, fp, width, extra)
        ]
        if len({c.trunk for c in cs}) < 2:
            continue
        tested += 1
        where = F.pretext_label(p) + _w(width) + f" (fp {fp})"
        pt = {c.key: c.pretext_top1().mean for c in cs}
        discordant = []
        for i, a in enumerate(cs):
            for b in cs[i + 1 :]:
                if a.trunk == b.trunk:
                    continue
                hi, lo = (a, b) if pt[a.key] > pt[b.key] else (b, a)
                if pt[hi.key] != pt[lo.key] and hi.accuracy.mean < lo.accuracy.mean:
                    discordant.append((lo.accuracy.mean - hi.accuracy.mean, hi, lo))
        if len(cs) >= 3:
            tau = _scipy_stats.kendalltau(
                [pt[c.key] for c in cs], [c.accuracy.mean for c in cs]
            ).statistic
            lines.append(
                f"{where}: Kendall tau(pretext, downstream) over "
                f"{len(cs)} trunks = {float(tau):.3f}."
            )
        if not discordant:
            lines.append(
                f"{where}: the trunk order by pretext accuracy equals the order by "
                "downstream accuracy."
            )
            continue
        _, hi, lo = max(discordant, key=lambda x: x[0])
        r = cmp("F4 lower pretext acc., higher downstream", lo, hi)
        lines.append(
            f"{where}: {lo.trunk} has lower pretext accuracy than {hi.trunk} "
            f"({100 * pt[lo.key]:.1f} vs {100 * pt[hi.key]:.1f}) but "
            f"{r.verb()} it downstream: {r.text()}."
        )
        if r.significant:
            supported = True
        elif r.significant is None and r.diff > 0:
            by_means = True
    if not tested:
        return Finding(
            "F4",
            title,
            _untestable(
                "pretext_metrics['top1'] for one pretext on two or more trunks "
                f"with lbfgs at {main}"
            ),
            lines,
        )
    if supported:
        return Finding("F4", title, "supported", lines)
    if by_means:
        lines.append("Supported by the means only; significance not assessed.")
        return Finding("F4", title, "supported", lines)
    return Finding("F4", title, "not supported", lines)


def _endpoint_groups(configs) -> list[tuple[str, list[Config]]]:
    sel = [
        c
        for c in configs
        if c.protocol == "lbfgs" and F.is_full(c.subset) and c.baseline is None
    ]
    out = []
    for k in F.ordered_unique(
        (c.pretext, c.trunk, c.width, c.extra, c.fingerprint) for c in sel
    ):
        cs = [
            c for c in sel if (c.pretext, c.trunk, c.width, c.extra, c.fingerprint) == k
        ]
        if len(cs) >= 2 and any(c.endpoint == "pre_logits" for c in cs):
            p, trunk, width, extra, fp = k
            name = f"{trunk} {F.pretext_label(p)}{_w(width)}" + "".join(
                f" {a}={v}" for a, v in extra
            )
            out.append((name, cs))
    return out


def _finding5(configs, cmp, residual: bool) -> Finding:
    if residual:
        fid = "F5a"
        title = "Residual trunks: pre_logits is (close to) the best endpoint (Fig. 5)"
    else:
        fid = "F5b"
        title = "VGG: the best endpoint is earlier than pre_logits (paper Fig. 5)"
    groups = [
        (n, cs)
        for n, cs in _endpoint_groups(configs)
        if F.is_residual(cs[0].trunk) == residual
    ]
    if not groups:
        kind = "ResNet/RevNet" if residual else "VGG"
        return Finding(
            fid,
            title,
            _untestable(
                f"lbfgs results of a {kind} trunk at pre_logits and another endpoint"
            ),
            [],
        )
    lines, oks, means_only = [], [], False
    depth = list(F.DEPTH_ORDER)
    for name, cs in groups:
        best = max(cs, key=lambda c: c.accuracy.mean)
        pre = next(c for c in cs if c.endpoint == "pre_logits")
        order = F.order_endpoints(c.endpoint for c in cs)
        if best.endpoint == "pre_logits":
            lines.append(
                f"{name}: best endpoint pre_logits ({100 * pre.accuracy.mean:.1f}) "
                f"among {', '.join(order)}."
            )
            oks.append(residual)
            continue
        r = cmp("F5 best endpoint vs pre_logits", best, pre)
        lines.append(
            f"{name}: best endpoint {best.endpoint} ({100 * best.accuracy.mean:.1f}) "
            f"{r.verb()} pre_logits ({100 * pre.accuracy.mean:.1f}): {r.text()}."
        )
        earlier = best.endpoint in depth and depth.index(best.endpoint) < depth.index(
            "pre_logits"
        )
        if residual:
            oks.append(r.diff <= F5_CLOSE or r.significant is False)
        else:
            if r.significant is None:
                means_only = True
            oks.append(earlier and r.significant is not False)
    if residual:
        lines.append(
            f"Criterion: pre_logits best, within {100 * F5_CLOSE:.0f} point of the "
            "best, or not significantly worse, for every configuration."
        )
    elif means_only:
        lines.append("Some differences are by the means only (no test_correct).")
    return Finding(fid, title, "supported" if all(oks) else "not supported", lines)


def _finding7(configs, main, cmp) -> Finding:
    title = "Wider is better, also with few labels (paper Fig. 7)"
    sel = [
        c
        for c in configs
        if c.protocol == "lbfgs"
        and c.endpoint == main
        and c.baseline is None
        and c.width is not None
    ]
    keys = F.ordered_unique(
        (round(c.subset, 9), c.pretext, c.trunk, c.extra, c.fingerprint) for c in sel
    )
    keys.sort(key=lambda k: -k[0])
    lines, comps = [], []
    for subset, p, trunk, extra, fp in keys:
        cs = [
            c
            for c in sel
            if (round(c.subset, 9), c.pretext, c.trunk, c.extra, c.fingerprint)
            == (subset, p, trunk, extra, fp)
        ]
        widths = F.order_widths(c.width for c in cs)
        if len(widths) < 2:
            continue
        wide = next(c for c in cs if c.width == widths[-1])
        narrow = next(c for c in cs if c.width == widths[0])
        r = cmp("F7 widest vs narrowest", wide, narrow)
        comps.append((subset, r))
        lines.append(
            f"{100 * subset:g}% labels, {F.pretext_label(p)} {trunk}: "
            f"w{widths[-1]} {r.verb()} w{widths[0]}: {r.text()}."
        )
    if not comps:
        return Finding(
            "F7",
            title,
            _untestable(f"lbfgs results at {main} for two or more widths"),
            lines,
        )
    summary = []
    for subset in F.ordered_unique(s for s, _ in comps):
        rs = [r for s, r in comps if s == subset]
        better = sum(1 for r in rs if r.diff > 0)
        sig = sum(1 for r in rs if r.significant)
        summary.append(
            f"{100 * subset:g}% labels: widest better in {better}/{len(rs)}, "
            f"significantly in {sig}"
        )
    if all(F.is_full(s) for s, _ in comps):
        summary.append("label subsets: not in this study")
    lines.insert(0, "; ".join(summary) + ".")
    rs = [r for _, r in comps]
    tested = [r for r in rs if r.boot is not None]
    ok = all(r.diff > 0 for r in rs) and (
        not tested or sum(1 for r in tested if r.significant) * 2 >= len(tested)
    )
    if ok and not tested:
        lines.append("By the means only; significance not assessed (no test_correct).")
    return Finding("F7", title, "supported" if ok else "not supported", lines)


def _finding8(configs) -> Finding:
    title = "The SGD probe keeps improving with more epochs (paper Fig. 8)"
    lines, oks = [], []
    for c in configs:
        if c.protocol != "sgd":
            continue
        series = F.curve_series(c)
        if series is None or len(series[1]) < 2:
            continue
        metric, epochs, values = series
        final = epochs[-1]
        earlier = max((e for e in epochs if e <= final / 2), default=epochs[0])
        if earlier == final:
            continue
        i, j = epochs.index(earlier), epochs.index(final)
        d = t_interval(values[:, j] - values[:, i])
        hw = (
            ""
            if math.isnan(d.half_width)
            else f" ± {100 * d.half_width:.1f} (95% t-interval over {d.n} seeds)"
        )
        lines.append(
            f"{_full_label(c)}: {metric} at epoch {final} = "
            f"{100 * values[:, j].mean():.1f} vs epoch {earlier} = "
            f"{100 * values[:, i].mean():.1f}: {_pts(d.mean)}{hw} points."
        )
        oks.append(d.mean > 0)
    if not oks:
        return Finding(
            "F8", title, _untestable("sgd results with per-epoch curves"), lines
        )
    lines.append(
        "Curves carry no per-image correctness per epoch, so these differences "
        "are not bootstrapped; the intervals are over seeds."
    )
    return Finding("F8", title, "supported" if all(oks) else "not supported", lines)


def _findings(configs, all_configs, main, cmp) -> list[Finding]:
    return [
        _finding2(configs, main, cmp),
        _finding3(configs, main, cmp),
        _finding4(configs, main, cmp),
        _finding5(all_configs, cmp, residual=True),
        _finding5(all_configs, cmp, residual=False),
        _finding7(configs, main, cmp),
        _finding8(all_configs),
    ]


def _main_configs(
    configs: Sequence[Config], main_endpoint: str, main_probes: Sequence[str] | None
) -> list[Config]:
    """Drops Table-1-setting configurations measured only by other probes.

    A study may probe ``main_endpoint`` again under another protocol (e.g.
    an every-endpoint probe with a cheaper L2 grid for Fig. 5); with
    ``main_probes`` such duplicates stay out of Table 1 and Figs. 2, 3, 4, 7
    (they still draw Fig. 5).
    """
    if not main_probes:
        return list(configs)
    main_ids = {id(c) for c in F.linear_main(configs, main_endpoint, pixels=True)}
    return [
        c for c in configs if id(c) not in main_ids or set(c.probes) & set(main_probes)
    ]


# --------------------------------------------------------------------------
# The report.


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_report(
    records: Sequence[Mapping[str, Any]],
    out_dir: str,
    *,
    title: str,
    notes: Sequence[str] = (),
    main_endpoint: str = "pre_logits",
    main_probes: Sequence[str] | None = None,
    n_boot: int = 10000,
    draw_figures: bool = True,
) -> list[str]:
    """Writes ``out_dir/README.md`` and the figures of a study.

    Sections: summary, Table 1 (paper Table 1 layout), figures (paper Figs.
    2, 3, 4, 5, 7, 8), findings (verdicts, module docstring), all paired
    comparisons, notes. Deterministic given the records (and their order,
    which fixes the order of pretexts, trunks and statements).

    Args:
        records: study records (module docstring).
        out_dir: output folder (created if needed); each file is written to
            a temporary name and moved into place.
        title: the report's title.
        notes: lines for the Notes section (e.g. excluded stale rows).
        main_endpoint: the endpoint of Table 1 and Figs. 2, 3, 4, 7.
        main_probes: if given, the probes whose L-BFGS results at
            ``main_endpoint`` make Table 1 and Figs. 2, 3, 4, 7 (other probes
            of that setting only draw Fig. 5); default: every probe.
        n_boot: bootstrap replicates per comparison.
        draw_figures: False leaves the figures out (a quick text-only report;
            existing figure files are left alone).

    Returns:
        Paths written: README.md first, then the figures' PNG and SVG files.
        Files of figures that cannot be drawn are removed if left from an
        earlier run.

    Raises:
        ValueError: for malformed records (``stats.group_records``).
    """
    os.makedirs(out_dir, exist_ok=True)
    all_configs, auto_notes = group_records(records)
    configs = _main_configs(all_configs, main_endpoint, main_probes)
    cmp = _Comparator(n_boot)
    n_fp = len(F.ordered_unique(c.fingerprint for c in all_configs))
    protocols = F.ordered_unique(c.protocol for c in all_configs)
    body = [
        f"# {title}",
        "",
        f"{len(records)} probe records in {len(all_configs)} configurations "
        f"(protocols: {', '.join(protocols) or '-'}; {n_fp} protocol "
        "fingerprint(s)). A configuration is every record equal but for the "
        "seed, under one protocol fingerprint; records of different "
        "fingerprints are never averaged. Accuracies: test top-1 in percent. "
        'Comparisons "A - B": paired bootstrap over the test images '
        f"({n_boot} replicates, seed 0; two-sided p = twice the smaller "
        "fraction of resampled differences on either side of 0). Reproduces "
        "the layout of Kolesnikov, Zhai, Beyer, CVPR 2019 (Table 1, Figs. 2-8).",
        "",
    ]
    extra_notes: list[str] = []
    body += _table1(configs, main_endpoint, cmp, extra_notes)

    written: list[str] = []
    body += ["## Figures", ""]
    for _, stem, caption, prepare, draw, takes_main in _FIGURES:
        kwargs = {"main_endpoint": main_endpoint} if takes_main else {}
        data = prepare(configs if takes_main else all_configs, **kwargs)
        base = os.path.join(out_dir, stem)
        body += [f"### {caption.split(':')[0]}", ""]
        if not draw_figures:
            body += ["_Not drawn: figures disabled (draw_figures=False)._", ""]
            continue
        if data.reason:
            for ext in ("png", "svg"):
                if os.path.exists(f"{base}.{ext}"):
                    os.remove(f"{base}.{ext}")
            body += [f"_Not drawn: {data.reason}._", ""]
            continue
        paths = draw(data, base)
        written += paths
        body += [
            f"![{caption}]({stem}.png)",
            "",
            f"{caption}. [SVG]({stem}.svg)",
            "",
        ]

    body += ["## Findings", ""]
    for finding in _findings(configs, all_configs, main_endpoint, cmp):
        body += finding.markdown()
    body += ["## All comparisons", ""] + cmp.table() + [""]
    all_notes = [*notes, *auto_notes, *extra_notes]
    body += ["## Notes", ""]
    body += [f"- {n}" for n in all_notes] if all_notes else ["- none"]
    body.append("")
    readme = os.path.join(out_dir, README)
    _write_text(readme, "\n".join(body))
    return [readme, *written]
