"""Fault-injection points: where the kill tier (tests/test_faults.py) strikes.

Library code marks the moments between two writes that must each leave a
recoverable state (a checkpoint written but not yet recorded, an export moved
aside but the new one not yet in, a manifest renamed in, ...) with
``faults.point(name)``. Unless a hook is installed this is a no-op costing
one global lookup.

The binaries install a hook from the process environment at their edge
(``cli.py``, never the library), so the kill tier can run the real binaries:

* ``REVISIT_TF_FAULT_TRACE=FILE``: append every point reached to FILE, one
  name per line (how the tier enumerates the kill points of a run);
* ``REVISIT_TF_FAULT=NAME[@N]``: at the N-th time (default 1) the process
  reaches point NAME, it kills itself with SIGKILL: no ``finally``, no
  ``atexit``, no flush, exactly as a preempted or OOM-killed job dies.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

_HOOK: Callable[[str], None] | None = None


def point(name: str) -> None:
    """A fault-injection point (no-op unless a hook is installed)."""
    if _HOOK is not None:
        _HOOK(name)


def install(hook: Callable[[str], None] | None) -> None:
    """Installs ``hook(name)`` to be called at every point (None removes it)."""
    global _HOOK
    _HOOK = hook


def kill_at(name: str, count: int = 1) -> Callable[[str], None]:
    """A hook that SIGKILLs this process the ``count``-th time ``name`` is hit."""
    if count < 1:
        raise ValueError(f"count must be >= 1; got {count}.")
    seen = {"n": 0}

    def hook(hit: str) -> None:
        if hit == name:
            seen["n"] += 1
            if seen["n"] == count:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def trace_to(path: str) -> Callable[[str], None]:
    """A hook that appends each point's name to ``path`` (unbuffered)."""

    def hook(hit: str) -> None:
        with open(path, "a") as f:
            f.write(hit + "\n")

    return hook


def hook_from_spec(kill: str | None, trace: str | None) -> Callable[[str], None] | None:
    """The hook for ``REVISIT_TF_FAULT`` / ``REVISIT_TF_FAULT_TRACE`` values.

    Raises:
      ValueError: ``kill`` is not ``NAME`` or ``NAME@N`` with N >= 1.
    """
    hooks = []
    if trace:
        hooks.append(trace_to(trace))
    if kill:
        name, _, count = kill.partition("@")
        if not name or (count and not count.isdigit()):
            raise ValueError(
                f"REVISIT_TF_FAULT must be NAME or NAME@N (N >= 1); got {kill!r}."
            )
        hooks.append(kill_at(name, int(count or 1)))
    if not hooks:
        return None

    def hook(hit: str) -> None:
        for h in hooks:
            h(hit)

    return hook
