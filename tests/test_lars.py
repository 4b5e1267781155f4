"""LARS against an independent NumPy implementation of its update."""

import helpers
import keras
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.train import lars as lars_lib
from revisit_tf.train import optim

LR = 0.1
STEPS = 3


def _numpy_lars(
    w,
    g,
    v,
    lr,
    *,
    adapted,
    momentum,
    trust_coefficient,
    weight_decay,
    epsilon,
    nesterov,
):
    """One update of one variable; returns (w, v). Written from the formulas."""
    w, g, v = (np.asarray(a, np.float64) for a in (w, g, v))
    if adapted:
        g = g + weight_decay * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        if w_norm > 0 and g_norm > 0:
            lr = lr * trust_coefficient * w_norm / (g_norm + epsilon)
    if momentum == 0:
        return w - lr * g, v
    v = momentum * v + lr * g
    return w - (momentum * v + lr * g if nesterov else v), v


def _dense(seed=0):
    """A Dense layer with a kernel [3, 4] and a bias [4], both non-zero."""
    layer = keras.layers.Dense(4, name="dense")
    layer.build((None, 3))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(size=(3, 4)), rng.normal(size=(4,))])
    return layer


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return [rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=4).astype("f4")]


def _apply_fn(optimizer, variables):
    @tf.function
    def apply(grads):
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    return apply


CASES = {
    "momentum": {},
    "no_momentum": {"momentum": 0.0},
    "nesterov": {"nesterov": True},
    "decay_and_epsilon": {"weight_decay": 0.05, "epsilon": 0.3},
    # By name: the kernel is excluded and the bias adapted, the reverse of the
    # default rank rule, so a rank-based implementation fails here.
    "exclude_by_name": {"exclude_from_adaptation": ["kernel"], "weight_decay": 0.05},
    "exclude_nothing": {"exclude_from_adaptation": [], "weight_decay": 0.05},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy(case):
    hp = {
        "momentum": 0.9,
        "trust_coefficient": 0.5,  # large enough that trust != 1 is visible
        "weight_decay": 0.0,
        "epsilon": 0.0,
        "nesterov": False,
        "exclude_from_adaptation": None,
    }
    hp.update(CASES[case])
    layer = _dense()
    opt = optim.lars(LR, **hp)
    assert isinstance(opt, lars_lib.LARS)
    apply = _apply_fn(opt, layer.trainable_variables)
    want = [np.asarray(v, np.float64) for v in layer.get_weights()]
    slots = [np.zeros_like(w) for w in want]
    exclude = hp.pop("exclude_from_adaptation")
    adapted = {
        None: [True, False],  # rank 2 kernel adapted, rank 1 bias not
        ("kernel",): [False, True],
        (): [True, True],
    }[None if exclude is None else tuple(exclude)]
    for step in range(STEPS):
        grads = _grads(step)
        apply(grads)
        for i, g in enumerate(grads):
            want[i], slots[i] = _numpy_lars(
                want[i], g, slots[i], LR, adapted=adapted[i], **hp
            )
    for got, w in zip(layer.get_weights(), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=2e-5, atol=1e-6)
    assert int(opt.iterations) == STEPS
    if hp["momentum"]:
        for slot, s in zip(opt.momentums, slots, strict=True):
            np.testing.assert_allclose(slot.numpy(), s, rtol=2e-5, atol=1e-6)
    else:
        assert opt.momentums == []


def test_trust_ratio_value():
    # Docstring example: ||w|| = 2, ||g|| = 4, eta = 0.001, lr = 0.1: rate 5e-5.
    w = keras.Variable(np.full((2, 2), 1.0, "float32"))  # norm 2
    opt = optim.lars(LR, momentum=0.0)
    opt.apply_gradients([(tf.fill((2, 2), 2.0), w)])  # norm 4
    np.testing.assert_allclose(w.numpy(), 1.0 - 5e-5 * 2.0, rtol=1e-7)


def test_zero_norms_use_trust_one():
    zero_w = keras.Variable(np.zeros((3, 4), "float32"), name="zero_w")
    some_w = keras.Variable(np.ones((3, 4), "float32"), name="some_w")
    opt = optim.lars(LR, momentum=0.9, trust_coefficient=0.001)
    g = np.arange(12, dtype="float32").reshape(3, 4) / 10
    apply = _apply_fn(opt, [zero_w, some_w])
    apply([g, np.zeros((3, 4), "float32")])
    # ||w|| = 0: trust 1, the full rate (0.001 * 0 / ||g|| would give no update).
    np.testing.assert_allclose(zero_w.numpy(), -LR * g, rtol=1e-6)
    # ||g|| = 0: trust 1 and no update; 0 / 0 must not leak a NaN.
    np.testing.assert_array_equal(some_w.numpy(), np.ones((3, 4)))
    assert np.isfinite(opt.momentums[1].numpy()).all()
    # With weight decay g' = wd * w is non-zero, so the trust ratio is used.
    w = keras.Variable(np.ones((3, 4), "float32"))
    opt = optim.lars(LR, momentum=0.0, trust_coefficient=0.5, weight_decay=0.1)
    opt.apply_gradients([(tf.zeros((3, 4)), w)])
    # trust = 0.5 * ||w|| / ||0.1 w|| = 5: w -= 0.1 * 5 * 0.1 * w.
    np.testing.assert_allclose(w.numpy(), 1.0 - 0.05, rtol=1e-6)


def test_two_replicas_match_one_device():
    """Each replica holds half the global gradient plus a +-D share."""
    hp = {"momentum": 0.9, "trust_coefficient": 0.5, "weight_decay": 0.01}
    single = _dense()
    opt1 = optim.lars(LR, **hp)
    apply1 = _apply_fn(opt1, single.trainable_variables)

    strategy = helpers.two_replica_strategy()
    with strategy.scope():
        mirrored = _dense()
        opt2 = optim.lars(LR, **hp)
        opt2.build(mirrored.trainable_variables)

    @tf.function
    def apply2(grads, shares):
        def fn(grads, shares):
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            sign = 2.0 * tf.cast(r, tf.float32) - 1.0  # -1, +1: sums to grads
            local = [g / 2 + sign * d for g, d in zip(grads, shares, strict=True)]
            opt2.apply_gradients(zip(local, mirrored.trainable_variables, strict=True))

        strategy.run(fn, args=(grads, shares))

    for step in range(STEPS):
        grads = [tf.constant(g) for g in _grads(step)]
        shares = [tf.constant(g) for g in _grads(50 + step)]
        apply1(grads)
        apply2(grads, shares)
    assert strategy.num_replicas_in_sync == 2
    assert int(opt2.iterations.numpy()) == STEPS
    for v1, v2 in zip(
        single.trainable_variables, mirrored.trainable_variables, strict=True
    ):
        for local in strategy.experimental_local_results(v2.value):
            np.testing.assert_allclose(local.numpy(), v1.numpy(), rtol=1e-5, atol=1e-6)
    for s1, s2 in zip(opt1.momentums, opt2.momentums, strict=True):
        for local in strategy.experimental_local_results(s2.value):
            np.testing.assert_allclose(local.numpy(), s1.numpy(), rtol=1e-5, atol=1e-6)


def test_checkpoint_restores_momentum(tmp_path):
    def make():
        layer = _dense()
        opt = optim.lars(LR, momentum=0.9, trust_coefficient=0.5)
        opt.build(layer.trainable_variables)
        return layer, opt, _apply_fn(opt, layer.trainable_variables)

    layer, opt, apply = make()
    for step in range(2):
        apply(_grads(step))
    path = tf.train.Checkpoint(model=layer, optimizer=opt).save(str(tmp_path / "c"))
    for step in range(2, 4):
        apply(_grads(step))
    want = layer.get_weights()

    layer2, opt2, apply2 = make()
    layer2.set_weights([np.zeros_like(w) for w in want])
    tf.train.Checkpoint(model=layer2, optimizer=opt2).restore(path).assert_consumed()
    assert int(opt2.iterations) == 2
    assert np.abs(opt2.momentums[0].numpy()).max() > 0  # restored, not zeros
    for step in range(2, 4):
        apply2(_grads(step))
    for got, w in zip(layer2.get_weights(), want, strict=True):
        np.testing.assert_array_equal(got, w)


def test_config_round_trip():
    schedule = optim.WarmupCosine(1.0, warmup_steps=2, total_steps=10)
    opt = optim.lars(
        schedule,
        momentum=0.8,
        trust_coefficient=0.01,
        weight_decay=1e-6,
        epsilon=1e-9,
        nesterov=True,
        exclude_from_adaptation=("bias", "bn"),
    )
    config = opt.get_config()
    assert config["weight_decay"] == 1e-6
    assert config["exclude_from_adaptation"] == ["bias", "bn"]
    assert opt.weight_decay is None  # Keras' decoupled decay stays off
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, lars_lib.LARS)
    assert isinstance(again._learning_rate, optim.WarmupCosine)
    config.pop("learning_rate"), config.pop("name")
    got = again.get_config()
    got.pop("learning_rate"), got.pop("name")
    assert got == config
    assert lars_lib.LARS.from_config(opt.get_config()).get_config()["momentum"] == 0.8


def test_bad_arguments():
    with pytest.raises(ValueError, match="sequence of name"):
        optim.lars(LR, exclude_from_adaptation="bias")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\); got 1.0"):
        optim.lars(LR, momentum=1.0)
    with pytest.raises(ValueError, match="trust_coefficient"):
        optim.lars(LR, trust_coefficient=0.0)
