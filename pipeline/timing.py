"""A stopwatch for the phases of a heavy job (no dagster: it runs inside Spark tasks too)."""

import contextlib
import time
from collections import Counter
from collections.abc import Iterator, Mapping


class Stopwatch:
    """Wall time per phase of a job, reported as metadata so a slow registry shows in the UI.

    ``with watch("fit"): ...`` adds the block's duration to the phase ``fit``; phases
    repeat (one per symbol, say) and add up. :meth:`seconds` returns the totals plus
    ``total``, the time since the watch was made.
    """

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._seconds: Counter[str] = Counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time one block as ``phase`` (also when it raises)."""
        lap = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] += time.perf_counter() - lap

    def seconds(self, digits: int = 4) -> dict[str, float]:
        """Seconds per phase, and ``total``, rounded to ``digits``."""
        totals = {k: round(v, digits) for k, v in self._seconds.items()}
        totals["total"] = round(time.perf_counter() - self._started, digits)
        return totals

    def add(self, other: Mapping[str, float]) -> None:
        """Add another watch's phases (e.g. one symbol's job) to this one."""
        for phase, value in other.items():
            if phase != "total":
                self._seconds[phase] += value
