"""Tests for revisit_tf.study.stats against tabulated and independent values."""

import math

import numpy as np
import pytest

from revisit_tf.study import stats
from revisit_tf.study.stats import group_records, paired_bootstrap, t_interval

# Two-sided Student t quantiles t_{q, df}, from printed tables.
T_0975_DF1 = 12.7062047
T_0975_DF2 = 4.30265273
T_0975_DF9 = 2.26215716
T_095_DF4 = 2.13184679


def test_t_interval_matches_tabulated_quantiles():
    iv = t_interval([1.0, 2.0])
    # s = 1/sqrt(2), s/sqrt(2) = 1/2.
    assert iv.mean == pytest.approx(1.5)
    assert iv.half_width == pytest.approx(T_0975_DF1 * 0.5, rel=1e-7)
    assert iv.n == 2
    assert iv.low == pytest.approx(1.5 - T_0975_DF1 * 0.5, rel=1e-7)
    assert iv.high == pytest.approx(1.5 + T_0975_DF1 * 0.5, rel=1e-7)

    iv = t_interval([1.0, 2.0, 4.0])
    # mean 7/3, s^2 = (16 + 1 + 25) / 9 / 2 = 7/3, so s / sqrt(3) = sqrt(7) / 3.
    assert iv.mean == pytest.approx(7.0 / 3.0)
    assert iv.half_width == pytest.approx(T_0975_DF2 * math.sqrt(7.0) / 3.0, rel=1e-7)

    vals = np.arange(10.0)  # s^2 = 82.5 / 9
    iv = t_interval(vals)
    assert iv.half_width == pytest.approx(
        T_0975_DF9 * math.sqrt(82.5 / 9.0) / math.sqrt(10.0), rel=1e-7
    )

    iv = t_interval([2.0, 4.0, 4.0, 6.0, 9.0], confidence=0.90)
    s = math.sqrt(((2 - 5) ** 2 + 1 + 1 + 1 + 16) / 4.0)
    assert iv.half_width == pytest.approx(T_095_DF4 * s / math.sqrt(5.0), rel=1e-7)
    assert iv.confidence == 0.90


def test_t_interval_single_value_has_nan_half_width():
    iv = t_interval([0.7])
    assert iv.mean == 0.7 and iv.n == 1
    assert math.isnan(iv.half_width) and math.isnan(iv.low) and math.isnan(iv.high)


@pytest.mark.parametrize(
    "values, conf, match",
    [
        ([], 0.95, "at least one"),
        ([1.0, float("nan")], 0.95, "non-finite"),
        ([[1.0, 2.0]], 0.95, "1-D"),
        ([1.0, 2.0], 1.5, "confidence"),
    ],
)
def test_t_interval_errors(values, conf, match):
    with pytest.raises(ValueError, match=match):
        t_interval(values, confidence=conf)


def test_t_interval_coverage_simulation():
    rng = np.random.default_rng(123)
    trials, n, mu, sigma = 4000, 5, 3.0, 2.0
    samples = rng.normal(mu, sigma, size=(trials, n))
    hits = 0
    for row in samples:
        iv = t_interval(row)
        hits += iv.low <= mu <= iv.high
    coverage = hits / trials
    assert 0.935 <= coverage <= 0.965
    # A normal (z = 1.96) interval undercovers at n = 5 (about 88%): the t
    # quantile matters.
    m, s = samples.mean(1), samples.std(1, ddof=1)
    z_cov = np.mean(np.abs(m - mu) <= 1.959964 * s / math.sqrt(n))
    assert z_cov < coverage - 0.03


def _slow_bootstrap(a, b, n_boot, seed, confidence=0.95):
    """Explicit loop, one replicate at a time, on floats."""
    a = np.atleast_2d(np.asarray(a, dtype=float))
    b = np.atleast_2d(np.asarray(b, dtype=float))
    n = a.shape[1]
    per_image = a.mean(axis=0) - b.mean(axis=0)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for r in range(n_boot):
        idx = rng.integers(0, n, size=n, dtype=np.int32)
        total = 0.0
        for i in idx:
            total += per_image[i]
        boot[r] = total / n
    boot[np.abs(boot) < 1e-12] = 0.0
    lo, hi = np.percentile(boot, [50 * (1 - confidence), 50 * (1 + confidence)])
    p = min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0)))
    return per_image.mean(), lo, hi, p


@pytest.mark.parametrize("binary", [True, False])
def test_paired_bootstrap_matches_explicit_loop(binary):
    rng = np.random.default_rng(5)
    n = 137
    if binary:
        a = rng.random((3, n)) < 0.62
        b = rng.random((2, n)) < 0.58
    else:
        a = rng.random((3, n))
        b = rng.random((2, n))
    res = paired_bootstrap(a, b, n_boot=400, seed=11)
    diff, lo, hi, p = _slow_bootstrap(a, b, 400, 11)
    assert res.diff == pytest.approx(diff, abs=1e-12)
    assert res.low == pytest.approx(lo, abs=1e-12)
    assert res.high == pytest.approx(hi, abs=1e-12)
    assert res.p_value == pytest.approx(p, abs=1e-12)
    assert (res.n_boot, res.n, res.n_a, res.n_b) == (400, n, 3, 2)
    # Seeds average: the difference is that of the mean accuracies.
    assert res.diff == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)


def test_paired_bootstrap_chunking_does_not_change_the_stream(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.5
    b = rng.random(300) < 0.5
    full = paired_bootstrap(a, b, n_boot=250, seed=3)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 700)  # 2 replicates per chunk
    chunked = paired_bootstrap(a, b, n_boot=250, seed=3)
    assert full == chunked
    other = paired_bootstrap(a, b, n_boot=250, seed=4)
    assert (other.low, other.high) != (full.low, full.high)


def test_paired_bootstrap_normal_approximation():
    rng = np.random.default_rng(2024)
    n = 10000
    difficulty = rng.random(n)
    a = difficulty < 0.80
    # B agrees with A except on a few images: a paired design.
    flip = rng.random(n) < 0.10
    b = np.where(flip, rng.random(n) < 0.70, a)
    res = paired_bootstrap(a, b, n_boot=10000, seed=0)
    d = a.astype(float) - b.astype(float)
    se = d.std(ddof=1) / math.sqrt(n)
    z = 1.959964
    assert res.diff == pytest.approx(d.mean(), abs=1e-12)
    assert res.se == pytest.approx(se, rel=0.05)
    assert res.low == pytest.approx(d.mean() - z * se, abs=0.1 * z * se)
    assert res.high == pytest.approx(d.mean() + z * se, abs=0.1 * z * se)
    from scipy.stats import norm

    p_normal = 2 * norm.sf(abs(d.mean()) / se)
    assert res.p_value == pytest.approx(p_normal, abs=max(0.02, 0.3 * p_normal))


def test_paired_bootstrap_identical_inputs():
    rng = np.random.default_rng(1)
    a = rng.random((3, 500)) < 0.7
    res = paired_bootstrap(a, a.copy(), n_boot=1000)
    assert res.diff == 0.0
    assert res.low <= 0.0 <= res.high
    assert res.p_value == 1.0


def test_paired_bootstrap_always_right_vs_always_wrong():
    res = paired_bootstrap(np.ones((3, 400), bool), np.zeros(400, bool), n_boot=2000)
    assert res.diff == 1.0
    assert res.low == 1.0 and res.high == 1.0
    assert res.p_value == 0.0
    res = paired_bootstrap(np.zeros(400), np.ones(400), n_boot=200)
    assert res.diff == -1.0 and res.p_value == 0.0


@pytest.mark.parametrize(
    "a, b, kwargs, match",
    [
        (np.zeros((2, 3, 4)), np.zeros(4), {}, r"correct_a must be \[N\]"),
        (np.zeros(4), np.zeros((2, 2, 2)), {}, r"correct_b must be \[N\]"),
        (np.zeros(4), np.zeros(5), {}, "N=4 test images but correct_b has N=5"),
        (np.zeros((0, 4)), np.zeros(4), {}, "empty"),
        (np.full(4, 2.0), np.zeros(4), {}, r"in \[0, 1\]"),
        (np.zeros(4), np.zeros(4), {"n_boot": 0}, "n_boot"),
        (np.zeros(4), np.zeros(4), {"confidence": 1.0}, "confidence"),
    ],
)
def test_paired_bootstrap_errors(a, b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b, **kwargs)


def _rec(seed, acc, fp="fp1", **kw):
    rec = {
        "cell": f"rotation/resnet50_v1/1/{seed}",
        "levels": {"pretext": "rotation", "trunk": "resnet50_v1", "width": "1"},
        "baseline": None,
        "probe": "linear",
        "endpoint": "pre_logits",
        "protocol": "lbfgs",
        "subset": 1.0,
        "fingerprint": fp,
        "test_top1": acc,
        "n_test": 4,
        "test_correct": None,
    }
    rec["levels"]["seed"] = str(seed)
    rec.update(kw)
    return rec


def test_group_records_pools_seeds_never_fingerprints():
    recs = [
        _rec(0, 0.5),
        _rec(1, 0.75),
        _rec(0, 0.25, fp="fp2"),
        _rec(1, 1.0, fp="fp2"),
        _rec(1, 0.5),  # repeats seed 1 under fp1: the later one wins
    ]
    configs, notes = group_records(recs)
    assert [c.fingerprint for c in configs] == ["fp1", "fp2"]
    assert configs[0].accuracy.mean == pytest.approx(0.5)
    assert configs[1].accuracy.mean == pytest.approx(0.625)
    assert configs[0].n == 2 and "repeated" in notes[0]


def test_group_records_validates_and_drops_inconsistent_correctness():
    with pytest.raises(ValueError, match="lacks"):
        group_records([{"levels": {"pretext": "x", "trunk": "y"}}])
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
        group_records([_rec(0, 87.3)])
    good = _rec(0, 0.5, test_correct=np.array([1, 0, 1, 0], bool))
    bad = _rec(1, 0.5, test_correct=np.array([1, 1, 1, 0], bool))
    configs, notes = group_records([good, bad])
    assert configs[0].correct() is None  # one seed lacks usable correctness
    assert any("differs from test_top1" in n for n in notes)
    configs, _ = group_records([good])
    assert configs[0].correct().shape == (1, 4)
