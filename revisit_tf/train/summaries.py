"""TensorBoard summaries beyond the loop's scalars: inputs, config, probe sweep.

Three things a person wants to see in TensorBoard and the training scalars do
not show:

* **What the network is asked to do.** ``pretext_grid(batch, model)`` turns a
  training batch (what ``pp`` made, ``models.pretext`` contract) into one
  picture per source example, laid out the way the task reads, and
  ``write_pretext_inputs`` writes it with ``tf.summary.image`` under
  ``inputs/<model name>`` (``pretrain`` does it once per run, at the step the
  run starts or resumes at). The layout follows the batch's structure, so a
  new task with the same structure is drawn too:

  * ``image [B, H, W, C]``: the image (supervised).
  * ``image [B, K, H, W, C]``: the ``K`` views side by side (Rotation's 4
    rotations, Exemplar's copies, SimCLR's two views).
  * patches ``[B, 9, h, w, C]`` and a head that combines them by a table
    (``heads.PatchCombine``): for a table of permutations (Jigsaw), the
    patches at their own cells of the 3x3 grid, then one shuffled puzzle per
    label (cell ``q`` holds patch ``perm[q]``, ``perm = table[label]``, the
    order the head combines them); for a table of subsets (RPL's pairs), one
    grid per label with its patches (neighbour and centre) at their own
    cells and the other cells checkered.
  * ``image``, ``target`` and ``mask`` ``[B, H, W, .]``: masked input |
    target | mask (inpainting).

  Network inputs are in [-1, 1] or standardised per image or patch, so every
  row is rescaled for display: min-max over all the panels of its source
  example, jointly (the views keep their differences of brightness), to
  [0, 1]; the mask is drawn as it is (0 black, 1 white). Separators are
  white, empty cells a grey checkerboard, and small pictures are enlarged by
  an integer factor (nearest neighbour). The image's description says all
  this, with the input's value range and the first example's labels.

* **The run's configuration.** ``write_config_text(logdir, text)`` writes
  gin's operative config as a text summary (a markdown code block) under
  ``config/operative_config``.

* **The probe's L2 sweep.** ``write_probe_sweep(logdir, rows)`` writes each
  L-BFGS row's ``l2_path`` as scalars (``<protocol>/<endpoint>/val_top1``,
  ``train_top1``, ``iterations``; ``test_top1`` at the selected L2) and the
  path as a markdown table (``<protocol>/<endpoint>/l2_path``). A scalar
  needs an integer step: step = ``l2_step(l2) = round(100 * log10(1 / l2))``
  (200 is l2 = 1e-2, 300 is 1e-3, 352 is 3e-4; l2 = 0 is ``ZERO_L2_STEP``),
  so the x axis is the penalty on a log scale, the same for any grid, and
  the sweep's visiting order (largest l2 first) runs left to right.
  ``linear_probe`` writes to ``workdir/probe/tensorboard``.

Writers: ``write_pretext_inputs`` writes to the default writer (the loop's,
``workdir/tensorboard``); the other two open their own writer on ``logdir``.
TensorBoard's Python loader tails only the newest event file of a directory,
so never give them a directory that another open writer is writing to (the
config goes to ``workdir/tensorboard/config``, a run of its own).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from revisit_tf.models import heads

_logger = logging.getLogger(__name__)

NUM_EXAMPLES = 4  # source examples drawn per input summary
MIN_DISPLAY_SIDE = 96  # pictures lower than this are enlarged (pixels)
MAX_UPSCALE = 8
GAP = 3  # pixels between panels
CELL_GAP = 1  # pixels between the cells of a patch grid
SEPARATOR = 1.0  # white
EMPTY = (0.35, 0.65)  # a cell with no patch: a checkerboard of these greys
CHECK = 2  # pixels per square of that checkerboard
L2_STEP_SCALE = 100
ZERO_L2_STEP = 10 * L2_STEP_SCALE  # l2 = 0 drawn as l2 = 1e-10

_RESCALED = (
    "Display: each row rescaled to [0, 1] (min-max over all the panels of its "
    "source example, jointly)"
)
_TASK_TEXT = {
    "rotation": "the 4 copies rotated by 0, 90, 180 and 270 degrees "
    "counter-clockwise (labels 0-3)",
    "exemplar": "the augmented copies of one image (one surrogate class)",
    "simclr": "the two augmented views of one image (a positive pair)",
}


# --- Pure layout functions: arrays in, float32 pictures in [0, 1] out. -------


def rescale(x: np.ndarray) -> np.ndarray:
    """Min-max of each example ``x[b]`` (all its other axes jointly) to [0, 1].

    Constant examples map to 0.5. Returns float32 of ``x``'s shape.
    """
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim))
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    span = hi - lo
    out = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.5)
    return out.astype(np.float32)


def tile(
    panels: np.ndarray, cols: int, *, gap: int = GAP, fill: float = SEPARATOR
) -> np.ndarray:
    """Lays ``panels [N, h, w, C]`` out row-major, ``cols`` per row.

    Returns ``[rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, C]``
    with ``fill`` between panels and in unused places of the last row.
    """
    panels = np.asarray(panels, np.float32)
    n, h, w, c = panels.shape
    rows = -(-n // cols)
    out = np.full(
        (rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, c),
        fill,
        np.float32,
    )
    for i in range(n):
        r, q = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = (
            panels[i]
        )
    return out


def images_grid(images: np.ndarray) -> np.ndarray:
    """``[B, H, W, C]`` -> the images, rescaled per image: ``[B, H, W, C]``."""
    images = _check_rank("images", images, 4)
    return rescale(images)


def views_grid(views: np.ndarray, *, gap: int = GAP) -> np.ndarray:
    """``[B, K, H, W, C]`` -> the ``K`` views of each example side by side.

    Returns ``[B, H, K * W + (K - 1) * gap, C]``; view ``k`` is the ``k``-th
    panel from the left (Rotation: copy ``k`` is rotated by ``k * 90``
    degrees counter-clockwise).
    """
    views = rescale(_check_rank("views", views, 5))
    return np.stack([tile(v, len(v), gap=gap) for v in views])


def empty_cell(height: int, width: int, channels: int) -> np.ndarray:
    """The picture of a cell without a patch: a grey checkerboard ``[h, w, C]``."""
    rows = (np.arange(height) // CHECK)[:, None]
    cols = (np.arange(width) // CHECK)[None, :]
    board = np.where((rows + cols) % 2 == 0, EMPTY[0], EMPTY[1]).astype(np.float32)
    return np.repeat(board[..., None], channels, axis=-1)


def patch_panel(
    patches: np.ndarray,
    cells: Sequence[int],
    *,
    side: int = 3,
    gap: int = CELL_GAP,
) -> np.ndarray:
    """One ``side x side`` grid: cell ``q`` (row-major) shows ``patches[cells[q]]``.

    ``cells[q] < 0`` leaves cell ``q`` empty (``empty_cell``). Patches ``[P,
    h, w, C]`` already in display range. Returns ``[side * h + (side - 1) *
    gap, ..., C]`` with white separators.
    """
    patches = np.asarray(patches, np.float32)
    if len(cells) != side * side:
        raise ValueError(f"cells must name {side * side} cells; got {len(cells)}.")
    empty = empty_cell(*patches.shape[1:])
    picked = np.stack([patches[i] if i >= 0 else empty for i in cells])
    return tile(picked, side, gap=gap)


def jigsaw_grid(
    patches: np.ndarray,
    permutations: np.ndarray,
    labels: np.ndarray,
    *,
    gap: int = GAP,
) -> np.ndarray:
    """Jigsaw: the true 3x3 grid, then the shuffled grid of every label.

    Args:
        patches: ``[B, 9, h, w, C]``, patch ``i`` from cell ``i`` (row-major).
        permutations: int ``[n, 9]``: label ``l`` concatenates the patch
            embeddings in the order ``permutations[l]``.
        labels: int ``[B, m]`` (or ``[B]``).

    Returns:
        ``[B, H, (1 + m) * W' + m * gap, C]``: panel 0 the patches at their
        own cells; panel ``1 + j`` the puzzle of label ``labels[b, j]``,
        whose cell ``q`` holds patch ``perm[q]`` (put cell ``q`` back at
        ``perm[q]``, the inverse permutation, to get panel 0).
    """
    patches = rescale(_check_rank("patches", patches, 5))
    table = np.asarray(permutations)
    labels = np.asarray(labels).reshape(len(patches), -1)
    num = patches.shape[1]
    side = math.isqrt(num)
    if side * side != num or table.ndim != 2 or table.shape[1] != num:
        raise ValueError(
            f"jigsaw_grid: expected a square number of patches and a [n, {num}] "
            f"table; got {num} patches and a table of shape {list(table.shape)}."
        )
    out = []
    for example, example_labels in zip(patches, labels, strict=True):
        panels = [patch_panel(example, list(range(num)), side=side)]
        panels += [
            patch_panel(example, table[lab], side=side) for lab in example_labels
        ]
        out.append(tile(np.stack(panels), len(panels), gap=gap))
    return np.stack(out)


def patch_set_grid(
    patches: np.ndarray, table: np.ndarray, labels: np.ndarray, *, gap: int = GAP
) -> np.ndarray:
    """Patch subsets (RPL's pairs): each label's patches at their own cells.

    Args:
        patches: ``[B, P, h, w, C]`` of a ``sqrt(P) x sqrt(P)`` grid.
        table: int ``[n, k]``, ``k < P``: label ``l`` combines patches
            ``table[l]`` (RPL: ``(neighbour, centre 4)``).
        labels: int ``[B, m]`` (or ``[B]``).

    Returns:
        ``[B, H, m * W' + (m - 1) * gap, C]``: panel ``j`` draws the patches of
        label ``labels[b, j]`` in their cells of the grid, the others empty
        (``empty_cell``).
    """
    patches = rescale(_check_rank("patches", patches, 5))
    table = np.asarray(table)
    labels = np.asarray(labels).reshape(len(patches), -1)
    num = patches.shape[1]
    side = math.isqrt(num)
    if side * side != num or table.ndim != 2:
        raise ValueError(
            f"patch_set_grid: expected a square number of patches and a [n, k] "
            f"table; got {num} patches and a table of shape {list(table.shape)}."
        )
    out = []
    for example, example_labels in zip(patches, labels, strict=True):
        panels = []
        for lab in example_labels:
            shown = set(int(i) for i in table[lab])
            cells = [q if q in shown else -1 for q in range(num)]
            panels.append(patch_panel(example, cells, side=side))
        out.append(tile(np.stack(panels), len(panels), gap=gap))
    return np.stack(out)


def inpainting_grid(
    image: np.ndarray, target: np.ndarray, mask: np.ndarray, *, gap: int = GAP
) -> np.ndarray:
    """Masked input | target | mask, per example: ``[B, H, 3 W + 2 gap, C]``.

    The input and the target are rescaled jointly (the blanked region keeps
    its grey); the mask ``[B, H, W, 1]`` in [0, 1] is drawn as it is.
    """
    image = _check_rank("image", image, 4)
    target = _check_rank("target", target, 4)
    mask = np.clip(np.asarray(_check_rank("mask", mask, 4), np.float32), 0, 1)
    pair = rescale(np.stack([image, target], axis=1))  # [B, 2, H, W, C]
    mask = np.broadcast_to(mask, image.shape)
    panels = np.concatenate([pair, mask[:, None]], axis=1)  # [B, 3, H, W, C]
    return np.stack([tile(p, 3, gap=gap) for p in panels])


def upscale(grid: np.ndarray, min_side: int = MIN_DISPLAY_SIDE) -> np.ndarray:
    """Enlarges ``[N, H, W, C]`` by an integer factor so that ``H >= min_side``.

    Nearest neighbour (every pixel becomes an ``f x f`` block), ``f <=
    MAX_UPSCALE``; pictures already high enough are returned unchanged.
    """
    height = grid.shape[1]
    factor = max(1, min(MAX_UPSCALE, -(-min_side // max(height, 1))))
    if factor == 1:
        return grid
    return np.repeat(np.repeat(grid, factor, axis=1), factor, axis=2)


# --- Dispatch on the batch's structure. --------------------------------------


def patch_table(model: Any) -> np.ndarray | None:
    """The patch table of the model's ``heads.PatchCombine`` layer, or None."""
    if model is None:
        return None
    stack = list(getattr(model, "layers", ()))
    while stack:
        layer = stack.pop()
        if isinstance(layer, heads.PatchCombine):
            return np.asarray(layer.table, np.int32)
        stack.extend(getattr(layer, "layers", ()))
    return None


def pretext_grid(
    batch: Mapping[str, Any], model: Any = None, *, max_examples: int = NUM_EXAMPLES
) -> tuple[np.ndarray, str]:
    """The picture of a training batch (see the module docstring).

    Args:
        batch: a (per-replica) training batch, ``{"image": [B, ...], ...}``, as
            numpy arrays or eager tensors.
        model: the pretext model (its name, and the patch table of a patch
            task's head), or None.
        max_examples: source examples drawn (the first ones).

    Returns:
        ``(grid, description)``: float32 ``[min(B, max_examples), H, W, C]``
        in [0, 1] and a markdown description of the layout.

    Raises:
        ValueError: a batch this module cannot draw (no ``image``, a rank
            other than 4 or 5, or a channel count TensorBoard cannot show).
    """
    if "image" not in batch:
        raise ValueError(f"The batch has no 'image'; keys {sorted(batch)}.")
    data = {k: _numpy(v)[:max_examples] for k, v in batch.items()}
    image = data["image"]
    name = getattr(model, "name", None) or "pretext"
    labels = data.get("label")
    table = patch_table(model)
    if "target" in data and "mask" in data and image.ndim == 4:
        grid = inpainting_grid(image, data["target"], data["mask"])
        layout = "masked input | target | mask (white: the region to predict)"
        labels = None
    elif image.ndim == 5 and table is not None and labels is not None:
        num = image.shape[1]
        side = math.isqrt(num)
        if table.shape[1] == num:
            grid = jigsaw_grid(image, table, labels)
            layout = (
                f"first the {num} patches at their own cells of the {side}x{side} "
                "grid (row-major), then one puzzle per label: cell q holds patch "
                "perm[q], perm = permutations[label] (the order the head combines "
                "them)"
            )
        else:
            grid = patch_set_grid(image, table, labels)
            layout = (
                "one panel per label: the patches it combines "
                f"({', '.join(str(tuple(row)) for row in table[:8].tolist())}"
                f"{', ...' if len(table) > 8 else ''}) drawn at their own cells of "
                f"the {side}x{side} grid, the other cells checkered"
            )
    elif image.ndim == 5:
        grid = views_grid(image)
        what = _TASK_TEXT.get(name, f"the {image.shape[1]} views of one image")
        layout = f"{what}, left to right"
    elif image.ndim == 4:
        grid = images_grid(image)
        layout = "the input image"
    else:
        raise ValueError(
            f"Cannot draw a batch image of shape {list(image.shape)}: expected "
            "[B, H, W, C] or [B, K, H, W, C]."
        )
    if grid.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"TensorBoard shows 1, 3 or 4 channels; the picture has {grid.shape[-1]}."
        )
    lines = [
        f"**{name}** training inputs: one picture per source example (the first "
        f"{len(grid)} of the batch); {layout}.",
        f"{_RESCALED}; network input range [{float(image.min()):.3g}, "
        f"{float(image.max()):.3g}].",
    ]
    if labels is not None:
        first = np.asarray(labels[0]).reshape(-1)
        shown = " ".join(str(v) for v in first[:16].tolist())
        lines.append(
            f"Labels of the first example: {shown}{' ...' * (first.size > 16)}."
        )
    return grid, "\n\n".join(lines)


def write_pretext_inputs(
    batch: Mapping[str, Any],
    model: Any = None,
    *,
    step: int,
    max_examples: int = NUM_EXAMPLES,
    min_side: int = MIN_DISPLAY_SIDE,
) -> str:
    """Writes ``pretext_grid`` to the default summary writer; returns the tag.

    The tag is ``inputs/<model name>``; call inside ``writer.as_default()``.
    """
    grid, description = pretext_grid(batch, model, max_examples=max_examples)
    tag = f"inputs/{getattr(model, 'name', None) or 'pretext'}"
    tf.summary.image(
        tag,
        upscale(grid, min_side),
        step=step,
        max_outputs=len(grid),
        description=description,
    )
    return tag


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def _check_rank(what: str, x: Any, rank: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != rank:
        raise ValueError(f"{what} must have rank {rank}; got shape {list(x.shape)}.")
    return x


# --- Config text. ------------------------------------------------------------

CONFIG_TAG = "config/operative_config"


def config_markdown(text: str) -> str:
    """``text`` as a fenced markdown code block (shown verbatim)."""
    return "```\n" + text.rstrip("\n").replace("```", "'''") + "\n```"


def write_config_text(
    logdir: str, text: str, step: int = 0, *, tag: str = CONFIG_TAG
) -> None:
    """Writes ``text`` (gin's operative config) as a TensorBoard text summary.

    Opens, writes and closes its own writer on ``logdir``; use a directory no
    open writer writes to (``workdir/tensorboard/config``, see the module
    docstring).
    """
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        tf.summary.text(
            tag,
            config_markdown(text),
            step=step,
            description="The operative config: every gin binding the run used.",
        )
    writer.close()


# --- Probe sweep. ------------------------------------------------------------

_L2_AXIS = (
    "x axis: step = round(100 * log10(1 / l2)) (200: l2 = 1e-2, 300: 1e-3, "
    f"352: 3e-4; l2 = 0 at {ZERO_L2_STEP}); the sweep visits the largest l2 "
    "(leftmost) first."
)


def l2_step(l2: float) -> int:
    """The TensorBoard step of a penalty: ``round(100 * log10(1 / l2))``."""
    if l2 < 0 or not math.isfinite(l2):
        raise ValueError(f"l2 must be finite and >= 0; got {l2!r}.")
    if l2 == 0:
        return ZERO_L2_STEP
    return round(-L2_STEP_SCALE * math.log10(l2))


def sweep_prefix(row: Mapping[str, Any]) -> str:
    """``lbfgs/pre_logits`` (``lbfgs/pre_logits_10pct`` for a label subset)."""
    prefix = f"{row['protocol']}/{row['endpoint']}"
    subset = row.get("subset", 1.0)
    if subset is not None and subset != 1.0:
        prefix += f"_{100 * subset:.3g}pct"
    return prefix


def probe_sweep_scalars(row: Mapping[str, Any]) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` of a probe row's L2 path; ``[]`` without one.

    Per L2 of ``row["l2_path"]``: ``val_top1``, ``train_top1`` (when
    recorded) and ``iterations``; at the selected ``row["l2"]``:
    ``test_top1``.
    """
    path = row.get("l2_path") or []
    prefix = sweep_prefix(row)
    out = []
    steps: dict[int, float] = {}
    for point in path:
        step = l2_step(point["l2"])
        if steps.setdefault(step, point["l2"]) != point["l2"]:
            _logger.warning(
                "Probe sweep %s: l2 %g and %g share TensorBoard step %d; the "
                "later one hides the earlier.",
                prefix,
                steps[step],
                point["l2"],
                step,
            )
        for key in ("val_top1", "train_top1", "iterations"):
            if point.get(key) is not None:
                out.append((f"{prefix}/{key}", step, float(point[key])))
    if path and row.get("l2") is not None and row.get("test_top1") is not None:
        out.append((f"{prefix}/test_top1", l2_step(row["l2"]), float(row["test_top1"])))
    return out


def probe_sweep_table(row: Mapping[str, Any]) -> str:
    """The L2 path of a row as a markdown table (the selected l2 in bold)."""
    lines = [
        "| l2 | step | train top-1 | val top-1 | iterations |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in row.get("l2_path") or []:
        train = "-" if p.get("train_top1") is None else f"{100 * p['train_top1']:.2f}%"
        l2 = f"**{p['l2']:.1e}**" if p["l2"] == row.get("l2") else f"{p['l2']:.1e}"
        lines.append(
            f"| {l2} | {l2_step(p['l2'])} | {train} | {100 * p['val_top1']:.2f}% | "
            f"{p.get('iterations', '-')} |"
        )
    test = row.get("test_top1")
    if test is not None:
        lines.append(f"\nTest top-1 at the selected l2 (bold): {100 * test:.2f}%.")
    return "\n".join(lines)


def write_probe_sweep(logdir: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Writes the L2 path of every row that has one; returns how many.

    Tags: ``<prefix>/{val_top1,train_top1,iterations,test_top1}`` (scalars,
    step ``l2_step(l2)``) and ``<prefix>/l2_path`` (text), ``<prefix> =
    sweep_prefix(row)``. One writer on ``logdir``, closed on return.
    """
    rows = [r for r in rows if r.get("l2_path")]
    if not rows:
        return 0
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for row in rows:
            for tag, step, value in probe_sweep_scalars(row):
                tf.summary.scalar(tag, value, step=step, description=_L2_AXIS)
            tf.summary.text(
                f"{sweep_prefix(row)}/l2_path",
                probe_sweep_table(row),
                step=l2_step(row["l2"]) if row.get("l2") is not None else 0,
            )
    writer.close()
    return len(rows)
