"""Study figures: analogues of the paper's Figs. 2, 3, 4, 5, 7 and 8.

Place in the data flow: stage 8 (``study``); ``revisit_tf.study.report``
calls ``prepare_figureN`` on the grouped configurations
(``stats.group_records``) and, unless the prepared data carries a
``reason`` for skipping, ``figureN`` to draw it. Each ``figureN(data,
path_without_ext)`` also accepts the raw records, writes
``path_without_ext.png`` (100-120 dpi) and ``.svg`` (text kept as text, fixed
hash salt, no date: byte-identical reruns) atomically (temporary file, then
``os.replace``) and returns the two paths, or ``[]`` when the data lacks what
the figure needs.

Figures (Kolesnikov, Zhai, Beyer, "Revisiting Self-Supervised Visual
Representation Learning", CVPR 2019):

  * Fig. 2: per trunk, the linear-probe accuracy of each pretext (grouped
    bars, 95% t-interval over seeds): architecture changes which pretext wins;
  * Fig. 3: linear (lbfgs) vs MLP probe accuracy per configuration (y = x);
  * Fig. 4: pretext-task accuracy (``pretext_metrics["top1"]``) vs downstream
    accuracy, one panel per pretext, colour = trunk, marker size = width;
  * Fig. 5: accuracy by endpoint (network depth), a line per trunk, a panel
    per pretext;
  * Fig. 7: accuracy vs widening factor, a line per (pretext, trunk), a panel
    per label-subset fraction;
  * Fig. 8: SGD probe accuracy vs epoch (the records' ``curve``), mean over
    seeds with the min-max band, a line per configuration.

Accuracies are plotted in percent. Nothing here imports TensorFlow or gin;
matplotlib is used through ``matplotlib.figure.Figure`` (no pyplot state).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from revisit_tf.study.stats import Config, Interval, group_records

# Network-depth order of endpoints (ResNet/RevNet: after_root, block1..4,
# pre_logits; VGG19: block1..5, fc6, pre_logits). Unknown names go last, in
# the order first seen.
DEPTH_ORDER = (
    "after_root",
    "block1",
    "block2",
    "block3",
    "block4",
    "block5",
    "fc6",
    "fc7",
    "pre_logits",
    "logits",
)
BASELINES = ("random_init", "pixels")
SUPERVISED = "supervised"
DPI = 100
_MARKERS = "osD^vPX*<>ph"
_LABELS = {
    "supervised": "Supervised",
    "random_init": "Random init",
    "pixels": "Raw pixels",
}


# --------------------------------------------------------------------------
# Shared helpers (also used by the report).


def ordered_unique(items: Iterable[Any]) -> list[Any]:
    """Unique items in first-seen order."""
    return list(dict.fromkeys(items))


def order_endpoints(names: Iterable[str]) -> list[str]:
    """Unique endpoint names in ``DEPTH_ORDER``; unknown ones last, as seen."""
    names = ordered_unique(names)
    known = [n for n in DEPTH_ORDER if n in names]
    return known + [n for n in names if n not in DEPTH_ORDER]


def order_widths(levels: Iterable[str | None]) -> list[str | None]:
    """Unique width levels, numerically ascending when numbers (else as seen)."""
    levels = ordered_unique(levels)

    def key(item):
        i, level = item
        try:
            return (0, float(level), i)
        except (TypeError, ValueError):
            return (1, 0.0, i)

    return [lv for _, lv in sorted(enumerate(levels), key=key)]


def is_full(subset: float) -> bool:
    """True for the full training set (subset fraction 1.0)."""
    return abs(float(subset) - 1.0) < 1e-9


def is_residual(trunk: str | None) -> bool:
    """ResNet/RevNet trunks (not VGG): the paper's Fig. 5 split."""
    return trunk is not None and not trunk.lower().startswith("vgg")


def pretext_label(name: str) -> str:
    """Display name of a pretext level (``"rotation"`` -> ``"Rotation"``)."""
    if name in _LABELS:
        return _LABELS[name]
    return name.replace("_", " ").capitalize()


def width_label(width: str | None) -> str:
    return "" if width is None else f"w{width}"


def config_label(c: Config, *, with_trunk: bool = True, with_width: bool = True) -> str:
    """``"Rotation w4, resnet50_v1"`` plus any extra axes."""
    head = pretext_label(c.pretext)
    if with_width and c.width is not None:
        head += f" {width_label(c.width)}"
    parts = [head]
    if with_trunk and c.trunk is not None:
        parts.append(c.trunk)
    parts += [f"{k}={v}" for k, v in c.extra]
    return ", ".join(parts)


def _pct(iv: Interval) -> tuple[float, float]:
    hw = iv.half_width
    return 100.0 * iv.mean, 0.0 if math.isnan(hw) else 100.0 * hw


def linear_main(
    configs: Sequence[Config], main_endpoint: str, *, pixels: bool = False
) -> list[Config]:
    """lbfgs on all labels at ``main_endpoint`` (the paper's Table 1 setting).

    Raw-pixel baselines are left out unless ``pixels`` (they are shown at
    whatever endpoint they were probed).
    """
    out = []
    for c in configs:
        if c.protocol != "lbfgs" or not is_full(c.subset):
            continue
        if c.pretext == "pixels":
            if pixels:
                out.append(c)
        elif c.endpoint == main_endpoint:
            out.append(c)
    return out


@dataclasses.dataclass
class FigureData:
    """Prepared data of one figure; ``reason`` says why it cannot be drawn."""

    figure: str
    reason: str | None
    panels: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------
# Drawing helpers.


def _new_figure(n_panels: int, *, panel_w: float = 4.2, panel_h: float = 3.3):
    from matplotlib.figure import Figure

    ncols = min(3, max(1, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


_LINESTYLES = ("-", "--", ":", "-.")


def _styler(panels: Sequence[dict]) -> Callable[[tuple], dict]:
    """Line style by ``(trunk, variant)``: colour = trunk, dashes = variant."""
    keys = [ln[1] for panel in panels for ln in panel["lines"]]
    trunks = ordered_unique(k[0] for k in keys)
    variants = ordered_unique(k[1] for k in keys)
    colors = _colors(len(trunks))

    def style(key: tuple) -> dict:
        i = variants.index(key[1])
        return {
            "color": colors[trunks.index(key[0])],
            "ls": _LINESTYLES[i % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)],
        }

    return style


def _figure_legend(fig: Any, axes: Sequence[Any]) -> None:
    """One legend right of the panels, labels deduplicated across panels."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside right upper",
            fontsize=7,
        )


def _save(fig: Any, path: str) -> list[str]:
    import matplotlib

    out = []
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": "revisit_tf", "svg.fonttype": "none"}):
        for ext, kwargs in (
            ("png", {"dpi": DPI}),
            ("svg", {"metadata": {"Date": None}}),
        ):
            final = f"{path}.{ext}"
            tmp = f"{final}.tmp{os.getpid()}"
            try:
                fig.savefig(tmp, format=ext, **kwargs)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            out.append(final)
    return out


def _coerce(
    data: Sequence[Mapping[str, Any]] | FigureData,
    prepare: Callable[..., FigureData],
    **kwargs: Any,
) -> FigureData:
    if isinstance(data, FigureData):
        return data
    configs, _ = group_records(data)
    return prepare(configs, **kwargs)


def _fp_suffix(fp: str, fps: Sequence[str]) -> str:
    return f" [fp {fp}]" if len(set(fps)) > 1 else ""


# --------------------------------------------------------------------------
# Fig. 2: pretext by trunk.


def prepare_figure2(
    configs: Sequence[Config], *, main_endpoint: str = "pre_logits"
) -> FigureData:
    """Grouped bars per trunk (paper Fig. 2), one panel per (width, fingerprint).

    Panel dict: ``title``, ``trunks [T]``, ``bars``: list of ``(label,
    [Interval | None] * T)``, ``pixels``: Interval | None.
    """
    sel = linear_main(configs, main_endpoint, pixels=True)
    trained = [c for c in sel if c.baseline is None]
    keys = ordered_unique((c.fingerprint, c.width, c.extra) for c in trained)
    fps = [k[0] for k in keys]
    panels = []
    for fp, width, extra in keys:
        cs = [
            c
            for c in trained
            if (c.fingerprint, c.width, c.extra) == (fp, width, extra)
        ]
        rand = [
            c
            for c in sel
            if c.pretext == "random_init"
            and c.fingerprint == fp
            and c.width in (None, width)
        ]
        trunks = ordered_unique(c.trunk for c in cs)
        pretexts = ordered_unique(c.pretext for c in cs)
        bars = []
        for p in pretexts:
            vals = {c.trunk: c.accuracy for c in cs if c.pretext == p}
            bars.append((pretext_label(p), [vals.get(t) for t in trunks]))
        if rand:
            vals = {c.trunk: c.accuracy for c in rand}
            bars.append(("Random init", [vals.get(t) for t in trunks]))
        if len(bars) < 2:
            continue
        pix = [c for c in sel if c.pretext == "pixels" and c.fingerprint == fp]
        title = " ".join(
            x
            for x in (
                width_label(width),
                ", ".join(f"{k}={v}" for k, v in extra),
                _fp_suffix(fp, fps).strip(),
            )
            if x
        )
        panels.append(
            {
                "title": title or "all trunks",
                "trunks": trunks,
                "bars": bars,
                "pixels": pix[0].accuracy if pix else None,
            }
        )
    if not panels:
        return FigureData(
            "fig2",
            "needs lbfgs results on all labels at endpoint "
            f"{main_endpoint!r} for at least two pretexts (or a pretext and "
            "random init)",
        )
    return FigureData("fig2", None, panels)


def figure2(
    data: Sequence[Mapping[str, Any]] | FigureData,
    path: str,
    *,
    main_endpoint: str = "pre_logits",
) -> list[str]:
    """Fig. 2 analogue: which pretext wins depends on the trunk.

    Args:
        data: records, or ``prepare_figure2`` output.
        path: output path without extension.
        main_endpoint: the endpoint of the comparison (records as data only).

    Returns:
        ``[path.png, path.svg]``, or ``[]`` when the data cannot make it.
    """
    data = _coerce(data, prepare_figure2, main_endpoint=main_endpoint)
    if data.reason:
        return []
    fig, axes = _new_figure(len(data.panels), panel_w=4.6)
    for ax, panel in zip(axes, data.panels, strict=True):
        trunks, bars = panel["trunks"], panel["bars"]
        colors = _colors(len(bars))
        width = 0.8 / len(bars)
        x = np.arange(len(trunks))
        for j, (label, ivs) in enumerate(bars):
            pos, mean, err = [], [], []
            for i, iv in enumerate(ivs):
                if iv is not None:
                    m, e = _pct(iv)
                    pos.append(x[i] + (j - (len(bars) - 1) / 2) * width)
                    mean.append(m)
                    err.append(e)
            grey = label == "Random init"
            ax.bar(
                pos,
                mean,
                width,
                yerr=err if any(err) else None,
                capsize=2,
                label=label,
                color="0.7" if grey else colors[j],
                hatch="//" if grey else None,
                edgecolor="0.3",
                linewidth=0.5,
            )
        if panel["pixels"] is not None:
            ax.axhline(
                100 * panel["pixels"].mean, color="k", ls="--", lw=1, label="Raw pixels"
            )
        ax.set_xticks(x, trunks, fontsize=8)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(panel["title"], fontsize=9)
    _figure_legend(fig, axes)
    fig.suptitle("Fig. 2 analogue: linear probe accuracy by trunk and pretext")
    return _save(fig, path)


# --------------------------------------------------------------------------
# Fig. 3: linear vs MLP.


def _pair_key(c: Config) -> tuple:
    return (c.key[0], c.baseline, c.endpoint, round(c.subset, 9))


def linear_mlp_pairs(
    configs: Sequence[Config], main_endpoint: str
) -> dict[tuple[str, str], list[tuple[Config, Config]]]:
    """(lbfgs fp, mlp fp) -> [(lbfgs config, mlp config)] on all labels."""
    lin = [
        c
        for c in configs
        if c.protocol == "lbfgs" and is_full(c.subset) and c.endpoint == main_endpoint
    ]
    mlp = [
        c
        for c in configs
        if c.protocol == "mlp" and is_full(c.subset) and c.endpoint == main_endpoint
    ]
    out: dict[tuple[str, str], list[tuple[Config, Config]]] = {}
    for m in mlp:
        for c in lin:
            if _pair_key(c) == _pair_key(m):
                out.setdefault((c.fingerprint, m.fingerprint), []).append((c, m))
    return out


def prepare_figure3(
    configs: Sequence[Config], *, main_endpoint: str = "pre_logits"
) -> FigureData:
    """Linear vs MLP scatter (paper Fig. 3), a panel per fingerprint pair.

    Panel dict: ``title``, ``points``: list of dicts (``label``, ``trunk``,
    ``pretext``, ``x`` lbfgs Interval, ``y`` mlp Interval).
    """
    pairs = linear_mlp_pairs(configs, main_endpoint)
    panels = []
    for (fl, fm), items in pairs.items():
        points = [
            {
                "label": config_label(c),
                "trunk": c.trunk or "-",
                "pretext": c.pretext,
                "x": c.accuracy,
                "y": m.accuracy,
            }
            for c, m in items
        ]
        title = f"lbfgs {fl} vs mlp {fm}" if len(pairs) > 1 else "lbfgs vs mlp"
        panels.append({"title": title, "points": points})
    if not panels:
        return FigureData(
            "fig3",
            "needs configurations with both an lbfgs and an mlp result on all "
            f"labels at endpoint {main_endpoint!r}",
        )
    return FigureData("fig3", None, panels)


def _scatter_panels(ax: Any, points: Sequence[dict], trunks: list, pretexts: list):
    colors = dict(zip(trunks, _colors(len(trunks)), strict=True))
    for pt in points:
        x, xe = _pct(pt["x"])
        y, ye = _pct(pt["y"])
        ax.errorbar(
            x,
            y,
            xerr=xe,
            yerr=ye,
            fmt=_MARKERS[pretexts.index(pt["pretext"]) % len(_MARKERS)],
            color=colors[pt["trunk"]],
            ms=pt.get("size", 6),
            capsize=2,
            lw=0.8,
        )


def _legend_handles(trunks: list, pretexts: list) -> list:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=c, marker="o", ls="", label=t)
        for t, c in zip(trunks, _colors(len(trunks)), strict=True)
    ]
    handles += [
        Line2D(
            [],
            [],
            color="0.3",
            marker=_MARKERS[i % len(_MARKERS)],
            ls="",
            label=pretext_label(p),
        )
        for i, p in enumerate(pretexts)
    ]
    return handles


def figure3(
    data: Sequence[Mapping[str, Any]] | FigureData,
    path: str,
    *,
    main_endpoint: str = "pre_logits",
) -> list[str]:
    """Fig. 3 analogue: MLP vs linear probe, one point per configuration.

    Args/Returns: as ``figure2``.
    """
    data = _coerce(data, prepare_figure3, main_endpoint=main_endpoint)
    if data.reason:
        return []
    fig, axes = _new_figure(len(data.panels), panel_h=3.8)
    for ax, panel in zip(axes, data.panels, strict=True):
        pts = panel["points"]
        trunks = ordered_unique(p["trunk"] for p in pts)
        pretexts = ordered_unique(p["pretext"] for p in pts)
        _scatter_panels(ax, pts, trunks, pretexts)
        vals = [100 * p[k].mean for p in pts for k in ("x", "y")]
        lo, hi = min(vals) - 2, max(vals) + 2
        ax.plot([lo, hi], [lo, hi], color="0.5", ls=":", lw=1)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("linear (lbfgs) top-1 (%)")
        ax.set_ylabel("MLP top-1 (%)")
        ax.set_title(panel["title"], fontsize=9)
        ax.legend(handles=_legend_handles(trunks, pretexts), fontsize=7)
    fig.suptitle("Fig. 3 analogue: linear vs MLP probe")
    return _save(fig, path)


# --------------------------------------------------------------------------
# Fig. 4: pretext accuracy vs downstream accuracy.


def prepare_figure4(
    configs: Sequence[Config], *, main_endpoint: str = "pre_logits"
) -> FigureData:
    """Pretext vs downstream accuracy (paper Fig. 4), a panel per pretext.

    Panel dict: ``title``, ``points``: dicts (``label``, ``trunk``,
    ``pretext``, ``width``, ``size``, ``x`` pretext-top1 Interval, ``y``
    downstream Interval).
    """
    sel = [
        c
        for c in linear_main(configs, main_endpoint)
        if c.baseline is None and c.pretext_top1() is not None
    ]
    widths = order_widths(c.width for c in sel)
    keys = ordered_unique((c.pretext, c.fingerprint) for c in sel)
    fps = [k[1] for k in keys]
    panels = []
    for pretext, fp in keys:
        cs = [c for c in sel if (c.pretext, c.fingerprint) == (pretext, fp)]
        points = [
            {
                "label": config_label(c),
                "trunk": c.trunk or "-",
                "pretext": pretext,
                "width": c.width,
                "size": 4 + 3 * widths.index(c.width),
                "x": c.pretext_top1(),
                "y": c.accuracy,
            }
            for c in cs
        ]
        panels.append(
            {"title": pretext_label(pretext) + _fp_suffix(fp, fps), "points": points}
        )
    if not panels:
        return FigureData(
            "fig4",
            "needs pretext_metrics['top1'] on every seed of trained cells with "
            f"an lbfgs result at endpoint {main_endpoint!r} on all labels",
        )
    return FigureData("fig4", None, panels)


def figure4(
    data: Sequence[Mapping[str, Any]] | FigureData,
    path: str,
    *,
    main_endpoint: str = "pre_logits",
) -> list[str]:
    """Fig. 4 analogue: pretext accuracy is not predictive across trunks.

    Colour = trunk, marker size = width. Args/Returns: as ``figure2``.
    """
    data = _coerce(data, prepare_figure4, main_endpoint=main_endpoint)
    if data.reason:
        return []
    fig, axes = _new_figure(len(data.panels))
    all_trunks = ordered_unique(p["trunk"] for pn in data.panels for p in pn["points"])
    for ax, panel in zip(axes, data.panels, strict=True):
        pts = panel["points"]
        pretexts = ordered_unique(p["pretext"] for p in pts)
        _scatter_panels(ax, pts, all_trunks, pretexts)
        ax.set_xlabel("pretext-task top-1 (%)")
        ax.set_ylabel("downstream top-1 (%)")
        ax.set_title(panel["title"], fontsize=9)
    from matplotlib.lines import Line2D

    sizes = ordered_unique(
        (p["width"], p["size"]) for pn in data.panels for p in pn["points"]
    )
    handles = _legend_handles(all_trunks, []) + [
        Line2D([], [], color="0.4", marker="o", ms=size, ls="", label=width_label(w))
        for w, size in sorted(sizes, key=lambda x: x[1])
        if w is not None
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    fig.suptitle("Fig. 4 analogue: pretext vs downstream accuracy (size = width)")
    return _save(fig, path)


# --------------------------------------------------------------------------
# Fig. 5: accuracy by endpoint.


def prepare_figure5(configs: Sequence[Config]) -> FigureData:
    """Accuracy by endpoint (paper Fig. 5): panel per pretext, line per trunk.

    lbfgs on all labels. Panel dict: ``title``, ``endpoints`` (x, depth
    order), ``lines``: list of ``(label, (trunk, width), {endpoint:
    Interval})``.
    """
    sel = [
        c
        for c in configs
        if c.protocol == "lbfgs" and is_full(c.subset) and c.pretext != "pixels"
    ]
    keys = ordered_unique((c.pretext, c.fingerprint) for c in sel)
    fps = [k[1] for k in keys]
    panels = []
    for pretext, fp in keys:
        cs = [c for c in sel if (c.pretext, c.fingerprint) == (pretext, fp)]
        line_keys = ordered_unique((c.trunk, c.width, c.extra) for c in cs)
        multi_w = len({k[1] for k in line_keys}) > 1
        lines = []
        for trunk, width, extra in line_keys:
            pts = {
                c.endpoint: c.accuracy
                for c in cs
                if (c.trunk, c.width, c.extra) == (trunk, width, extra)
            }
            if len(pts) < 2:
                continue
            label = " ".join(
                x
                for x in (
                    trunk or "-",
                    width_label(width) if multi_w else "",
                    ",".join(f"{k}={v}" for k, v in extra),
                )
                if x
            )
            lines.append((label, (trunk, width), pts))
        if lines:
            eps = order_endpoints(e for _, _, pts in lines for e in pts)
            panels.append(
                {
                    "title": pretext_label(pretext) + _fp_suffix(fp, fps),
                    "endpoints": eps,
                    "lines": lines,
                }
            )
    if not panels:
        return FigureData(
            "fig5", "needs lbfgs results at two or more endpoints of one model"
        )
    return FigureData("fig5", None, panels)


def figure5(data: Sequence[Mapping[str, Any]] | FigureData, path: str) -> list[str]:
    """Fig. 5 analogue: probe accuracy by endpoint depth.

    Args/Returns: as ``figure2`` (no endpoint option: all endpoints shown).
    """
    data = _coerce(data, prepare_figure5)
    if data.reason:
        return []
    fig, axes = _new_figure(len(data.panels))
    style = _styler(data.panels)
    for ax, panel in zip(axes, data.panels, strict=True):
        eps = panel["endpoints"]
        for label, key, pts in panel["lines"]:
            xs = [i for i, e in enumerate(eps) if e in pts]
            ms = [_pct(pts[eps[i]]) for i in xs]
            ax.errorbar(
                xs,
                [m for m, _ in ms],
                yerr=[e for _, e in ms],
                ms=4,
                capsize=2,
                lw=1.2,
                label=label,
                **style(key),
            )
        ax.set_xticks(range(len(eps)), eps, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(panel["title"], fontsize=9)
    _figure_legend(fig, axes)
    fig.suptitle("Fig. 5 analogue: linear probe accuracy by endpoint")
    return _save(fig, path)


# --------------------------------------------------------------------------
# Fig. 7: accuracy vs width.


def prepare_figure7(
    configs: Sequence[Config], *, main_endpoint: str = "pre_logits"
) -> FigureData:
    """Accuracy vs widening factor (paper Fig. 7), a panel per label subset.

    lbfgs at ``main_endpoint``. Panel dict: ``title``, ``subset``,
    ``widths`` (x, ascending), ``lines``: ``(label, (trunk, pretext),
    {width: Interval})``.
    """
    sel = [
        c
        for c in configs
        if c.protocol == "lbfgs"
        and c.endpoint == main_endpoint
        and c.baseline is None
        and c.width is not None
    ]
    keys = ordered_unique((round(c.subset, 9), c.fingerprint) for c in sel)
    keys.sort(key=lambda k: k[0])
    panels = []
    for subset, fp in keys:
        cs = [c for c in sel if (round(c.subset, 9), c.fingerprint) == (subset, fp)]
        lines = []
        for pretext, trunk, extra in ordered_unique(
            (c.pretext, c.trunk, c.extra) for c in cs
        ):
            pts = {
                c.width: c.accuracy
                for c in cs
                if (c.pretext, c.trunk, c.extra) == (pretext, trunk, extra)
            }
            if len(pts) >= 2:
                label = f"{pretext_label(pretext)}, {trunk}" + "".join(
                    f", {k}={v}" for k, v in extra
                )
                lines.append((label, (trunk, pretext), pts))
        if lines:
            n_fp = sum(1 for k in keys if k[0] == subset)
            title = f"{100 * subset:g}% of labels" + (f" [fp {fp}]" if n_fp > 1 else "")
            widths = order_widths(w for _, _, pts in lines for w in pts)
            panels.append(
                {"title": title, "subset": subset, "widths": widths, "lines": lines}
            )
    if not panels:
        return FigureData(
            "fig7",
            f"needs lbfgs results at endpoint {main_endpoint!r} for two or more "
            "widths of one (pretext, trunk)",
        )
    return FigureData("fig7", None, panels)


def figure7(
    data: Sequence[Mapping[str, Any]] | FigureData,
    path: str,
    *,
    main_endpoint: str = "pre_logits",
) -> list[str]:
    """Fig. 7 analogue: wider trunks are better (also with few labels).

    Numeric widths are placed on a log2 axis. Args/Returns: as ``figure2``.
    """
    data = _coerce(data, prepare_figure7, main_endpoint=main_endpoint)
    if data.reason:
        return []
    fig, axes = _new_figure(len(data.panels))
    style = _styler(data.panels)
    for ax, panel in zip(axes, data.panels, strict=True):
        widths = panel["widths"]
        try:
            pos = [float(w) for w in widths]
            numeric = all(p > 0 for p in pos)
        except (TypeError, ValueError):
            numeric = False
        if not numeric:
            pos = list(range(len(widths)))
        for label, key, pts in panel["lines"]:
            idx = [i for i, w in enumerate(widths) if w in pts]
            ms = [_pct(pts[widths[i]]) for i in idx]
            ax.errorbar(
                [pos[i] for i in idx],
                [m for m, _ in ms],
                yerr=[e for _, e in ms],
                ms=4,
                capsize=2,
                lw=1.2,
                label=label,
                **style(key),
            )
        if numeric:
            ax.set_xscale("log", base=2)
        ax.set_xticks(pos, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("widening factor")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(panel["title"], fontsize=9)
    _figure_legend(fig, axes)
    fig.suptitle("Fig. 7 analogue: accuracy vs width (per label fraction)")
    return _save(fig, path)


# --------------------------------------------------------------------------
# Fig. 8: SGD probe over epochs.


def curve_series(c: Config) -> tuple[str, list[int], np.ndarray] | None:
    """``(metric, epochs [E], values [S, E])`` of a config's SGD curves.

    The metric is ``test_top1`` when every curve entry has it, else
    ``val_top1``; epochs are those present in every seed's curve. None when
    a record lacks a curve or no common epoch has the metric.
    """
    curves = [r.get("curve") for r in c.records]
    if not curves or any(not cv for cv in curves):
        return None
    for metric in ("test_top1", "val_top1"):
        if all(e.get(metric) is not None for cv in curves for e in cv):
            break
    else:
        return None
    per_seed = [{int(e["epoch"]): float(e[metric]) for e in cv} for cv in curves]
    epochs = sorted(set.intersection(*(set(d) for d in per_seed)))
    if not epochs:
        return None
    values = np.array([[d[e] for e in epochs] for d in per_seed])
    return metric, epochs, values


def prepare_figure8(configs: Sequence[Config]) -> FigureData:
    """SGD accuracy vs epoch (paper Fig. 8).

    A panel per (fingerprint, label subset, width), a line per (pretext,
    trunk, other axes, endpoint). Panel dict: ``title``, ``metric``,
    ``lines``: ``(label, (trunk, pretext), (epochs [E], values [S, E]))``.
    """
    sel = [c for c in configs if c.protocol == "sgd"]
    keys = ordered_unique((c.fingerprint, round(c.subset, 9), c.width) for c in sel)
    fps = [k[0] for k in keys]
    panels = []
    for fp, subset, width in keys:
        lines, metrics = [], []
        for c in sel:
            if (c.fingerprint, round(c.subset, 9), c.width) != (fp, subset, width):
                continue
            series = curve_series(c)
            if series is None:
                continue
            metric, epochs, values = series
            metrics.append(metric)
            label = config_label(c, with_width=False)
            if c.endpoint != "pre_logits":
                label += f" @{c.endpoint}"
            lines.append((label, (c.trunk, c.pretext), (epochs, values)))
        if lines:
            title = ", ".join(
                x
                for x in (
                    "sgd",
                    width_label(width),
                    f"{100 * subset:g}% of labels",
                    _fp_suffix(fp, fps).strip(),
                )
                if x
            )
            metric = "test_top1" if set(metrics) == {"test_top1"} else "mixed"
            panels.append({"title": title, "metric": metric, "lines": lines})
    if not panels:
        return FigureData("fig8", "needs sgd results with per-epoch curves")
    return FigureData("fig8", None, panels)


def figure8(data: Sequence[Mapping[str, Any]] | FigureData, path: str) -> list[str]:
    """Fig. 8 analogue: the SGD probe keeps improving with more epochs.

    Mean over seeds, band = min..max over seeds. Args/Returns: as ``figure2``.
    """
    data = _coerce(data, prepare_figure8)
    if data.reason:
        return []
    fig, axes = _new_figure(len(data.panels))
    style = _styler(data.panels)
    for ax, panel in zip(axes, data.panels, strict=True):
        for label, key, (epochs, values) in panel["lines"]:
            st = style(key)
            ax.plot(
                epochs,
                100 * values.mean(0),
                label=label,
                color=st["color"],
                ls=st["ls"],
                lw=1.2,
            )
            if values.shape[0] > 1:
                ax.fill_between(
                    epochs,
                    100 * values.min(0),
                    100 * values.max(0),
                    color=st["color"],
                    alpha=0.15,
                    lw=0,
                )
        ax.set_xlabel("epoch")
        ylabel = "test" if panel["metric"] == "test_top1" else "test/val"
        ax.set_ylabel(f"{ylabel} top-1 (%)")
        ax.set_title(panel["title"], fontsize=9)
    _figure_legend(fig, axes)
    fig.suptitle("Fig. 8 analogue: SGD probe accuracy vs epoch")
    return _save(fig, path)
