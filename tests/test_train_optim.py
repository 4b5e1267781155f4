"""Learning-rate schedule and durations against the reference's closed forms."""

import math

import numpy as np
import pytest

from revisit_tf.train import optim


def test_reference_rotation_numbers():
    # Reference 7.7, rotation config: batch 64 on 1,231,121 images, lr 0.1 @ 256,
    # 35 epochs, warm-up 5, decays at 15 and 25 epochs.
    per_epoch = optim.steps_per_epoch(1_231_121, 64)
    assert per_epoch == 19_236
    assert (
        optim.to_steps("t", epochs=35, num_examples=1_231_121, global_batch_size=64)
        == 673_260
    )
    s = optim.build_schedule(
        lr=0.1,
        global_batch_size=64,
        steps_per_epoch=per_epoch,
        warmup_epochs=5,
        decay_epochs=(15, 25),
    )
    assert s.base_lr == pytest.approx(0.025)
    assert s.warmup_steps == 96_180
    assert s.boundaries == [288_540, 480_900]


def test_schedule_values_closed_form():
    s = optim.WarmupPiecewiseConstant(
        0.4, warmup_steps=4, boundaries=[10, 20], decay_factor=0.5
    )
    steps = np.arange(25)
    got = np.array([float(s(i)) for i in steps])
    want = np.where(
        steps < 4,
        0.4 * (steps + 1) / 4,
        0.4 * 0.5 ** ((steps > 10).astype(int) + (steps > 20).astype(int)),
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # A step equal to a boundary still uses the previous rate (reference 7.2).
    assert float(s(10)) == pytest.approx(0.4)
    assert float(s(11)) == pytest.approx(0.2)


def test_warmup_from_zero_reproduces_original():
    s = optim.WarmupPiecewiseConstant(1.0, warmup_steps=10, warmup_from_zero=True)
    assert float(s(0)) == 0.0  # reference 11.2 item 18
    assert float(s(5)) == pytest.approx(0.5)
    assert float(
        optim.WarmupPiecewiseConstant(1.0, warmup_steps=10)(0)
    ) == pytest.approx(0.1)


def test_schedule_config_round_trip():
    s = optim.WarmupPiecewiseConstant(0.1, warmup_steps=3, boundaries=[5, 7])
    t = optim.WarmupPiecewiseConstant.from_config(s.get_config())
    for i in range(10):
        assert float(s(i)) == float(t(i))


def test_durations():
    kw = {"num_examples": 1000, "global_batch_size": 64}
    assert optim.to_steps("t", steps=7, **kw) == 7
    assert optim.to_steps("t", epochs=2.5, **kw) == math.ceil(2.5 * (1000 // 64))
    assert optim.to_steps("t", examples=1000, **kw) == math.ceil(1000 / 64)
    assert optim.to_steps("t", allow_none=True, **kw) is None
    with pytest.raises(ValueError, match="exactly one"):
        optim.to_steps("t", steps=1, epochs=1, **kw)
    with pytest.raises(ValueError, match="steps, epochs or examples"):
        optim.to_steps("t", **kw)
    with pytest.raises(ValueError, match=">= 0"):
        optim.to_steps("t", epochs=-1, **kw)
    with pytest.raises(ValueError, match="increasing"):
        optim.WarmupPiecewiseConstant(0.1, boundaries=[5, 3])
