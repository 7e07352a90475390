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
import re
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
    return generate_claims_and_pii(month, truth, n_policies=n_policies, seed=seed)[0]


def generate_claims_and_pii(
    month: str, truth: ClaimsTruth, *, n_policies: int = 60_000, seed: int = DEMO_SEED
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`generate_claims` and the personal-data spans of its notes.

    The spans (``row``, ``entity_type``, ``start``, ``end``, ``text``) are the answer
    key of the PII scan, saved as ``_truth/claims_pii_<month>.parquet``.
    """
    rng = np.random.default_rng([seed, 2, int(month.replace("-", ""))])
    n_d = truth.district_rates.height
    size_rng = np.random.default_rng([seed, 3])  # district sizes are stable over months
    weights = size_rng.lognormal(0.0, 0.8, n_d)
    district_idx = rng.choice(n_d, size=n_policies, p=weights / weights.sum())
    exposure = np.round(rng.uniform(0.05, 1.0, n_policies), 4)
    rates = truth.district_rates["rate"].to_numpy()[district_idx]
    counts = rng.poisson(exposure * rates)
    policy_ids = [f"P{month.replace('-', '')}{i:07d}" for i in range(n_policies)]
    frame = pl.DataFrame(
        {
            "policy_id": policy_ids,
            "district": truth.district_rates["district"].to_numpy()[district_idx],
            "valuation_month": month,
            "exposure": exposure,
            "claim_count": counts.astype(np.int64),
        }
    )
    holders = generate_policyholders(n_policies, seed=[seed, 6, int(month.replace("-", ""))])
    notes, pii = generate_adjuster_notes(
        holders, policy_ids, counts > 0, seed=[seed, 7, int(month.replace("-", ""))]
    )
    return pl.concat([frame, holders, notes.select("adjuster_notes")], how="horizontal"), pii


# --- personal data of the claims drop -------------------------------------------------
# Small seeded lists, not a faker: the values look real (checksummed IBANs and card
# numbers, dialable phone formats) but are drawn from a handful of names.
FIRST_NAMES = (
    "Amelia", "Oliver", "Sofia", "Liam", "Hannah", "Lukas", "Chloe", "Mateo", "Aisha",
    "Noah", "Ingrid", "Kenji", "Fatima", "Jonas", "Elena", "Tomasz", "Priya", "Daniel",
    "Grace", "Mehmet", "Lucia", "Samuel", "Yara", "Finn", "Nadia", "Pierre", "Olga",
    "Kwame", "Isabel", "Arjun",
)  # fmt: skip
LAST_NAMES = (
    "Schneider", "Okafor", "Fischer", "Hughes", "Novak", "Rossi", "Kowalski", "Dubois",
    "Yilmaz", "Jansen", "Murphy", "Larsen", "Tanaka", "Haddad", "Moreau", "Brennan",
    "Petrov", "Silva", "Nakamura", "Weber", "Ahmed", "O'Connor", "Van Dijk", "Lindqvist",
    "Mensah", "Garcia", "Hoffmann", "Patel", "Byrne", "Castillo",
)  # fmt: skip
# Third parties named in notes (witnesses, other drivers, neighbours): a larger, varied
# list of given names and surnames (particles, apostrophes, hyphens, three-part names).
# The scan's given-name list (pipeline/domain/given_names.txt) is written separately and
# is not built from these; some of these names are deliberately absent from it.
THIRD_PARTY_GIVEN = (
    "Aoife", "Bartholomew", "Chidi", "Dagny", "Eamon", "Folasade", "Gwendolyn", "Hamza",
    "Ilse", "Jarrah", "Kasimir", "Leocadia", "Mirela", "Nnamdi", "Odalys", "Pernille",
    "Quentin", "Radomir", "Saoirse", "Tiago", "Ulla", "Viggo", "Wiremu", "Ximena",
    "Yevgenia", "Zbigniew", "Anneliese", "Benedikt", "Cosmin", "Dunya", "Efua", "Gintaras",
    "Anna", "Thomas", "Maria", "Peter", "Sarah", "David", "Laura", "Michael", "Emma",
    "John", "Elena", "Jan", "Sofia", "Ahmet", "Fatma", "Piotr", "Katarzyna", "Rahul",
    "Pooja", "Kofi", "Amina", "Hiroshi", "Yuki", "Lars", "Ingrid", "Pablo", "Lucia",
    "Mustafa", "Leila", "Sipho", "Chioma", "Niamh", "Declan", "Giulia", "Matteo", "Olga",
    "Ivan", "Rachel", "Oscar", "Helga", "Klaus", "Wei", "Minh", "Ravi", "Ewa", "Camille",
)  # fmt: skip
THIRD_PARTY_SURNAMES = (
    "Achterberg", "Baptiste", "Ciobanu", "Delacroix", "Eriksen", "Fitzgerald", "Gallagher",
    "Horvath", "Iwasaki", "Jovanovic", "Kruger", "Lombardi", "Mbeki", "Nowak", "Oyelaran",
    "Papadopoulos", "Quigley", "Rahman", "Szabo", "Takahashi", "Ulrich", "Vasquez",
    "Wojcik", "Xu", "Yamamoto", "Zielinski", "O'Brien", "D'Angelo", "McKenzie", "MacLeod",
    "Al-Rashid", "Smith-Jones", "van der Berg", "de Souza", "Van Damme", "De Luca",
    "von Arnim", "Nguyen", "Kim", "Osei", "Adeyemi", "Bjornsson", "Carvalho", "Dimitrov",
    "Esposito", "Fernandes", "Grabowski", "Hakimi", "Ivanova", "Johansson", "Kapoor",
    "Lindgren", "Moreno", "Nieminen", "Ozturk", "Pereira", "Quispe", "Romano", "Sorensen",
)  # fmt: skip
MAIL_DOMAINS = ("gmail.com", "outlook.com", "web.de", "posteo.de", "yahoo.co.uk", "icloud.com")
# country: (BBAN length in digits after the bank letters, bank letters)
_IBAN_FORMATS = {"DE": (18, 0), "GB": (14, 4), "NL": (10, 4), "FR": (23, 0)}
_CARD_PREFIXES = (("4", 16), ("51", 16), ("53", 16), ("55", 16), ("34", 15), ("37", 15))
PII_ENTITY_TYPES = (
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "IBAN_CODE",
    "CREDIT_CARD",
    "POLICY_NUMBER",
)
"""Entity types the generated notes carry (and the truth spans name)."""


def _digits(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n`` rows of ``k`` random decimal digits."""
    return rng.integers(0, 10, (n, k))


def _text(digits: np.ndarray) -> list[str]:
    """Each row of a digit matrix as a string."""
    return (
        pl.DataFrame(digits.astype(str), schema=[f"c{i}" for i in range(digits.shape[1])])
        .select(pl.concat_str(pl.all()))
        .to_series()
        .to_list()
    )


def _mod97(values: np.ndarray) -> np.ndarray:
    """Remainder mod 97 of the decimal number written by each row (values 0-35, A=10)."""
    r = np.zeros(values.shape[0], dtype=np.int64)
    for col in values.T:
        r = np.where(col > 9, (r * 100 + col) % 97, (r * 10 + col) % 97)
    return r


def _ibans(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` IBANs of four countries with valid ISO 13616 check digits."""
    countries = rng.choice(list(_IBAN_FORMATS), n)
    letters = rng.integers(10, 36, (n, 4))
    digits = _digits(rng, n, 23)
    out = np.empty(n, dtype=object)
    for country, (n_digits, n_letters) in _IBAN_FORMATS.items():
        rows = countries == country
        bban = np.hstack([letters[rows, :n_letters], digits[rows, :n_digits]])
        suffix = np.array([int(c, 36) for c in country] + [0, 0])
        check = 98 - _mod97(np.hstack([bban, np.tile(suffix, (bban.shape[0], 1))]))
        text = (
            _text(bban)
            if n_letters == 0
            else [
                "".join(chr(55 + v) for v in row[:n_letters]) + "".join(map(str, row[n_letters:]))
                for row in bban.tolist()
            ]
        )
        out[rows] = [f"{country}{c:02d}{t}" for c, t in zip(check.tolist(), text, strict=True)]
    return out.tolist()


def _cards(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` card numbers (Visa, Mastercard, Amex prefixes) with a valid Luhn digit."""
    choice = rng.integers(0, len(_CARD_PREFIXES), n)
    digits = _digits(rng, n, 16)
    out = np.empty(n, dtype=object)
    for k, (prefix, length) in enumerate(_CARD_PREFIXES):
        rows = choice == k
        body = digits[rows, :length]
        body[:, : len(prefix)] = [int(c) for c in prefix]
        payload = body[:, : length - 1][:, ::-1]  # Luhn: double every second digit from the right
        doubled = payload[:, 0::2] * 2
        total = (doubled - 9 * (doubled > 9)).sum(axis=1) + payload[:, 1::2].sum(axis=1)
        body[:, length - 1] = (10 - total % 10) % 10
        out[rows] = _text(body)
    return out.tolist()


# prefixes of real numbering plans (mobile ranges, area codes), so numbers are dialable
_UK_MOBILE = (7700, 7701, 7711, 7721, 7733, 7747, 7766, 7788, 7799, 7801, 7812, 7825, 7903, 7912)
_DE_MOBILE = (151, 152, 160, 170, 171, 176)
_US_AREA = (212, 312, 415, 617, 202, 305, 713, 206, 404, 303)
_DE_AREA = (30, 40, 89, 69, 221, 211, 711)


def _phones(rng: np.random.Generator, n: int) -> list[str]:
    """UK and German mobiles, US numbers (international format), German landlines."""
    style = rng.integers(0, 4, n).tolist()
    pick = rng.integers(0, 1_000, n).tolist()
    exchange = rng.integers(201, 999, n).tolist()
    d = _text(_digits(rng, n, 8))
    formats = (
        lambda i: f"+44 {_UK_MOBILE[pick[i] % len(_UK_MOBILE)]} {d[i][:6]}",
        lambda i: f"+49 {_DE_MOBILE[pick[i] % len(_DE_MOBILE)]} {d[i]}",
        lambda i: f"+1 {_US_AREA[pick[i] % len(_US_AREA)]} {exchange[i]} {d[i][:4]}",
        lambda i: f"(0{_DE_AREA[pick[i] % len(_DE_AREA)]}) {d[i][:4]} {d[i][4:7]}",
    )
    return [formats[s](i) for i, s in enumerate(style)]


def generate_policyholders(n: int, *, seed: int | list[int] = DEMO_SEED) -> pl.DataFrame:
    """Name, e-mail, phone, IBAN and card number of ``n`` policyholders (seeded)."""
    rng = np.random.default_rng(seed)
    first = rng.choice(FIRST_NAMES, n).tolist()
    last = rng.choice(LAST_NAMES, n).tolist()
    domains = rng.choice(MAIL_DOMAINS, n).tolist()
    numbers = rng.integers(1, 100, n).tolist()
    local = [re.sub(r"[^a-z]", "", s.lower()) for s in last]
    return pl.DataFrame(
        {
            "policyholder_name": [f"{f} {s}" for f, s in zip(first, last, strict=True)],
            "policyholder_email": [
                f"{f.lower()}.{s}{k}@{m}"
                for f, s, k, m in zip(first, local, numbers, domains, strict=True)
            ],
            "policyholder_phone": _phones(rng, n),
            "policyholder_iban": _ibans(rng, n),
            "policyholder_card": _cards(rng, n),
        }
    )


def _grouped(value: str, size: int = 4) -> str:
    return " ".join(value[i : i + size] for i in range(0, len(value), size))


# sentences of an adjuster's note; {slot} is personal data (recorded as a truth span),
# [slot] is a look-alike that is not (amounts, dates, invoice numbers)
_NOTE_SENTENCES = (
    "Called {PERSON} on {PHONE_NUMBER} about the water damage in the kitchen.",
    "Spoke with {TITLE_PERSON} about the excess of EUR [amount].",
    "Refund of EUR [amount] to be paid to IBAN {IBAN_CODE}.",
    "Customer asked us to confirm by e-mail at {EMAIL_ADDRESS}.",
    "Premium refund requested to card {CREDIT_CARD}; card ending [last4] on file.",
    "Policy {POLICY_NUMBER} checked, cover confirmed on [date].",
    "Third party driver {OTHER_PERSON} admitted fault at the scene.",
    "Witness {OTHER_PERSON} contacted, statement pending since [date].",
    "According to {OTHER_PERSON}, the car was parked when it was hit.",
    "The other driver, {OTHER_PERSON}, disputes the sequence of events.",
    "{OTHER_PERSON} (passenger) reported neck pain on [date].",
    "Statement from neighbour {OTHER_PERSON} received on [date].",
    "Left a voicemail for {OTHER_PERSON}, the tenant upstairs.",
    "{OTHER_PERSON} called back and confirmed the leak started on [date].",
    "Photos of the damage were sent in by {OTHER_PERSON} on [date].",
    "Passenger {OTHER_PERSON} was treated at the hospital and released.",
    "Garage invoice no. [invoice] for EUR [amount] received on [date].",
    "Loss adjuster visit booked for [date], contact number {PHONE_NUMBER}.",
    "Reserve raised to EUR [amount] after photos from {TITLE_PERSON}.",
    "{PERSON} disputes the settlement; reply sent to {EMAIL_ADDRESS}.",
)


def generate_adjuster_notes(
    holders: pl.DataFrame,
    policy_ids: list[str],
    has_claim: np.ndarray,
    *,
    seed: int | list[int] = DEMO_SEED,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Free-text adjuster notes for the policies with a claim (empty text elsewhere).

    A note mixes 2-4 sentences about the policyholder (full name, ``Mr``/``Ms`` and
    surname, phone, e-mail, IBAN and card, sometimes grouped in fours as people type
    them, the policy number), third parties (witnesses, other drivers, passengers,
    neighbours: without a title, before, inside or at the start of a sentence, drawn
    from :data:`THIRD_PARTY_GIVEN` and :data:`THIRD_PARTY_SURNAMES`) and look-alikes
    that are not personal data (amounts, dates, invoice numbers, the last four digits
    of a card).

    Returns
    -------
    tuple of (notes, truth)
        ``notes`` has ``adjuster_notes`` per policy; ``truth`` has ``row`` (0-based),
        ``entity_type``, ``start``, ``end`` and ``text`` of every personal-data span.
    """
    rng = np.random.default_rng(seed)
    notes, truth = [], []
    for row in range(holders.height):
        if not has_claim[row]:
            notes.append("")
            continue
        holder = holders.row(row, named=True)
        picks = rng.choice(len(_NOTE_SENTENCES), int(rng.integers(2, 5)), replace=False)
        text = ""
        for k in picks:
            for part in _NOTE_PARTS.split(_NOTE_SENTENCES[int(k)]):
                value, entity, offset = _note_part(part, holder, policy_ids[row], rng)
                if entity is not None:
                    start, end = len(text) + offset, len(text) + len(value)
                    truth.append((row, entity, start, end, value[offset:]))
                text += value
            text += " "
        notes.append(text.rstrip())
    truth_frame = pl.DataFrame(
        truth,
        schema={
            "row": pl.Int64,
            "entity_type": pl.String,
            "start": pl.Int64,
            "end": pl.Int64,
            "text": pl.String,
        },
        orient="row",
    )
    return pl.DataFrame({"adjuster_notes": notes}), truth_frame


_NOTE_PARTS = re.compile(r"(\{[A-Z_]+\}|\[[a-z0-9]+\])")


def _third_party_name(rng: np.random.Generator) -> str:
    """A witness or other driver: given name and surname, one in five with a middle name.

    Drawn from the third-party lists, not the policyholders', so the scan cannot find
    them by the row's own name.
    """
    given = [str(g) for g in rng.choice(THIRD_PARTY_GIVEN, 2)]
    first = " ".join(given) if rng.random() < 0.2 else given[0]
    return f"{first} {rng.choice(THIRD_PARTY_SURNAMES)}"


def _note_part(
    part: str, holder: dict, policy_id: str, rng: np.random.Generator
) -> tuple[str, str | None, int]:
    """One sentence part: its text, entity type (``None``: not personal data) and offset.

    The offset is where the personal data starts within the text (after a title).
    """
    if part.startswith("["):
        slot = part[1:-1]
        if slot == "amount":
            return f"{int(rng.integers(100, 20_000)):,}.{int(rng.integers(0, 100)):02d}", None, 0
        if slot == "date":
            return f"2026-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}", None, 0
        if slot == "invoice":
            return f"INV-{int(rng.integers(10**7, 10**8))}", None, 0
        return f"{int(rng.integers(0, 10_000)):04d}", None, 0  # last four digits of a card
    if not part.startswith("{"):
        return part, None, 0
    slot = part[1:-1]
    grouped = rng.random() < 0.4
    if slot == "PERSON":
        return holder["policyholder_name"], "PERSON", 0
    if slot == "TITLE_PERSON":
        title = str(rng.choice(["Mr", "Ms", "Mrs", "Dr"]))
        surname = holder["policyholder_name"].split(" ", 1)[1]
        return f"{title} {surname}", "PERSON", len(title) + 1
    if slot == "OTHER_PERSON":
        return _third_party_name(rng), "PERSON", 0
    if slot in ("EMAIL_ADDRESS", "PHONE_NUMBER"):
        return holder[f"policyholder_{slot.split('_')[0].lower()}"], slot, 0
    if slot == "IBAN_CODE":
        iban = holder["policyholder_iban"]
        return (_grouped(iban) if grouped else iban), slot, 0
    if slot == "CREDIT_CARD":
        card = holder["policyholder_card"]
        return (_grouped(card) if grouped else card), slot, 0
    return policy_id, "POLICY_NUMBER", 0


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
    saved as ``_truth/injected_defects.json``. The personal data in each month's notes
    is saved as ``_truth/claims_pii_<month>.parquet``.
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
        frame, pii = generate_claims_and_pii(month, truth, n_policies=n_policies, seed=seed)
        pii.write_parquet(truth_dir / f"claims_pii_{month}.parquet")
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
