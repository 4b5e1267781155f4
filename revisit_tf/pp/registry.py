"""Registry of preprocessing-op factories (stage 2, ``pp``).

Contract: an op is registered under a short name (a Python identifier such as
``rotate4``) on a *factory* ``get_<op>(*args, **kwargs) -> fn``, where
``fn(data: dict) -> dict`` is the op itself. ``builder.get_preprocess_fn``
looks every name of a ``"a|b(1)|c"`` pipeline up here, at build time, before
any data is seen; an unknown name fails with the list of known ops and the
closest match.

Place in the data flow: ``data`` (sources) -> **pp** (this registry, the
builder and the ops) -> ``models``. Nothing in here touches tensors.

The design follows big_vision's ``pp/registry.py`` (one process-wide registry
filled by decorators at import time), written fresh, with two changes: the
keys are bare op names, and tests isolate the registry with
:meth:`Registry.isolated` / :func:`isolated_registry` instead of deleting keys
by hand.

Example:

    from revisit_tf.pp.registry import register

    @register("double")
    def get_double(key="image"):
        def _double(data):
            return {**data, key: data[key] * 2}
        return _double
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator
from typing import Any

OpFn = Callable[[dict], dict]
OpFactory = Callable[..., OpFn]


class Registry:
    """A mapping from op name to op factory.

    Example:

        reg = Registry()

        @reg.register("identity")
        def get_identity():
            return lambda data: dict(data)

        fn = reg.lookup("identity")()
    """

    def __init__(self, ops: dict[str, OpFactory] | None = None) -> None:
        """Creates a registry, optionally pre-filled with ``ops`` (copied)."""
        self._ops: dict[str, OpFactory] = {}
        for name, factory in (ops or {}).items():
            self.register(name)(factory)

    def register(
        self, name: str, *, replace: bool = False
    ) -> Callable[[OpFactory], OpFactory]:
        """Returns a decorator that registers a factory under ``name``.

        Args:
            name: the op name used in pipeline strings; an ASCII Python
                identifier starting with a letter (the builder parses ops as
                Python expressions and opens a ``tf.name_scope(name)``).
            replace: allow overwriting an existing entry.

        Returns:
            A decorator that registers its argument and returns it unchanged.

        Raises:
            ValueError: if ``name`` is not an identifier, or is already
                registered and ``replace`` is False, or the decorated object
                is not callable.
        """
        # A letter first: the name is also used as a tf.name_scope, which
        # rejects a leading underscore.
        if not (
            isinstance(name, str)
            and name.isidentifier()
            and name.isascii()
            and name[0].isalpha()
        ):
            raise ValueError(
                "Op name must be an ASCII Python identifier starting with a letter, "
                f"such as 'rotate4', got {name!r}."
            )

        def _register(factory: OpFactory) -> OpFactory:
            if not callable(factory):
                raise ValueError(
                    f"Op {name!r}: expected a callable factory, got {factory!r}."
                )
            if name in self._ops and not replace:
                raise ValueError(
                    f"Op {name!r} is already registered (by "
                    f"{getattr(self._ops[name], '__qualname__', self._ops[name])}); "
                    "pass replace=True to overwrite it."
                )
            self._ops[name] = factory
            return factory

        return _register

    def lookup(self, name: str) -> OpFactory:
        """Returns the factory registered under ``name``.

        Raises:
            ValueError: if ``name`` is unknown; the message lists the known ops
                and suggests the closest one (difflib).
        """
        try:
            return self._ops[name]
        except KeyError:
            pass
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown preprocessing op {name!r}.{hint} "
            f"Known ops: {', '.join(known) or '(none)'}."
        )

    def names(self) -> list[str]:
        """Returns the registered op names, sorted."""
        return sorted(self._ops)

    def copy(self) -> Registry:
        """Returns an independent registry with the same entries."""
        return Registry(self._ops)

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def __len__(self) -> int:
        return len(self._ops)

    @contextlib.contextmanager
    def isolated(self) -> Iterator[Registry]:
        """Context manager: anything (un)registered inside is undone on exit.

        The registry keeps its current entries inside the block, so built-in
        ops stay usable next to temporary ones.

        Yields:
            This registry.
        """
        snapshot = dict(self._ops)
        try:
            yield self
        finally:
            self._ops.clear()
            self._ops.update(snapshot)


# The process-wide registry; `ops_image` and `ops_pretext` fill it on import
# (the package `__init__` imports them, so importing any `revisit_tf.pp`
# module is enough).
GLOBAL_REGISTRY = Registry()


def register(name: str, *, replace: bool = False) -> Callable[[OpFactory], Any]:
    """Decorator registering a factory in the global registry (see `Registry`)."""
    return GLOBAL_REGISTRY.register(name, replace=replace)


def lookup(name: str) -> OpFactory:
    """Looks ``name`` up in the global registry (see `Registry.lookup`)."""
    return GLOBAL_REGISTRY.lookup(name)


@contextlib.contextmanager
def isolated_registry() -> Iterator[Registry]:
    """Isolates the global registry for the duration of a ``with`` block.

    Example (a test registering a temporary op without leaking it):

        with isolated_registry() as reg:
            reg.register("double")(get_double)
            fn = get_preprocess_fn("double")
        # "double" is unknown again here.

    Yields:
        The global registry.
    """
    with GLOBAL_REGISTRY.isolated() as reg:
        yield reg
