"""Seeded FX tick simulator with injected spread anomalies and their labels.

It mirrors what the demo data feeds the pipeline: one symbol, ``ticks_per_day`` ticks per UTC
day at random times, a geometric random-walk mid, and a spread that is lognormal noise around a
per-symbol level times an intraday pattern (wider at the day boundaries, narrowest at noon).
Anomalies are bursts of consecutive ticks, and isolated single-tick spikes, whose spread is
multiplied by a factor drawn from ``multiplier_range``. The truth is returned next to the ticks so
tests can measure precision and recall against it.
"""

import datetime as dt
from dataclasses import dataclass

import numpy as np
import polars as pl

_US_PER_DAY = 86_400_000_000


@dataclass(frozen=True)
class SimulatedTicks:
    """Ticks in the curated layout and the injected truth, both sorted by ``ts``."""

    ticks: pl.DataFrame
    labels: pl.DataFrame

    @property
    def is_anomaly(self) -> np.ndarray:
        """Boolean truth aligned row by row with ``ticks``."""
        return self.labels["is_anomaly"].to_numpy()


def intraday_pattern(hour: np.ndarray, amplitude: float = 1.0) -> np.ndarray:
    """Spread multiplier by UTC hour: ``1 + amplitude`` at midnight, 1 at noon."""
    return 1.0 + amplitude * 0.5 * (1.0 + np.cos(2.0 * np.pi * hour / 24.0))


def simulate_ticks(
    *,
    symbol: str = "EURUSD",
    mid0: float = 1.10,
    spread_level: float = 1e-4,
    noise_sigma: float = 0.25,
    tick_vol: float = 2e-5,
    start: dt.date = dt.date(2024, 1, 2),
    n_days: int = 1,
    ticks_per_day: int = 2_000,
    bursts_per_day: int = 4,
    burst_length: tuple[int, int] = (5, 20),
    spikes_per_day: int = 6,
    multiplier_range: tuple[float, float] = (4.0, 15.0),
    intraday_amplitude: float = 1.0,
    seed: int = 0,
) -> SimulatedTicks:
    """Simulate curated ticks for one symbol with labelled spread anomalies.

    Parameters
    ----------
    symbol, mid0, spread_level
        Normalised symbol, starting mid and the typical absolute spread at noon.
    noise_sigma
        Standard deviation of the lognormal spread noise (log units).
    tick_vol
        Standard deviation of the per-tick mid log-return.
    start, n_days, ticks_per_day
        Calendar of the ticks: ``ticks_per_day`` uniform random microsecond timestamps per day.
    bursts_per_day, burst_length, spikes_per_day, multiplier_range
        Anomaly injection: bursts of consecutive ticks (length uniform in ``burst_length``,
        inclusive) and isolated spikes, each with one multiplier uniform in ``multiplier_range``.
        The defaults label about 2.8 % of the ticks, the rate of the shipped demo data.
    intraday_amplitude
        How much wider the spread is at midnight than at noon (see ``intraday_pattern``).
    seed
        Seed of the ``numpy`` generator; the same seed gives the same frame.

    Returns
    -------
    SimulatedTicks
        ``ticks`` with ``symbol, ts, bid, ask, spread`` and ``labels`` with
        ``symbol, ts, is_anomaly``.
    """
    rng = np.random.default_rng(seed)
    day0_us = int(dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC).timestamp()) * (
        1_000_000
    )
    offsets = [
        np.sort(rng.choice(_US_PER_DAY, size=ticks_per_day, replace=False)) + d * _US_PER_DAY
        for d in range(n_days)
    ]
    ts_us = day0_us + np.concatenate(offsets)
    n = ts_us.size
    hour = ((ts_us - day0_us) % _US_PER_DAY) / 3_600_000_000

    log_mid = np.log(mid0) + np.cumsum(rng.normal(0.0, tick_vol, size=n))
    mid = np.exp(log_mid)
    spread = (
        spread_level
        * intraday_pattern(hour, intraday_amplitude)
        * np.exp(rng.normal(-0.5 * noise_sigma**2, noise_sigma, size=n))
    )

    is_anomaly = np.zeros(n, dtype=bool)
    lo, hi = burst_length
    for d in range(n_days):
        day_start = d * ticks_per_day
        for _ in range(bursts_per_day):
            length = int(rng.integers(lo, hi + 1))
            first = day_start + int(rng.integers(0, ticks_per_day - length))
            spread[first : first + length] *= rng.uniform(*multiplier_range)
            is_anomaly[first : first + length] = True
        for _ in range(spikes_per_day):
            i = day_start + int(rng.integers(0, ticks_per_day))
            spread[i] *= rng.uniform(*multiplier_range)
            is_anomaly[i] = True

    bid = mid - spread / 2.0
    ask = mid + spread / 2.0
    ts = pl.Series("ts", ts_us, dtype=pl.Int64).cast(pl.Datetime("us", "UTC"))
    ticks = pl.DataFrame(
        {
            "symbol": [symbol] * n,
            "ts": ts,
            "bid": bid,
            "ask": ask,
            # Recomputed from the quotes, exactly as the curated layer defines it.
            "spread": ask - bid,
        }
    )
    labels = pl.DataFrame({"symbol": [symbol] * n, "ts": ts, "is_anomaly": is_anomaly})
    return SimulatedTicks(ticks=ticks, labels=labels)
