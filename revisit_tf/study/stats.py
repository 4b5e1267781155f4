"""Study statistics: t-intervals over seeds, paired bootstrap over test images.

Place in the data flow: stage 8 (``study``), after the runner has collected
one *record* per probe result (``revisit_tf.study.report`` documents the
record format). ``group_records`` turns records into *configurations* (all
records that differ only in the ``seed`` axis, under one protocol
fingerprint); ``t_interval`` summarises a configuration's accuracies over
seeds and ``paired_bootstrap`` compares two configurations on the same test
images. Every "A beats B" statement of the study report (the paper's
Table 1 and Figs. 2-8 discussion, Kolesnikov et al., CVPR 2019) is backed by
one ``paired_bootstrap``.

Two rules this module enforces:

  * records with different protocol fingerprints are never pooled: the
    fingerprint is part of a configuration's identity;
  * the bootstrap resamples test images, not seeds: each side's per-image
    accuracy is the mean over its seeds (rows), so seed noise is averaged
    and the interval reflects the finite test set (the dominant source of
    uncertainty when there are only ~3 seeds).

Nothing here imports TensorFlow or gin; NumPy and SciPy only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

# Number of bootstrap indices drawn at once: bounds memory to about
# 4M x (4 B index + 8 B gathered value) = 48 MB whatever n_boot and N are.
_CHUNK_ELEMENTS = 1 << 22
# Axes with a fixed meaning in records (other axes are part of a
# configuration's identity and shown as extra labels).
FIXED_AXES = ("pretext", "trunk", "width", "seed")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with its Student-t confidence interval.

    Attributes:
        mean: sample mean.
        half_width: ``t_{(1+c)/2, n-1} * s / sqrt(n)`` with ``s`` the sample
            standard deviation (ddof=1); NaN when ``n == 1`` (no spread can
            be estimated from one value; the report then prints the mean
            without ``±``).
        n: number of values.
        low, high: ``mean -/+ half_width`` (NaN when ``n == 1``).
        confidence: the confidence level ``c``.
    """

    mean: float
    half_width: float
    n: int
    low: float
    high: float
    confidence: float = 0.95


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student-t confidence interval for the mean of ``values``.

    The interval over seeds reported in every cell of the study's Table 1
    (paper Table 1 reports single runs; the study adds seeds).

    Args:
        values: ``[n]`` finite numbers, ``n >= 1``.
        confidence: the coverage level in (0, 1).

    Returns:
        ``Interval``; ``half_width``, ``low`` and ``high`` are NaN for n == 1.

    Raises:
        ValueError: for no values, non-finite values, a non-1-D input or a
            confidence outside (0, 1).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"t_interval needs a 1-D sequence; got shape {x.shape}.")
    if x.size == 0:
        raise ValueError("t_interval needs at least one value; got none.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval got non-finite values: {x.tolist()}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}.")
    n = int(x.size)
    mean = float(x.mean())
    if n == 1:
        nan = float("nan")
        return Interval(mean, nan, 1, nan, nan, confidence)
    q = float(_scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1))
    half = q * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, half, n, mean - half, mean + half, confidence)


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """A paired bootstrap of the accuracy difference A - B.

    Attributes:
        diff: observed difference of mean accuracies (fractions; A - B).
        low, high: percentile confidence interval of the difference.
        p_value: two-sided, ``min(1, 2 * min(P*(d* <= 0), P*(d* >= 0)))``:
            twice the smaller fraction of resampled differences on either
            side of (and including) zero. Its resolution is ``1 / n_boot``:
            0 means "below 1 / n_boot". Identical inputs give exactly 1.
        n_boot: number of bootstrap replicates.
        n: number of test images N.
        n_a, n_b: number of seeds (rows) on each side.
        se: standard deviation of the bootstrap distribution.
        confidence: the level of ``low``/``high``.
    """

    diff: float
    low: float
    high: float
    p_value: float
    n_boot: int
    n: int
    n_a: int
    n_b: int
    se: float
    confidence: float = 0.95


def _as_rows(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be [N] (one seed) or [S, N] (S seeds x N test images); "
            f"got shape {np.shape(x)}."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); need S >= 1, N >= 1.")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{name} must be bool or numeric; got dtype {arr.dtype}.")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError(f"{name} must hold correctness values in [0, 1].")
    return arr


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap over test images of the accuracy difference A - B.

    Each side's per-image accuracy is the mean over its seeds (rows):
    ``a_i = mean_s correct_a[s, i]``, likewise ``b_i``; the statistic is
    ``mean_i (a_i - b_i)`` = (mean accuracy of A) - (mean accuracy of B).
    Replicate ``r`` draws N image indices with replacement,
    ``rng.integers(0, N, size=N, dtype=np.int32)`` from
    ``rng = np.random.default_rng(seed)`` (replicates in order; drawn in
    chunks, which gives the same stream), and uses the same indices for both
    sides, so image difficulty cancels. For 0/1 inputs the replicate sums are
    computed in exact integer arithmetic, so the sign tests of the p-value
    are exact.

    Args:
        correct_a: ``[N]`` or ``[S_a, N]`` per-image correctness (bool, or
            numbers in [0, 1]) of configuration A, same images and order as B.
        correct_b: ``[N]`` or ``[S_b, N]`` for configuration B.
        n_boot: number of bootstrap replicates (>= 1).
        seed: seed of the NumPy generator.
        confidence: level of the percentile interval, in (0, 1).

    Returns:
        ``BootstrapResult`` (differences as fractions, not points).

    Raises:
        ValueError: for inputs that are not [N] / [S, N], different N, values
            outside [0, 1], ``n_boot < 1`` or a confidence outside (0, 1).
    """
    a = _as_rows(correct_a, "correct_a")
    b = _as_rows(correct_b, "correct_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"correct_a has N={a.shape[1]} test images but correct_b has "
            f"N={b.shape[1]}; a paired bootstrap needs the same test images in "
            "the same order."
        )
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}.")
    n_boot = int(n_boot)
    s_a, n = a.shape
    s_b = b.shape[0]
    binary = all(
        x.dtype == np.bool_ or bool(np.all((x == 0.0) | (x == 1.0))) for x in (a, b)
    )
    if binary:
        # d_i * (S_a * S_b) is an integer: exact replicate sums and signs.
        d = a.sum(axis=0, dtype=np.int64) * s_b - b.sum(axis=0, dtype=np.int64) * s_a
        scale = float(s_a * s_b * n)
    else:
        d = a.mean(axis=0) - b.mean(axis=0)
        scale = float(n)
    diff = float(d.sum() / scale)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // n))
    sums = np.empty(n_boot, dtype=d.dtype)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n), dtype=np.int32)
        sums[start : start + m] = d[idx].sum(axis=1)
    boot = sums / scale
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    below = float(np.mean(sums <= 0))
    above = float(np.mean(sums >= 0))
    p_value = min(1.0, 2.0 * min(below, above))
    return BootstrapResult(
        diff=diff,
        low=float(low),
        high=float(high),
        p_value=p_value,
        n_boot=n_boot,
        n=int(n),
        n_a=int(s_a),
        n_b=int(s_b),
        se=float(boot.std()),
        confidence=confidence,
    )


# --------------------------------------------------------------------------
# Records -> configurations.

_REQUIRED = ("levels", "protocol", "endpoint", "fingerprint", "test_top1")


@dataclasses.dataclass(frozen=True)
class Config:
    """All records of one configuration: equal in everything but the seed.

    Identity: every axis level except ``seed`` (axes that do not apply, None
    or absent, are left out), ``baseline``, ``protocol``, ``endpoint``,
    ``subset`` and the protocol ``fingerprint``. The spec's ``probe`` name is
    kept for display only.

    Attributes:
        key: the hashable identity above.
        levels: axis -> level of the applicable axes (no ``seed``).
        baseline, protocol, endpoint, subset, fingerprint: from the records.
        probes: the probe names seen, in order.
        records: one record per seed, in first-seen order (a repeated seed
            keeps the later record).
        accuracy: ``t_interval`` of ``test_top1`` over ``records``.
    """

    key: tuple
    levels: Mapping[str, str]
    baseline: str | None
    protocol: str
    endpoint: str
    subset: float
    fingerprint: str
    probes: tuple[str, ...]
    records: tuple[Mapping[str, Any], ...]
    accuracy: Interval

    @property
    def pretext(self) -> str:
        return self.levels["pretext"]

    @property
    def trunk(self) -> str | None:
        return self.levels.get("trunk")

    @property
    def width(self) -> str | None:
        return self.levels.get("width")

    @property
    def extra(self) -> tuple[tuple[str, str], ...]:
        """Applicable axes other than pretext/trunk/width/seed, in order."""
        return tuple((k, v) for k, v in self.levels.items() if k not in FIXED_AXES)

    @property
    def n(self) -> int:
        return len(self.records)

    def correct(self) -> np.ndarray | None:
        """``[S, N]`` bool per-image test correctness, or None if any is missing."""
        rows = [r.get("test_correct") for r in self.records]
        if any(r is None for r in rows):
            return None
        return np.stack([np.asarray(r, dtype=bool) for r in rows])

    @property
    def test_set(self) -> str | None:
        """The records' common optional ``test_set`` id (None if absent/mixed)."""
        ids = {r.get("test_set") for r in self.records}
        return ids.pop() if len(ids) == 1 else None

    def pretext_top1(self) -> Interval | None:
        """``t_interval`` of ``pretext_metrics["top1"]`` (None if any lacks it)."""
        vals = [(r.get("pretext_metrics") or {}).get("top1") for r in self.records]
        if not vals or any(v is None for v in vals):
            return None
        return t_interval([float(v) for v in vals])


def _check_accuracy(value: Any, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number; got {value!r}.") from None
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise ValueError(f"{where} must be a fraction in [0, 1]; got {value!r}.")
    return x


def _clean_correct(rec: Mapping[str, Any], where: str, notes: list[str]) -> Any:
    tc = rec.get("test_correct")
    if tc is None:
        return None
    arr = np.asarray(tc)
    n_test = rec.get("n_test")
    if arr.ndim != 1 or (n_test is not None and arr.shape[0] != int(n_test)):
        notes.append(
            f"{where}: test_correct has shape {arr.shape}, expected [n_test="
            f"{n_test}]; ignored (no significance test for it)."
        )
        return None
    if arr.size == 0:
        return None
    mean = float(np.mean(arr.astype(np.float64)))
    if abs(mean - float(rec["test_top1"])) > 0.5 / arr.size + 1e-9:
        notes.append(
            f"{where}: mean(test_correct) = {mean:.4f} differs from test_top1 = "
            f"{float(rec['test_top1']):.4f}; test_correct ignored."
        )
        return None
    return arr.astype(bool)


def group_records(
    records: Sequence[Mapping[str, Any]],
) -> tuple[list[Config], list[str]]:
    """Groups records into configurations (seeds pooled, fingerprints never).

    Args:
        records: study records (format in ``revisit_tf.study.report``).

    Returns:
        ``(configs, notes)``: configurations in first-seen order, and notes
        on what was dropped (repeated seeds, unusable ``test_correct``).

    Raises:
        ValueError: for a record without a required key (``levels`` with
            ``pretext`` and ``trunk``, ``protocol``, ``endpoint``,
            ``fingerprint``, ``test_top1``) or with an accuracy outside [0, 1].
    """
    notes: list[str] = []
    groups: dict[tuple, dict[str | None, Mapping[str, Any]]] = {}
    meta: dict[tuple, dict[str, Any]] = {}
    repeated = 0
    for i, rec in enumerate(records):
        where = f"record {i} ({rec.get('cell', '?')})"
        missing = [k for k in _REQUIRED if k not in rec]
        if missing:
            raise ValueError(f"{where} lacks {missing}.")
        raw_levels = rec["levels"]
        for axis in ("pretext", "trunk"):
            if axis not in raw_levels:
                raise ValueError(f"{where}: levels lack the axis {axis!r}.")
        if raw_levels["pretext"] is None:
            raise ValueError(f"{where}: levels['pretext'] is None.")
        _check_accuracy(rec["test_top1"], f"{where} test_top1")
        if rec.get("val_top1") is not None:
            _check_accuracy(rec["val_top1"], f"{where} val_top1")
        levels = {k: str(v) for k, v in raw_levels.items() if v is not None}
        seed = levels.pop("seed", None)
        subset = float(rec.get("subset", 1.0))
        key = (
            tuple(sorted(levels.items())),
            rec.get("baseline"),
            str(rec["protocol"]),
            str(rec["endpoint"]),
            round(subset, 9),
            str(rec["fingerprint"]),
        )
        clean = dict(rec)
        clean["test_correct"] = _clean_correct(
            rec, f"{where} {rec['protocol']}@{rec['endpoint']}", notes
        )
        if key not in groups:
            groups[key] = {}
            meta[key] = {"levels": levels, "probes": [], "rec": rec}
        if seed in groups[key]:
            repeated += 1
            del groups[key][seed]  # the later record wins, at the later position
        groups[key][seed] = clean
        probe = rec.get("probe")
        if probe is not None and probe not in meta[key]["probes"]:
            meta[key]["probes"].append(str(probe))
    if repeated:
        notes.append(
            f"{repeated} record(s) repeated a (configuration, seed, fingerprint); "
            "the later record was kept."
        )
    configs = []
    for key, by_seed in groups.items():
        m = meta[key]
        recs = tuple(by_seed.values())
        configs.append(
            Config(
                key=key,
                levels=m["levels"],
                baseline=m["rec"].get("baseline"),
                protocol=key[2],
                endpoint=key[3],
                subset=float(m["rec"].get("subset", 1.0)),
                fingerprint=key[5],
                probes=tuple(m["probes"]),
                records=recs,
                accuracy=t_interval([float(r["test_top1"]) for r in recs]),
            )
        )
    return configs, notes
