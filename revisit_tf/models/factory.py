"""The network factory: one builder that selects a trunk by name.

Reference section 5.5: the original picks the trunk by ``--architecture``
and passes the widening factor, the "(-)" flag, the weight decay and, for the
patch tasks (Jigsaw, Relative Patch Location), stem stride 1 and stage strides
(2, 2, 1). ``build_trunk`` does the same with explicit, validated names, so a
gin file switches the trunk with one binding::

    build_trunk.architecture = 'revnet50'

Every trunk returns the same kind of model: a functional ``keras.Model`` from
``image [N, H, W, C]`` to a dict of named endpoints (reference 5.4).
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable, Sequence

import keras

from revisit_tf.models import resnet, revnet, vgg
from revisit_tf.pp import groups as groups_lib

_logger = logging.getLogger(__name__)

# Architecture name -> (builder, fixed keyword arguments).
_ARCHITECTURES: dict[str, tuple[Callable[..., keras.Model], dict]] = {
    "resnet50_v1": (resnet.build_resnet, {"version": "v1"}),
    "resnet50_v2": (resnet.build_resnet, {"version": "v2"}),
    "revnet50": (revnet.build_revnet, {}),
    "vgg19": (vgg.build_vgg19, {}),
}
# Options that VGG19 does not have and ignores, as the original factory
# ignores the patch-task strides for VGG (reference 5.3, 5.5); ignoring `units`
# too lets one config (e.g. smoke.gin's units) serve every trunk.
_IGNORED_BY_VGG = ("units", "stem_stride", "strides")
ARCHITECTURES = tuple(_ARCHITECTURES)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(str(name), ARCHITECTURES, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def build_trunk(
    architecture: str,
    *,
    width: float | None = None,
    units: Sequence[int] | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int | None] = (224, 224, 3),
    patch_variant: bool = False,
    stem_stride: int | None = None,
    strides: Sequence[int] | None = None,
    last_relu: bool = True,
    weight_decay: float = 1e-4,
    sync_batchnorm: bool = False,
    ghost_group_size: int | None = None,
    data_format: str = "channels_last",
    dtype_policy: str | None = None,
    memory_saving: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Builds the trunk named ``architecture`` (reference 5.5).

    Options a trunk does not have are rejected when set to a non-default value
    (e.g. ``memory_saving`` for ResNet), except ``units``, ``stem_stride``,
    ``strides`` and ``patch_variant``, which VGG19 ignores (with a log line) as
    the original factory does (reference 5.3: VGG "does not get the patch-task
    stride changes"), so one gin file can switch between all four trunks.

    Args:
        architecture: one of ``ARCHITECTURES``: ``resnet50_v1``,
            ``resnet50_v2``, ``revnet50``, ``vgg19``.
        width: widening factor k; None = the trunk's default (4 for
            ResNet/RevNet, 8 for VGG19; reference 5.5).
        units: units per stage (ResNet/RevNet); None = (3, 4, 6, 3).
        num_classes: size of ``logits``; None for no logits layer.
        input_shape: ``(H, W, C)``.
        patch_variant: the Jigsaw/RPL trunk: stem stride 1 and stage strides
            (1, 2, 2, 1) (reference 5.5). ResNet and RevNet only.
        stem_stride: explicit stem stride (ResNet/RevNet), instead of
            ``patch_variant``.
        strides: explicit stage strides (ResNet/RevNet).
        last_relu: False gives the paper's "(-)" variants (v2, RevNet).
        weight_decay: original weight decay (``L2(wd / 2)`` on kernels).
        sync_batchnorm: batch statistics all-reduced across replicas.
        ghost_group_size: None (default: statistics over the per-replica
            batch) or ``G``: every batch norm computes its training
            statistics per group of ``G`` consecutive rows (trunk inputs), as
            the original's per-TPU-core batch norm on ``G`` rows per core
            (reference 7.3, 7.4; ``pp.groups``). Excludes ``sync_batchnorm``.
        data_format: ``channels_last`` or ``channels_first`` (the layout used
            inside the trunk; inputs and endpoints stay NHWC).
        dtype_policy: None (float32), ``mixed_float16`` or ``mixed_bfloat16``;
            the ``logits`` layer stays float32.
        memory_saving: RevNet only: recompute unit activations in the backward
            pass instead of storing them.
        name: model name (default: the builder's).

    Returns:
        The trunk (see ``revisit_tf.models``).

    Raises:
        ValueError: for an unknown architecture or an option the trunk lacks.
    """
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture {architecture!r}; expected one of "
            f"{ARCHITECTURES}.{_suggest(architecture)}"
        )
    builder, fixed = _ARCHITECTURES[architecture]
    if ghost_group_size is not None and sync_batchnorm:
        raise ValueError(
            f"ghost_group_size={ghost_group_size!r} (batch statistics per group of "
            "rows within a replica) and sync_batchnorm=True (over all replicas) "
            "exclude each other."
        )
    if patch_variant:
        if stem_stride is not None or strides is not None:
            raise ValueError(
                "patch_variant=True sets stem_stride and strides; do not pass them "
                f"as well (got stem_stride={stem_stride!r}, strides={strides!r})."
            )
        stem_stride, strides = 1, resnet.PATCH_STRIDES
    options = {
        "width": width,
        "units": units,
        "num_classes": num_classes,
        "input_shape": input_shape,
        "stem_stride": stem_stride,
        "strides": strides,
        "last_relu": last_relu,
        "weight_decay": weight_decay,
        "sync_batchnorm": sync_batchnorm,
        "ghost_group_size": groups_lib.check_ghost_group_size(ghost_group_size),
        "data_format": data_format,
        "dtype_policy": dtype_policy,
        "memory_saving": memory_saving,
        "name": name,
    }
    defaults = {
        "width": None,
        "units": None,
        "stem_stride": None,
        "strides": None,
        "last_relu": True,
        "data_format": "channels_last",
        "dtype_policy": None,
        "memory_saving": False,
        "name": None,
    }
    accepted = _accepted_options(builder)
    kwargs = {}
    for key, value in options.items():
        if key in accepted:
            if value is not None:
                kwargs[key] = value
        elif key in _IGNORED_BY_VGG:
            if value is not None:
                _logger.info("%s: no option %s, ignoring %r.", architecture, key, value)
        elif value != defaults.get(key, value):
            raise ValueError(
                f"Architecture {architecture!r} has no option {key!r} "
                f"(got {key}={value!r})."
            )
    return builder(**fixed, **kwargs)


def _accepted_options(builder: Callable[..., keras.Model]) -> set[str]:
    return set(inspect.signature(builder).parameters)
