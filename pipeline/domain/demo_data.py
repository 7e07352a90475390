"""Seeded demo drops, written the way upstream systems deliver them.

Each generator returns the delivered frame *and* the generating truth, so tests
and users can compare what the platform estimates with what was simulated. The
truth is saved under ``landing/_truth/``, which no asset reads (a test holds
``pipeline/`` to that): the complete FX anomaly labels exist only there. What the
platform sees of them is the desk's incident log, ``landing/fx_incidents/``, which
covers part of the time (reviewed windows) and one pair not at all.

The generators draw from known processes:

* claims: ``log rate_d = mu + sigma * z_d`` with ``z_d ~ N(0, 1)``; policies carry
  exposure in policy-years and ``claim_count ~ Poisson(exposure * rate_d)``;
* FX ticks: a random-walk mid with a per-symbol spread level, an intraday
  pattern and lognormal noise; anomalies are bursts of 2-30 ticks and isolated
  spikes where the spread is multiplied by a factor log-uniform in 1.15-4, so some
  are obvious and some hide in the noise (a challenger's holdout AP lies between
  about 0.6 and 0.95, not at 1);
* FX incident log: per reviewed (symbol, day) two reviewed windows of 4-9 hours and
  one ``anomaly`` row per injected burst or spike that meets a window; a fifth of
  the (symbol, day) pairs and the whole of :data:`UNREVIEWED_SYMBOLS` go unreviewed;
* loans: segment-dependent PD, LGD and EAD; eight macro scenarios with PD
  multipliers and asset correlations.
"""

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

DEMO_SEED = 20261125
N_CLAIMS_MONTHS = 3
N_FX_DAYS = 14

# symbol as upstream sends it -> (mid price level, spread level in bps)
FX_SYMBOLS: dict[str, tuple[float, float]] = {
    "EUR/USD": (1.08, 0.8),
    "usd/jpy": (150.0, 1.0),
    "GBP/USD": (1.27, 1.1),
    "aud/usd": (0.66, 1.4),
    "USD/CHF": (0.88, 1.5),
    "usd/cad": (1.36, 1.3),
    "NZD/USD": (0.60, 2.0),
    "eur/gbp": (0.85, 1.2),
}


ANOMALY_MULTIPLIER = (1.15, 4.0)
"""Range of the log-uniform spread multiplier of an injected anomaly."""
BURSTS_PER_DAY, BURST_TICKS, SPIKES_PER_DAY = 4, (2, 30), 6
UNREVIEWED_SYMBOLS = ("eur/gbp",)
"""Pairs the demo desk never reviews: their challengers are judged by the label-free rule."""
REVIEWED_DAY_SHARE = 0.8
"""Share of the other (symbol, day) pairs the desk reviews."""
REVIEWERS = ("a.okafor", "m.lindqvist", "s.tanaka")


@dataclass(frozen=True)
class DemoCalendar:
    """The partitions a demo seeded on one day delivers.

    Attributes
    ----------
    claims_months
        The last :data:`N_CLAIMS_MONTHS` complete months, ``YYYY-MM``, oldest first.
    fx_dates
        The last :data:`N_FX_DAYS` complete UTC days, ending yesterday, ``YYYY-MM-DD``.
    valuation_dates
        The last month end, ``YYYY-MM-DD``.
    """

    claims_months: tuple[str, ...]
    fx_dates: tuple[str, ...]
    valuation_dates: tuple[str, ...]

    @property
    def partitions_start(self) -> str:
        """First day of the earliest month any of the drops belongs to, ``YYYY-MM-DD``."""
        months = [*self.claims_months, *(d[:7] for d in (*self.fx_dates, *self.valuation_dates))]
        return f"{min(months)}-01"


def utc_today() -> dt.date:
    """Today's date in UTC, the time zone of the daily partitions."""
    return dt.datetime.now(dt.UTC).date()


def demo_calendar(today: dt.date | None = None) -> DemoCalendar:
    """Dates of the demo drops for a demo seeded on ``today`` (default: :func:`utc_today`).

    Only complete periods are delivered, as upstream systems do: for 2026-12-01 the
    claims months 2026-09, 2026-10 and 2026-11, the FX days 2026-11-17 to 2026-11-30
    and the loan book of 2026-11-30.
    """
    today = today or utc_today()
    month_start = today.replace(day=1)
    month_index = month_start.year * 12 + month_start.month - 1
    months = tuple(
        f"{i // 12:04d}-{i % 12 + 1:02d}" for i in range(month_index - N_CLAIMS_MONTHS, month_index)
    )
    days = tuple((today - dt.timedelta(days=n)).isoformat() for n in range(N_FX_DAYS, 0, -1))
    last_month_end = (month_start - dt.timedelta(days=1)).isoformat()
    return DemoCalendar(claims_months=months, fx_dates=days, valuation_dates=(last_month_end,))


@dataclass(frozen=True)
class ClaimsTruth:
    """Generating parameters of the claims drop."""

    mu: float
    sigma: float
    district_rates: pl.DataFrame  # district, z, rate


def claims_truth(
    n_districts: int = 240, *, mu: float = np.log(0.07), sigma: float = 0.4, seed: int = DEMO_SEED
) -> ClaimsTruth:
    """District claim rates drawn once; every month's policies share them."""
    rng = np.random.default_rng([seed, 1])
    z = rng.standard_normal(n_districts)
    districts = [f"D{i:03d}" for i in range(1, n_districts + 1)]
    return ClaimsTruth(
        mu=float(mu),
        sigma=float(sigma),
        district_rates=pl.DataFrame(
            {"district": districts, "z": z, "rate": np.exp(mu + sigma * z)}
        ),
    )


def generate_claims(
    month: str, truth: ClaimsTruth, *, n_policies: int = 60_000, seed: int = DEMO_SEED
) -> pl.DataFrame:
    """Policy-level claims for one valuation month.

    District sizes are lognormal, so some districts are dense and some sparse,
    as in a real book.
    """
    rng = np.random.default_rng([seed, 2, int(month.replace("-", ""))])
    n_d = truth.district_rates.height
    size_rng = np.random.default_rng([seed, 3])  # district sizes are stable over months
    weights = size_rng.lognormal(0.0, 0.8, n_d)
    district_idx = rng.choice(n_d, size=n_policies, p=weights / weights.sum())
    exposure = np.round(rng.uniform(0.05, 1.0, n_policies), 4)
    rates = truth.district_rates["rate"].to_numpy()[district_idx]
    counts = rng.poisson(exposure * rates)
    return pl.DataFrame(
        {
            "policy_id": [f"P{month.replace('-', '')}{i:07d}" for i in range(n_policies)],
            "district": truth.district_rates["district"].to_numpy()[district_idx],
            "valuation_month": month,
            "exposure": exposure,
            "claim_count": counts.astype(np.int64),
        }
    )


def generate_fx_ticks(
    date: str,
    *,
    ticks_per_symbol: int = 1_500,
    seed: int = DEMO_SEED,
    symbols: dict[str, tuple[float, float]] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Bid/ask ticks of every symbol for one UTC day, and the anomaly labels.

    Returns
    -------
    tuple of (ticks, labels)
        ``ticks`` has ``symbol`` (as sent), ``ts``, ``bid``, ``ask``;
        ``labels`` has ``symbol`` (as sent), ``ts``, ``kind`` for anomalous ticks only.
    """
    symbols = symbols or FX_SYMBOLS
    day = dt.datetime.fromisoformat(date)
    frames, labels = [], []
    for s_idx, (symbol, (level, spread_bps)) in enumerate(symbols.items()):
        rng = np.random.default_rng([seed, 4, s_idx, int(date.replace("-", ""))])
        n = ticks_per_symbol
        offsets_us = np.sort(rng.choice(86_400_000_000, size=n, replace=False))
        hours = offsets_us / 3.6e9
        # wider at the day boundary (Asia/Sydney handover) and thinner at London/NY overlap
        intraday = 1.0 + 0.8 * np.exp(-((np.minimum(hours, 24 - hours)) ** 2) / 4.0)
        mid = level * np.exp(np.cumsum(rng.normal(0.0, 2e-5, n)))
        spread = mid * spread_bps * 1e-4 * intraday * rng.lognormal(0.0, 0.15, n)
        factor = np.ones(n)
        kinds = np.array([""] * n, dtype=object)
        low, high = np.log(ANOMALY_MULTIPLIER)
        for _ in range(BURSTS_PER_DAY):  # one multiplier per burst
            length = int(rng.integers(BURST_TICKS[0], BURST_TICKS[1] + 1))
            start = int(rng.integers(0, max(n - length, 1)))
            factor[start : start + length] = np.exp(rng.uniform(low, high))
            kinds[start : start + length] = "burst"
        spikes = rng.choice(n, size=min(SPIKES_PER_DAY, n), replace=False)
        factor[spikes] = np.exp(rng.uniform(low, high, spikes.size))
        kinds[spikes] = np.where(kinds[spikes] == "", "spike", kinds[spikes])
        anomalous = factor > 1.0
        spread = spread * factor
        decimals = 3 if level > 20 else 5
        bid = np.round(mid - spread / 2, decimals + 2)
        ask = np.round(mid + spread / 2, decimals + 2)
        ts = [day + dt.timedelta(microseconds=int(o)) for o in offsets_us]
        frames.append(pl.DataFrame({"symbol": symbol, "ts": ts, "bid": bid, "ask": ask}))
        labels.append(
            pl.DataFrame({"symbol": symbol, "ts": ts, "kind": kinds.astype(str)}).filter(
                pl.Series(anomalous)
            )
        )
    ticks = pl.concat(frames).with_columns(pl.col("ts").cast(pl.Datetime("us")))
    return ticks, pl.concat(labels).with_columns(pl.col("ts").cast(pl.Datetime("us")))


def generate_fx_incidents(
    date: str, ticks: pl.DataFrame, labels: pl.DataFrame, *, seed: int = DEMO_SEED
) -> pl.DataFrame:
    """The desk's incident log of one day: reviewed windows and the anomalies found in them.

    A reviewed (symbol, day) gets two reviewed windows of 4-9 hours at random times; every
    run of consecutive anomalous ticks (a burst, or a spike) that meets a window is logged
    as one ``anomaly`` row from its first to its last tick. Anomalies outside every window
    are not logged: nobody looked there. Columns ``symbol`` (as sent), ``start``, ``end``,
    ``label``, ``reviewer``, ``note``; ``note`` is blank on reviewed windows.
    """
    day = dt.datetime.fromisoformat(date)
    last = day + dt.timedelta(days=1, microseconds=-1)
    flagged = set(zip(labels["symbol"].to_list(), labels["ts"].to_list(), strict=True))
    rows: list[dict] = []
    for s_idx, symbol in enumerate(ticks["symbol"].unique(maintain_order=True).to_list()):
        rng = np.random.default_rng([seed, 6, s_idx, int(date.replace("-", ""))])
        if symbol in UNREVIEWED_SYMBOLS or rng.random() >= REVIEWED_DAY_SHARE:
            continue
        reviewer = REVIEWERS[int(rng.integers(len(REVIEWERS)))]
        windows = []
        for _ in range(2):
            hours = rng.uniform(4.0, 9.0)
            start = day + dt.timedelta(hours=rng.uniform(0.0, 24.0 - hours))
            windows.append((start, min(start + dt.timedelta(hours=hours), last)))
            rows.append(_incident(symbol, *windows[-1], "reviewed_window", reviewer, ""))
        ts = ticks.filter(pl.col("symbol") == symbol)["ts"].sort().to_list()
        bad = np.array([(symbol, t) in flagged for t in ts])
        starts = np.flatnonzero(bad & ~np.r_[False, bad[:-1]])
        ends = np.flatnonzero(bad & ~np.r_[bad[1:], False])
        for i, j in zip(starts, ends, strict=True):
            if any(ts[i] <= w_end and ts[j] >= w_start for w_start, w_end in windows):
                note = f"spread wide over {j - i + 1} tick(s)"
                rows.append(_incident(symbol, ts[i], ts[j], "anomaly", reviewer, note))
    schema = {
        "symbol": pl.String,
        "start": pl.Datetime("us"),
        "end": pl.Datetime("us"),
        "label": pl.String,
        "reviewer": pl.String,
        "note": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def _incident(
    symbol: str, start: dt.datetime, end: dt.datetime, label: str, reviewer: str, note: str
) -> dict:
    return {
        "symbol": symbol,
        "start": start,
        "end": end,
        "label": label,
        "reviewer": reviewer,
        "note": note,
    }


SEGMENT_PROFILES = {
    # segment: (share, median PD, PD dispersion, LGD low, LGD high, median EAD)
    "retail_mortgage": (0.40, 0.008, 0.6, 0.10, 0.30, 250_000.0),
    "consumer": (0.30, 0.030, 0.5, 0.50, 0.80, 15_000.0),
    "sme": (0.20, 0.020, 0.6, 0.30, 0.60, 400_000.0),
    "corporate": (0.10, 0.006, 0.8, 0.30, 0.50, 2_500_000.0),
}

SCENARIOS = (
    # scenario, PD multiplier, asset correlation
    ("baseline", 1.0, 0.12),
    ("upside", 0.8, 0.10),
    ("mild_downturn", 1.5, 0.15),
    ("severe_recession", 2.5, 0.20),
    ("stagflation", 2.0, 0.18),
    ("rate_shock", 1.8, 0.16),
    ("housing_crash", 2.2, 0.22),
    ("pandemic", 3.0, 0.25),
)


def generate_loan_book(
    valuation_date: str, *, n_loans: int = 1_200, seed: int = DEMO_SEED
) -> pl.DataFrame:
    """Loan-level book with segment-specific PD, LGD and EAD."""
    rng = np.random.default_rng([seed, 5, int(valuation_date.replace("-", ""))])
    names = list(SEGMENT_PROFILES)
    shares = np.array([SEGMENT_PROFILES[s][0] for s in names])
    seg_idx = rng.choice(len(names), size=n_loans, p=shares / shares.sum())
    pd_, lgd, ead = np.empty(n_loans), np.empty(n_loans), np.empty(n_loans)
    for k, name in enumerate(names):
        _, pd_med, pd_disp, lgd_lo, lgd_hi, ead_med = SEGMENT_PROFILES[name]
        m = seg_idx == k
        pd_[m] = np.clip(pd_med * rng.lognormal(0.0, pd_disp, m.sum()), 1e-4, 0.5)
        lgd[m] = rng.uniform(lgd_lo, lgd_hi, m.sum())
        ead[m] = ead_med * rng.lognormal(0.0, 0.7, m.sum())
    return pl.DataFrame(
        {
            "loan_id": [f"L{i:06d}" for i in range(1, n_loans + 1)],
            "ead": np.round(ead, 2),
            "pd": np.round(pd_, 6),
            "lgd": np.round(lgd, 4),
            "rate": np.round(0.02 + 4 * pd_ + rng.normal(0, 0.003, n_loans), 5),
            "segment": [names[i] for i in seg_idx],
        }
    )


def generate_loan_scenarios() -> pl.DataFrame:
    """The eight macro scenarios of the demo."""
    return pl.DataFrame(
        SCENARIOS, schema=["scenario", "pd_multiplier", "asset_correlation"], orient="row"
    )


def write_demo_landing(
    landing_dir: Path,
    *,
    today: dt.date | None = None,
    seed: int = DEMO_SEED,
    n_policies: int = 60_000,
    ticks_per_symbol: int = 1_500,
    fx_dates: tuple[str, ...] | None = None,
    claims_months: tuple[str, ...] | None = None,
    valuation_dates: tuple[str, ...] | None = None,
    inject_defects: bool = True,
) -> list[Path]:
    """Write every demo drop and its truth under ``landing_dir``.

    Dates not given explicitly are those of :func:`demo_calendar` for ``today``
    (default: today in UTC); values depend on the seed and the date only, so the
    same date always gives the same drop. Files are written to a temporary name
    and renamed, so a sensor never sees a half-written drop. Returns the data
    files written (truth files excluded).

    With ``inject_defects`` the first claims month and the first FX day carry the
    defects real drops have (negative and unparseable exposure, a re-sent policy
    row, crossed quotes), so the quarantine has something to show; the list is
    saved as ``_truth/injected_defects.json``.
    """
    calendar = demo_calendar(today)
    fx_dates = calendar.fx_dates if fx_dates is None else fx_dates
    claims_months = calendar.claims_months if claims_months is None else claims_months
    valuation_dates = calendar.valuation_dates if valuation_dates is None else valuation_dates
    written: list[Path] = []
    truth_dir = landing_dir / "_truth"
    truth_dir.mkdir(parents=True, exist_ok=True)

    truth = claims_truth(seed=seed)
    (truth_dir / "claims_truth.json").write_text(
        json.dumps({"mu": truth.mu, "sigma": truth.sigma, "seed": seed}, indent=2)
    )
    truth.district_rates.write_csv(truth_dir / "claims_district_rates.csv")
    defects: list[dict] = []
    for i, month in enumerate(claims_months):
        frame = generate_claims(month, truth, n_policies=n_policies, seed=seed)
        if inject_defects and i == 0:
            frame, found = _claims_defects(frame)
            defects += [{"file": f"claims/claims_{month}.csv", **d} for d in found]
        written.append(write_drop(frame, landing_dir / "claims" / f"claims_{month}.csv"))

    labels = []
    for i, date in enumerate(fx_dates):
        ticks, day_labels = generate_fx_ticks(date, ticks_per_symbol=ticks_per_symbol, seed=seed)
        if inject_defects and i == 0:
            ticks, found = _crossed_quotes(ticks, day_labels)
            defects += [{"file": f"fx_ticks/fx_ticks_{date}.parquet", **d} for d in found]
        labels.append(day_labels)
        written.append(write_drop(ticks, landing_dir / "fx_ticks" / f"fx_ticks_{date}.parquet"))
        incidents = generate_fx_incidents(date, ticks, day_labels, seed=seed)
        if incidents.height:
            written.append(
                write_drop(incidents, landing_dir / "fx_incidents" / f"fx_incidents_{date}.csv")
            )
    if labels:
        pl.concat(labels).write_parquet(truth_dir / "fx_anomaly_labels.parquet")

    for valuation_date in valuation_dates:
        book = generate_loan_book(valuation_date, seed=seed)
        written.append(
            write_drop(book, landing_dir / "loan_book" / f"loan_book_{valuation_date}.parquet")
        )
        written.append(
            write_drop(
                generate_loan_scenarios(),
                landing_dir / "loan_scenarios" / f"loan_scenarios_{valuation_date}.csv",
            )
        )
    (truth_dir / "injected_defects.json").write_text(json.dumps(defects, indent=2))
    return written


def _claims_defects(frame: pl.DataFrame) -> tuple[pl.DataFrame, list[dict]]:
    """Negative and unparseable exposure, and one policy delivered twice."""
    as_text = frame.with_columns(pl.col("exposure").cast(pl.String))
    exposure = as_text["exposure"].to_list()
    exposure[10], exposure[20], exposure[30] = "-0.5", "-1.25", "n/a"
    as_text = as_text.with_columns(pl.Series("exposure", exposure))
    resent = as_text.slice(40, 1)
    out = pl.concat([as_text, resent])
    return out, [
        {"row": 11, "defect": "negative exposure"},
        {"row": 21, "defect": "negative exposure"},
        {"row": 31, "defect": "unparseable exposure"},
        {"row": out.height, "defect": "duplicate of row 41"},
    ]


def _crossed_quotes(ticks: pl.DataFrame, labels: pl.DataFrame) -> tuple[pl.DataFrame, list[dict]]:
    """Three crossed quotes (bid above ask) on normal ticks of the first symbol."""
    first = ticks["symbol"][0]
    anomalous = set(labels.filter(pl.col("symbol") == first)["ts"].to_list())
    rows = [
        i
        for i, (sym, ts) in enumerate(zip(ticks["symbol"], ticks["ts"], strict=True))
        if sym == first and ts not in anomalous
    ][100:103]
    bid, ask = ticks["bid"].to_list(), ticks["ask"].to_list()
    for i in rows:
        bid[i], ask[i] = ask[i], bid[i]
    out = ticks.with_columns(pl.Series("bid", bid), pl.Series("ask", ask))
    return out, [{"row": i + 1, "defect": "bid > ask"} for i in rows]


def write_drop(frame: pl.DataFrame, path: Path) -> Path:
    """Write a drop the way upstream delivers: a hidden temp name, then an atomic rename.

    Sensors ignore dot-files and ``.tmp`` names, so they never see half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".csv":
        frame.write_csv(tmp)
    else:
        frame.write_parquet(tmp)
    tmp.replace(path)
    return path
