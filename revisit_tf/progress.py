"""Progress of the long loops: counts against a total, elapsed time and ETA.

One helper for every stage that runs long (the training loop, feature
extraction, the probe's L2 sweep), so that their log lines read alike:
``format_duration`` writes ``1h02m03s`` / ``4m05s``, and :class:`Progress`
tracks ``done / total`` items, says when a rate-limited line is due
(``due()``) and writes the ``3/10 (30%), elapsed 1m02s, ETA 2m24s`` part of
it (``summary``). The ETA assumes the remaining items take the mean time of
those done so far. No TensorFlow, no logging configuration: callers log the
lines themselves (the binaries format and route ``logging``).
"""

from __future__ import annotations

import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """``3725.2 -> "1h02m05s"``, ``65 -> "1m05s"``; negatives are ``"0m00s"``."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Items done out of ``total`` since construction, with an ETA.

    Example:

        progress = Progress(total=len(batches), every_s=30)
        for i, batch in enumerate(batches):
            work(batch)
            if progress.due():
                logging.info("Features: batch %s.", progress.summary(i + 1))

    Args:
        total: items in all, or None when unknown (then no ETA).
        every_s: ``due()`` is true at most once per this many seconds.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        total: int | None,
        *,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0 or None; got {total}.")
        self.total = total
        self.every_s = float(every_s)
        self._clock = clock
        self._start = clock()
        self._last = self._start

    def elapsed(self) -> float:
        """Seconds since construction."""
        return self._clock() - self._start

    def due(self) -> bool:
        """True (and restarts the interval) if ``every_s`` passed since the last."""
        now = self._clock()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True

    def eta(self, done: int) -> float | None:
        """Seconds left at the mean rate so far; None without a total or rate."""
        if self.total is None or done <= 0:
            return None
        return max(self.total - done, 0) * self.elapsed() / done

    def summary(self, done: int) -> str:
        """``"3/10 (30%), elapsed 1m02s, ETA 2m24s"`` (``"3, elapsed 1m02s"``)."""
        elapsed = f"elapsed {format_duration(self.elapsed())}"
        if self.total is None:
            return f"{done}, {elapsed}"
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        eta = self.eta(done)
        tail = "" if eta is None else f", ETA {format_duration(eta)}"
        return f"{done}/{self.total}{share}, {elapsed}{tail}"
