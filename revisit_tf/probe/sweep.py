"""The L2 path of the L-BFGS probe: one loop for the whole-batch and sharded fits.

Place in the data flow (stage 6): ``lbfgs.sweep_l2`` and
``sharded.sweep_l2_sharded`` validate and prepare their data, then hand
``run_path`` two closures, ``fit(l2, initial) -> ProbeFit`` and
``score(fit) -> (train_top1, val_top1)``; the selection rules live here.

The path: the grid is visited from the largest penalty to the smallest
(strongly regularised problems are well conditioned and solve in few
iterations, and each solution warm-starts the next, as for glmnet's
regularisation paths). The fit with the best validation top-1 is kept; ties
go to the larger l2, the simpler model.

It cannot silently over- or under-regularise: when the pick is at an edge of
the grid, the path continues past that edge in the grid's log spacing at that
edge (warm-started from the edge fit) until the validation top-1 has not
improved for ``PATIENCE`` points in a row or the l2 would pass
``LOWER_LIMIT`` / ``UPPER_LIMIT``. A point added past an edge is selected only
if it is strictly better. The added l2s are ``SweepResult.l2_extended`` and
rows of the table (``SweepPoint.extended``). A pick that is still at an end
of the visited path (a limit reached, or ``extend=False``) gets a warning,
logged and kept in ``SweepResult.warnings`` with the fits' own warnings
(non-convergence).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from revisit_tf import progress as progress_lib
from revisit_tf.probe import model

_logger = logging.getLogger(__name__)

PATIENCE = 2
LOWER_LIMIT = 1e-9
UPPER_LIMIT = 1e1


def _rounded(value: float) -> float:
    """``value`` to 12 significant digits (``1e-5 * 0.1`` -> ``1e-6``)."""
    return float(f"{value:.12g}")


def run_path(
    grid: Sequence[float],
    fit: Callable[[float, model.ProbeFit | None], model.ProbeFit],
    score: Callable[[model.ProbeFit], tuple[float, float]],
    *,
    standardizer: model.Standardizer | None,
    warm_start: bool = True,
    extend: bool = True,
    label: str = "",
) -> model.SweepResult:
    """Runs the L2 path (module docstring) and selects on validation top-1.

    Args:
        grid: distinct l2 values ``>= 0``, largest first
            (``validation.check_l2_grid``).
        fit: ``fit(l2, initial)`` solves at ``l2`` from ``initial`` (None: cold).
        score: ``(train_top1, val_top1)`` of a fit, in ``[0, 1]``.
        standardizer: stored in the result (the map the fits' features had).
        warm_start: start each fit from the previous (nearest) solution.
        extend: continue past an edge pick (module docstring).
        label: names the problem (e.g. the endpoint) in the log and warnings.

    Returns:
        ``model.SweepResult`` with ``table`` in visiting order, ``l2_extended``
        and ``warnings``.
    """
    prefix = f"{label}: " if label else ""
    progress = progress_lib.Progress(len(grid))
    table: list[model.SweepPoint] = []
    fits: list[model.ProbeFit] = []
    state = {"best": None, "best_val": -1.0}

    def visit(l2, initial, extended):
        result = fit(l2, initial if warm_start else None)
        train_top1, val_top1 = score(result)
        table.append(model.SweepPoint.of_fit(result, train_top1, val_top1, extended))
        fits.append(result)
        _logger.info(
            "%sl2 %.1e%s: train %.2f%%, val %.2f%% (%d iterations%s, %.1fs); path %s.",
            prefix,
            l2,
            " (past the grid's edge)" if extended else "",
            100 * train_top1,
            100 * val_top1,
            result.iterations,
            "" if result.converged else ", NOT converged",
            result.seconds,
            progress.summary(len(table)),
        )
        # Strict ">": the grid is descending, so ties keep the larger l2; an
        # added point must be strictly better in either direction.
        improved = val_top1 > state["best_val"]
        if improved:
            state["best"], state["best_val"] = result, val_top1
        return result, improved

    previous = None
    for l2 in grid:
        previous, _ = visit(l2, previous, False)

    added: list[float] = []
    best_l2 = state["best"].l2
    if extend and len(grid) >= 2 and best_l2 in (grid[0], grid[-1]):
        downward = best_l2 == grid[-1]
        ratio = grid[-1] / grid[-2] if downward else grid[0] / grid[1]
        edge = grid[-1] if downward else grid[0]
        start = fits[-1] if downward else fits[0]
        misses, k = 0, 1
        while edge > 0 and misses < PATIENCE:
            l2 = _rounded(edge * ratio**k)
            if (downward and l2 < LOWER_LIMIT * (1 - 1e-9)) or (
                not downward and l2 > UPPER_LIMIT * (1 + 1e-9)
            ):
                break
            progress.total += 1
            start, improved = visit(l2, start, True)
            added.append(l2)
            misses = 0 if improved else misses + 1
            k += 1
        if added:
            _logger.info(
                "%sl2 path extended %s the grid by %s; selected l2 %.1e.",
                prefix,
                "below" if downward else "above",
                ", ".join(f"{v:.1e}" for v in added),
                state["best"].l2,
            )

    warnings = [w for f in fits for w in f.warnings]
    visited = [p.l2 for p in table]
    best = state["best"]
    if len(visited) >= 2 and best.l2 in (min(visited), max(visited)):
        side = "smallest" if best.l2 == min(visited) else "largest"
        message = (
            f"{prefix}the selected l2 {best.l2:.1e} is the {side} on the path "
            f"({min(visited):.1e} .. {max(visited):.1e}"
            f"{'' if extend else ', extension off'}): the optimum may lie "
            "beyond it."
        )
        _logger.warning(message)
        warnings.append(message)
    return model.SweepResult(
        best=best,
        table=table,
        standardizer=standardizer,
        l2_extended=added,
        warnings=warnings,
    )
