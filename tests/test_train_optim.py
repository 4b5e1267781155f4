"""Learning-rate schedule and durations against the reference's closed forms."""

import math

import helpers
import keras
import numpy as np
import pytest
import tensorflow as tf

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
    s = optim.reference_schedule(
        lr=0.1,
        global_batch_size=64,
        steps_per_epoch=per_epoch,
        total_steps=673_260,
        warmup_epochs=5,
        decay_epochs=(15, 25),
    )
    assert isinstance(s, optim.WarmupPiecewiseConstant)
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


def _values(schedule, steps):
    return np.array([float(schedule(tf.constant(i, tf.int64))) for i in steps])


def test_reference_schedule_closed_form_and_config():
    # lr 0.2 @ 256 on batch 512: base 0.4; 4 steps/epoch: warm-up 1 epoch = 4
    # steps, decays at 2.5 and 5 epochs = steps 10 and 20 (as the test above).
    s = optim.reference_schedule(
        global_batch_size=512,
        steps_per_epoch=4,
        total_steps=25,
        lr=0.2,
        warmup_epochs=1,
        decay_epochs=(2.5, 5),
        decay_factor=0.5,
    )
    steps = np.arange(25)
    want = np.where(
        steps < 4,
        0.4 * (steps + 1) / 4,
        0.4 * 0.5 ** ((steps > 10).astype(int) + (steps > 20).astype(int)),
    )
    np.testing.assert_allclose(_values(s, steps), want, rtol=1e-6)
    again = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(s)
    )
    assert isinstance(again, optim.WarmupPiecewiseConstant)
    np.testing.assert_array_equal(_values(again, steps), _values(s, steps))
    # Defaults: lr 0.1 @ 256, no warm-up, no decay; total_steps is unused.
    d = optim.reference_schedule(
        global_batch_size=128, steps_per_epoch=9, total_steps=0
    )
    assert (d.base_lr, d.warmup_steps, d.boundaries) == (0.05, 0, [])
    z = optim.reference_schedule(
        global_batch_size=256,
        steps_per_epoch=10,
        total_steps=100,
        warmup_epochs=1,
        warmup_from_zero=True,
    )
    assert float(z(0)) == 0.0 and float(z(5)) == pytest.approx(0.05)


def _cosine_closed_form(step, base, warmup, total, end):
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return base * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * p)))


def test_cosine_schedule_linear_closed_form():
    # 0.3 * 512 / 256 = 0.6; 1 warm-up epoch of 10 steps; decay to 0.1 * 0.6.
    s = optim.cosine_schedule(
        global_batch_size=512,
        steps_per_epoch=10,
        total_steps=110,
        lr=0.3,
        warmup_epochs=1,
        end_factor=0.1,
    )
    assert isinstance(s, optim.WarmupCosine)
    assert s.base_lr == pytest.approx(0.6)
    assert (s.warmup_steps, s.total_steps) == (10, 110)
    assert float(s(0)) == pytest.approx(0.06)  # warm-up start: base / W
    assert float(s(9)) == pytest.approx(0.6)  # warm-up end
    assert float(s(10)) == pytest.approx(0.6)  # decay start
    assert float(s(35)) == pytest.approx(
        0.6 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    )
    assert float(s(60)) == pytest.approx(0.6 * (0.1 + 0.9 * 0.5))  # mid-decay
    assert float(s(110)) == pytest.approx(0.06)  # final step
    assert float(s(500)) == pytest.approx(0.06)  # and after it
    steps = np.arange(0, 130)
    want = [_cosine_closed_form(i, 0.6, 10, 110, 0.1) for i in steps]
    np.testing.assert_allclose(_values(s, steps), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        float(tf.function(s)(tf.constant(60, tf.int64))), want[60], rtol=1e-6
    )


def test_cosine_schedule_sqrt_and_defaults():
    # SimCLR's 0.075 * sqrt(4096) = 4.8, warm-up 10 epochs (default), to 0.
    s = optim.cosine_schedule(
        global_batch_size=4096,
        steps_per_epoch=3,
        total_steps=90,
        lr=0.075,
        scaling="sqrt",
        reference_batch_size=1,  # unused with sqrt
    )
    assert s.base_lr == pytest.approx(4.8)
    assert s.warmup_steps == 30
    assert float(s(0)) == pytest.approx(4.8 / 30)
    assert float(s(30)) == pytest.approx(4.8)
    assert float(s(60)) == pytest.approx(2.4)
    assert float(s(90)) == pytest.approx(0.0, abs=1e-6)
    # Default lr 0.3 @ 256, linear.
    d = optim.cosine_schedule(global_batch_size=1024, steps_per_epoch=1, total_steps=20)
    assert d.base_lr == pytest.approx(1.2)
    # No warm-up: step 0 is already the base rate.
    n = optim.WarmupCosine(2.0, total_steps=10)
    assert float(n(0)) == pytest.approx(2.0) and float(n(5)) == pytest.approx(1.0)
    # A run shorter than its warm-up stays finite.
    short = optim.WarmupCosine(1.0, warmup_steps=10, total_steps=4)
    assert np.isfinite(_values(short, range(20))).all()
    with pytest.raises(ValueError, match="Unknown scaling 'log'"):
        optim.cosine_schedule(
            global_batch_size=8, steps_per_epoch=1, total_steps=1, scaling="log"
        )
    with pytest.raises(ValueError, match="must be >= 0"):
        optim.WarmupCosine(1.0, total_steps=-1)


def test_cosine_config_round_trip():
    s = optim.WarmupCosine(0.5, warmup_steps=3, total_steps=17, end_factor=0.2)
    assert s.get_config() == {
        "base_lr": 0.5,
        "total_steps": 17,
        "warmup_steps": 3,
        "end_factor": 0.2,
    }
    t = optim.WarmupCosine.from_config(s.get_config())
    u = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(s))
    assert isinstance(u, optim.WarmupCosine)
    np.testing.assert_array_equal(_values(s, range(25)), _values(t, range(25)))
    np.testing.assert_array_equal(_values(s, range(25)), _values(u, range(25)))


def test_sgd_and_adam_hyper_parameters():
    opt = optim.sgd(0.1)
    assert isinstance(opt, keras.optimizers.SGD)
    assert (opt.momentum, opt.nesterov) == (0.9, False)  # reference 7.3
    opt = optim.sgd(1, momentum=0, nesterov=True)  # ints, as gin may bind them
    assert (opt.momentum, opt.nesterov) == (0.0, True)
    assert float(opt.learning_rate) == 1.0
    opt = optim.adam(1e-3)
    assert isinstance(opt, keras.optimizers.Adam)
    assert (opt.beta_1, opt.beta_2, opt.epsilon) == (0.9, 0.999, 1e-8)  # TF1
    assert opt.weight_decay is None
    opt = optim.adam(1e-3, beta_1=0.5, beta_2=0.9, epsilon=1e-6)
    assert (opt.beta_1, opt.beta_2, opt.epsilon) == (0.5, 0.9, 1e-6)
    schedule = optim.WarmupPiecewiseConstant(0.4, warmup_steps=4)
    for opt in (optim.sgd(schedule), optim.adam(schedule), optim.adamw(schedule)):
        assert float(opt.learning_rate) == pytest.approx(0.1)  # schedule(0)
    opt = optim.lars(0.2, nesterov=True)
    assert (opt.momentum, opt.trust_coefficient, opt.lars_weight_decay) == (
        0.9,
        0.001,
        0.0,
    )
    assert (opt.epsilon, opt.nesterov, opt.exclude_from_adaptation) == (
        0.0,
        True,
        None,
    )


def _numpy_adamw(w, grads, *, lr, wd, beta_1=0.9, beta_2=0.999, eps=1e-8):
    """Keras' (and TF1's) Adam with epsilon on sqrt(v); decay before each step."""
    w, m, v = np.asarray(w, np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        w = w - w * wd * lr
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g**2
        alpha = lr * math.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        w = w - alpha * m / (np.sqrt(v) + eps)
    return w


def _dense_bn(seed=0):
    dense = keras.layers.Dense(4, name="dense")
    dense.build((None, 3))
    bn = keras.layers.BatchNormalization(name="bn")
    bn.build((None, 4))
    rng = np.random.default_rng(seed)
    dense.set_weights([rng.normal(size=(3, 4)), rng.normal(size=4)])
    bn.gamma.assign(rng.normal(size=4) + 1), bn.beta.assign(rng.normal(size=4))
    # kernel [3, 4], bias [4], gamma [4], beta [4]
    return dense.trainable_variables + bn.trainable_variables


def _adamw_grads(step):
    rng = np.random.default_rng(10 + step)
    return [rng.normal(size=s).astype("float32") for s in ((3, 4), (4,), (4,), (4,))]


@pytest.mark.parametrize("replicas", [1, 2])
def test_adamw_decays_kernels_only(replicas):
    lr, wd = 0.1, 0.5  # a large decay, so decay vs none is far above tolerance
    strategy = tf.distribute.get_strategy()
    if replicas == 2:
        strategy = helpers.two_replica_strategy()
    with strategy.scope():
        variables = _dense_bn()
        opt = optim.adamw(lr, weight_decay=wd)
        opt.build(variables)
    start = [np.asarray(v.numpy()) for v in variables]

    @tf.function
    def apply(grads):
        def fn(grads):
            # Each replica holds grad / replicas; the optimizer sums them.
            local = [g / replicas for g in grads]
            opt.apply_gradients(zip(local, variables, strict=True))

        strategy.run(fn, args=(grads,))

    steps = [_adamw_grads(i) for i in range(3)]
    for grads in steps:
        apply([tf.constant(g) for g in grads])
    for i, v in enumerate(variables):
        decay = wd if i == 0 else 0.0  # only the kernel has rank >= 2
        want = _numpy_adamw(start[i], [g[i] for g in steps], lr=lr, wd=decay)
        # float32: 1 - beta_2 ** t alone costs ~1e-5 relative in the step size.
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-5)
    assert isinstance(opt, keras.optimizers.AdamW)
    assert (opt.weight_decay, opt.epsilon) == (0.5, 1e-8)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, optim.KernelDecayAdamW)
    assert again.get_config()["weight_decay"] == 0.5
