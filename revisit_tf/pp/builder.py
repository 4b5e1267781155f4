"""Builds a preprocessing function from a ``"op1|op2(args)|..."`` string (stage 2).

Contract: :func:`get_preprocess_fn` turns a pipeline string into
``fn(data: dict) -> dict`` that applies the registered ops in order. All
errors surface when the function is *built*, before any data is read:
syntax, unknown op (with the closest known name), empty op, non-literal
argument, arguments that do not bind to the op's factory signature, and bad
values (each factory validates its own arguments).

Pipeline grammar (after big_vision's ``pp/builder.py``, written fresh):

* ops are separated by ``|`` (a ``|`` inside a quoted string argument or
  inside brackets does not separate);
* each op is a bare name ``flip_lr`` or a call ``resize(224)``,
  ``inception_crop(224, area_min=0.08)``, ``keep("image", "label")``;
* arguments are Python literals only (numbers incl. negative ones, strings,
  tuples, lists, dicts, bools, ``None``), parsed with ``ast`` and never
  evaluated as code;
* whitespace around ops and arguments is ignored; an empty pipeline
  (``""``) is the identity.

Place in the data flow: the ``pp_train`` / ``pp_eval`` strings bound at the
root (``experiments``) are built here and mapped over the ``data`` stage's
``tf.data.Dataset``; the result feeds ``models``.
"""

from __future__ import annotations

import ast
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

# ops_image / ops_pretext are imported for their side effect: their
# decorators fill the global registry.
from revisit_tf.pp import (  # noqa: F401
    ops_color,
    ops_image,
    ops_patches,
    ops_pretext,
    ops_views,
    utils,
)
from revisit_tf.pp import registry as registry_lib

logger = logging.getLogger(__name__)

_CLOSE = {"(": ")", "[": "]", "{": "}"}


def split_pipeline(pp_pipeline: str) -> list[str]:
    """Splits a pipeline at top-level ``|`` (not inside quotes or brackets).

    Args:
        pp_pipeline: e.g. ``'decode|resize((4, 6))|keep("image")'``.

    Returns:
        The op strings, stripped of surrounding whitespace (possibly empty
        strings, which the caller rejects).

    Raises:
        ValueError: unbalanced brackets or an unterminated string.
    """
    parts, current, stack = [], [], []
    quote = None
    chars = iter(pp_pipeline)
    for ch in chars:
        if quote:
            current.append(ch)
            if ch == "\\":
                current.append(next(chars, ""))
            elif ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in _CLOSE:
            stack.append(_CLOSE[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                raise ValueError(
                    f"Unbalanced {ch!r} in preprocessing pipeline {pp_pipeline!r}."
                )
        elif ch == "|" and not stack:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if quote or stack:
        missing = quote or stack[-1]
        raise ValueError(
            f"Preprocessing pipeline {pp_pipeline!r} is missing a closing {missing!r}."
        )
    parts.append("".join(current).strip())
    return parts


def parse_op(op_string: str) -> tuple[str, tuple, dict[str, Any]]:
    """Parses one op ``name`` or ``name(literal, ..., kw=literal)`` safely.

    Args:
        op_string: one element of a pipeline, e.g. ``"resize((4, -6), k=1)"``.

    Returns:
        ``(name, args, kwargs)``.

    Raises:
        ValueError: syntax error, not a name/call, ``*args``/``**kwargs``,
            or an argument that is not a Python literal.
    """
    try:
        expr = ast.parse(op_string.strip(), mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse {op_string!r}: {err.msg}.") from None
    if isinstance(expr, ast.Name):
        return expr.id, (), {}
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
        raise ValueError(
            f"expected an op name or a call such as 'resize(224)', got {op_string!r}."
        )

    def _literal(node: ast.AST, what: str) -> Any:
        try:
            return ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(
                f"{what} of {op_string!r} is not a Python literal: "
                f"{ast.unparse(node)!r} (expected numbers, strings, tuples, lists, "
                "bools or None)."
            ) from None

    args = []
    for i, node in enumerate(expr.args):
        if isinstance(node, ast.Starred):
            raise ValueError(f"*args are not allowed in {op_string!r}.")
        args.append(_literal(node, f"argument {i + 1}"))
    kwargs = {}
    for kw in expr.keywords:
        if kw.arg is None:
            raise ValueError(f"**kwargs are not allowed in {op_string!r}.")
        kwargs[kw.arg] = _literal(kw.value, f"keyword argument {kw.arg!r}")
    return expr.func.id, tuple(args), kwargs


def _signature_text(name: str, factory: Callable) -> str:
    """``name(size, method='bilinear', ...)`` without annotations, for errors."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return f"{name}(...)"
    empty = inspect.Parameter.empty
    params = [p.replace(annotation=empty) for p in sig.parameters.values()]
    return f"{name}{sig.replace(parameters=params, return_annotation=empty)}"


def get_preprocess_fn(
    pp_pipeline: str,
    *,
    log_data: bool = True,
    registry: registry_lib.Registry | None = None,
) -> Callable[[dict], dict]:
    """Builds the preprocessing function described by ``pp_pipeline``.

    Example:

        pp = get_preprocess_fn(
            "decode|inception_crop(224)|flip_lr|rotate4|value_range(-1, 1)"
        )
        ds = ds.map(pp)  # {"image": [4, 224, 224, 3] float32, "label": [4]}

    Args:
        pp_pipeline: ``"op1|op2(args)|op3(a, k=v)"``; see the module
            docstring for the grammar. ``""`` is the identity.
        log_data: log (``logging.INFO``) the keys, dtypes and shapes of the
            data dict before and after the pipeline, on the first call only
            (i.e. once at trace time inside ``tf.data.Dataset.map``).
        registry: registry to look ops up in; defaults to the global one.

    Returns:
        ``fn(data: dict) -> dict``; works eagerly on one example and inside
        ``tf.data.Dataset.map``. Each op runs inside ``tf.name_scope(<op>)``.

    Raises:
        ValueError: naming the op, its 1-based position and the pipeline, for
            any syntax, lookup, binding or argument-value error.
    """
    if not isinstance(pp_pipeline, str):
        raise ValueError(
            f"pp_pipeline must be a string like 'decode|resize(224)', got "
            f"{pp_pipeline!r}."
        )
    reg = registry if registry is not None else registry_lib.GLOBAL_REGISTRY
    op_strings = split_pipeline(pp_pipeline) if pp_pipeline.strip() else []
    n_ops = len(op_strings)
    for position, op_string in enumerate(op_strings, start=1):
        if not op_string:
            raise ValueError(
                f"Empty op (op {position} of {n_ops} in pipeline {pp_pipeline!r}): "
                "remove the stray '|' or put an op there."
            )
    ops: list[tuple[str, Callable[[dict], dict]]] = []
    for position, op_string in enumerate(op_strings, start=1):
        where = f"op {position} of {n_ops} in pipeline {pp_pipeline!r}"
        try:
            name, args, kwargs = parse_op(op_string)
            factory = reg.lookup(name)
        except ValueError as err:
            raise ValueError(f"{err} ({where})") from None
        try:
            inspect.signature(factory).bind(*args, **kwargs)
        except TypeError as err:
            raise ValueError(
                f"Arguments of {op_string!r} ({where}) do not match the expected "
                f"signature {_signature_text(name, factory)}: {err}."
            ) from None
        try:
            op_fn = factory(*args, **kwargs)
        except ValueError as err:
            raise ValueError(f"Bad argument in {op_string!r} ({where}): {err}") from err
        ops.append((name, op_fn))

    should_log = bool(log_data)

    # AutoGraph is off: ops use only static Python control flow (tensor-valued
    # branches are written with tf.where / tf.cond), and converting the op
    # code and the `logging` handlers costs seconds of tracing per pipeline.
    @tf.autograph.experimental.do_not_convert
    def _preprocess_fn(data: dict) -> dict:
        nonlocal should_log
        if not isinstance(data, Mapping):
            raise ValueError(
                f"The preprocessing function expects a dict of tensors, got "
                f"{type(data)!r}."
            )
        if should_log:
            logger.info("Data before pp %r:\n%s", pp_pipeline, utils.describe(data))
        data = dict(data)
        for name, op_fn in ops:
            with tf.name_scope(name):
                data = op_fn(data)
            if not isinstance(data, Mapping):
                raise ValueError(
                    f"Op {name!r} returned {type(data)!r}, expected a dict."
                )
        if should_log:
            logger.info("Data after pp %r:\n%s", pp_pipeline, utils.describe(data))
            should_log = False  # Once per built function (one trace in tf.data).
        return data

    return _preprocess_fn
