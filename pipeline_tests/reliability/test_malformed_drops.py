"""A generated corpus of malformed drops across the four sources: none is lost or silent.

Each drop lands in its own landing folder and goes the way a delivery goes: the
landing sensor (report a reject, or request a run), then bronze's reader (fail with a
message naming the file), then the contract (quarantine rows with their reason). Every
drop must end in exactly the outcome it deserves: a reported reject, a clear error, or
quarantined rows whose count reconciles with what was delivered.
"""

import datetime as dt
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from pipeline import automation
from pipeline.domain import contracts
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingResource
from pipeline.stores.sources import SOURCES, read_delivery

pytestmark = pytest.mark.slow

OLD_NS = int(dt.datetime(2026, 10, 1, tzinfo=dt.UTC).timestamp() * 1e9)  # settled long ago
MONTH, DAY, VALUATION = "2026-07", "2026-09-01", "2026-09-30"


def claims(**changes: object) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "policy_id": [f"P{i}" for i in range(6)],
            "district": ["D1", "D2"] * 3,
            "valuation_month": [MONTH] * 6,
            "exposure": ["0.5"] * 6,
            "claim_count": ["0", "1", "0", "2", "0", "1"],
        }
    )
    return _change(frame, changes)


def ticks(**changes: object) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "symbol": ["EUR/USD", "EUR/USD", "usd/jpy", "usd/jpy"],
            "ts": [f"{DAY}T00:00:0{i}" for i in range(4)],
            "bid": ["1.10", "1.11", "150.0", "150.1"],
            "ask": ["1.11", "1.12", "150.2", "150.3"],
        }
    )
    return _change(frame, changes)


def book(**changes: object) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "loan_id": [f"L{i}" for i in range(5)],
            "ead": ["1000"] * 5,
            "pd": ["0.02"] * 5,
            "lgd": ["0.4"] * 5,
            "rate": ["0.05"] * 5,
            "segment": ["sme", "consumer", "corporate", "retail_mortgage", "sme"],
        }
    )
    return _change(frame, changes)


def scenarios(**changes: object) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "scenario": ["base", "adverse", "severe"],
            "pd_multiplier": ["1.0", "1.5", "2.5"],
            "asset_correlation": ["0.12", "0.15", "0.2"],
        }
    )
    return _change(frame, changes)


def incidents(**changes: object) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "symbol": ["EUR/USD", "EUR/USD"],
            "start": [f"{DAY} 08:00:00", f"{DAY} 09:00:00"],
            "end": [f"{DAY} 12:00:00", f"{DAY} 09:05:00"],
            "label": ["reviewed_window", "anomaly"],
            "reviewer": ["desk", "desk"],
            "note": ["", "spread blow-out"],
        }
    )
    return _change(frame, changes)


def _change(frame: pl.DataFrame, changes: dict[str, object]) -> pl.DataFrame:
    """Set ``column`` of row 1 (``column="value"``), or drop it (``column=None``)."""
    for column, value in changes.items():
        if value is None:
            frame = frame.drop(column)
        else:
            frame = frame.with_columns(
                pl.when(pl.int_range(pl.len()) == 1)
                .then(pl.lit(value))
                .otherwise(pl.col(column))
                .alias(column)
            )
    return frame


def csv(frame: pl.DataFrame) -> bytes:
    return frame.write_csv().encode()


def parquet(frame: pl.DataFrame) -> bytes:
    out = io.BytesIO()
    frame.write_parquet(out)
    return out.getvalue()


@dataclass(frozen=True)
class Drop:
    """One malformed delivery and what it must end in."""

    source: str
    name: str
    payload: bytes
    outcome: str  # "reject", "error" or "quarantine"
    expect: str  # a piece of the reason or message


def _drops() -> list[Drop]:
    c, t, b, s = (f"{MONTH}", f"{DAY}", f"{VALUATION}", f"{VALUATION}")
    good_c, good_t, good_b, good_s = (
        csv(claims()),
        parquet(ticks()),
        parquet(book()),
        csv(scenarios()),
    )
    truncated = parquet(ticks())[:-9]
    return [
        # names the platform cannot place: reported, never ingested
        Drop("claims", f"claims-{c}.csv", good_c, "reject", "separator after 'claims'"),
        Drop("claims", f"claims_{c}.CSV", good_c, "reject", "must be lower-case"),
        Drop("claims", f"claims_{c}.csv.gz", good_c, "reject", "compressed (.gz)"),
        Drop("claims", "claims_202607.csv", good_c, "reject", "no YYYY-MM date"),
        Drop("claims", "claims_2026-13.csv", good_c, "reject", "partition outside"),
        Drop("claims", f"fx_ticks_{t}.csv", good_c, "reject", "names source 'fx_ticks'"),
        Drop("fx_ticks", "fx_ticks_20260901.parquet", good_t, "reject", "no YYYY-MM-DD date"),
        Drop("fx_ticks", f"fx-ticks_{t}.parquet", good_t, "reject", "does not start with"),
        Drop("fx_ticks", f"fx_ticks_{t}.PARQUET", good_t, "reject", "must be lower-case"),
        Drop("fx_ticks", f"fx_ticks_{t}.parquet.zip", good_t, "reject", "compressed (.zip)"),
        Drop("fx_ticks", "fx_ticks_2035-01-01.parquet", good_t, "reject", "partition outside"),
        Drop("loan_book", "loan_book_30-09-2026.parquet", good_b, "reject", "no YYYY-MM-DD"),
        Drop("loan_book", f"loanbook_{b}.parquet", good_b, "reject", "does not start with"),
        Drop("loan_book", f"loan_book_{b}.xlsx", good_b, "reject", "is not .csv or .parquet"),
        Drop("loan_book", "loan_book_2026-02-30.parquet", good_b, "reject", "partition outside"),
        Drop("loan_scenarios", f"loan_scenarios_{s}.json", good_s, "reject", "'.json' is not"),
        Drop("loan_scenarios", f"loan_scenarios {s}.csv", good_s, "reject", "separator"),
        Drop("loan_scenarios", f"loan_scenarios_{s}.csv.bz2", good_s, "reject", "compressed"),
        # unreadable files: reported by the sensor
        Drop("claims", f"claims_{c}.csv", b"", "reject", "unreadable: "),
        Drop(
            "claims",
            f"claims_{c}.csv",
            "policy_id\nZürich\n".encode("latin-1"),
            "reject",
            "not valid UTF-8",
        ),
        Drop("fx_ticks", f"fx_ticks_{t}.parquet", truncated, "reject", "unreadable: "),
        Drop(
            "loan_book",
            f"loan_book_{b}.csv",
            b"loan_id,ead\nL1,1,2,3\n",
            "reject",
            "cannot be parsed",
        ),
        Drop(
            "loan_scenarios",
            f"loan_scenarios_{s}.csv",
            b"\xff\xfe\x00garbage",
            "reject",
            "not valid UTF-8",
        ),
        Drop("fx_incidents", f"fx_incidents {t}.csv", csv(incidents()), "reject", "separator"),
        Drop("fx_incidents", f"fx_incidents_{t}.csv", csv(incidents(label=None)), "error", "label"),
        Drop(
            "fx_incidents",
            f"fx_incidents_{t}.csv",
            csv(incidents(label="maybe")),
            "quarantine",
            "label not one of",
        ),
        # whole-file contract breaches: bronze fails naming the file and the column
        Drop("claims", f"claims_{c}.csv", csv(claims(exposure=None)), "error", "exposure"),
        Drop("fx_ticks", f"fx_ticks_{t}.parquet", parquet(ticks(ask=None)), "error", "ask"),
        Drop("loan_book", f"loan_book_{b}.parquet", parquet(book(pd=None)), "error", "pd"),
        Drop(
            "loan_scenarios",
            f"loan_scenarios_{s}.csv",
            csv(scenarios(scenario=None)),
            "error",
            "scenario",
        ),
        Drop(
            "claims",
            f"claims_{c}.csv",
            csv(claims().with_columns(pl.lit("x").alias("_row_number"))),
            "error",
            "is a column the platform adds",
        ),
        Drop(
            "loan_book",
            f"loan_book_{b}.parquet",
            parquet(book().with_columns(pl.lit("x").alias("broker name"))),
            "error",
            "'broker name' is empty or holds",
        ),
        # rows breaking the contract: quarantined with their reason
        Drop("claims", f"claims_{c}.csv", csv(claims(exposure="-1")), "quarantine", "exposure < 0"),
        Drop(
            "claims",
            f"claims_{c}.csv",
            csv(claims(exposure="abc")),
            "quarantine",
            "cannot parse 'abc'",
        ),
        Drop(
            "claims",
            f"claims_{c}.csv",
            csv(claims(policy_id="P0")),
            "quarantine",
            "duplicate key (policy_id)",
        ),
        Drop(
            "claims",
            f"claims_{c}.csv",
            csv(claims(valuation_month="2026-08")),
            "quarantine",
            "not the partition month",
        ),
        Drop(
            "claims",
            f"claims_{c}.csv",
            csv(claims(district="../x")),
            "quarantine",
            "district is not",
        ),
        Drop(
            "claims",
            f"claims_{c}.csv",
            csv(claims(exposure="NaN")),
            "quarantine",
            "exposure is NaN",
        ),
        Drop(
            "fx_ticks",
            f"fx_ticks_{t}.parquet",
            parquet(ticks(bid="9.9")),
            "quarantine",
            "bid > ask",
        ),
        Drop(
            "fx_ticks",
            f"fx_ticks_{t}.parquet",
            parquet(ticks(symbol="../etc")),
            "quarantine",
            "symbol does not normalise",
        ),
        Drop(
            "fx_ticks",
            f"fx_ticks_{t}.parquet",
            parquet(ticks(ts="2026-09-02T00:00:00")),
            "quarantine",
            "not on the partition date",
        ),
        Drop(
            "fx_ticks",
            f"fx_ticks_{t}.parquet",
            parquet(ticks(bid="-1")),
            "quarantine",
            "bid or ask <= 0",
        ),
        Drop(
            "fx_ticks",
            f"fx_ticks_{t}.parquet",
            parquet(ticks(ask="inf")),
            "quarantine",
            "NaN or infinite",
        ),
        Drop(
            "fx_ticks",
            f"fx_ticks_{t}.parquet",
            parquet(ticks().with_columns(pl.lit("€$").alias("symbol"))),
            "quarantine",
            "symbol does not normalise",
        ),
        Drop(
            "loan_book",
            f"loan_book_{b}.parquet",
            parquet(book(pd="1.5")),
            "quarantine",
            "pd outside [0, 1]",
        ),
        Drop(
            "loan_book",
            f"loan_book_{b}.parquet",
            parquet(book(lgd="-0.1")),
            "quarantine",
            "lgd outside [0, 1]",
        ),
        Drop(
            "loan_book",
            f"loan_book_{b}.parquet",
            parquet(book(segment="crypto")),
            "quarantine",
            "segment not one of",
        ),
        Drop(
            "loan_book",
            f"loan_book_{b}.parquet",
            parquet(book(loan_id="L0")),
            "quarantine",
            "duplicate key (loan_id)",
        ),
        Drop(
            "loan_book",
            f"loan_book_{b}.parquet",
            parquet(book(ead="nan")),
            "quarantine",
            "NaN or infinite",
        ),
        Drop(
            "loan_scenarios",
            f"loan_scenarios_{s}.csv",
            csv(scenarios(asset_correlation="1")),
            "quarantine",
            "asset_correlation outside [0, 1)",
        ),
        Drop(
            "loan_scenarios",
            f"loan_scenarios_{s}.csv",
            csv(scenarios(pd_multiplier="-2")),
            "quarantine",
            "pd_multiplier < 0",
        ),
        Drop(
            "loan_scenarios",
            f"loan_scenarios_{s}.csv",
            csv(scenarios(scenario="Bad Name")),
            "quarantine",
            "scenario is not",
        ),
        Drop(
            "loan_scenarios",
            f"loan_scenarios_{s}.csv",
            csv(scenarios(scenario="base")),
            "quarantine",
            "duplicate key (scenario)",
        ),
    ]


DROPS = _drops()


def test_the_corpus_covers_every_source_and_outcome() -> None:
    assert len(DROPS) >= 40
    assert {d.source for d in DROPS} == set(SOURCES)
    for source in SOURCES:
        assert {d.outcome for d in DROPS if d.source == source} == {
            "reject",
            "error",
            "quarantine",
        }, source


@pytest.fixture(scope="module")
def instance() -> Iterator[dg.DagsterInstance]:
    """One instance for the corpus: no drop materialises anything in it."""
    with dg.DagsterInstance.ephemeral() as shared:
        yield shared


def _sensor(
    instance: dg.DagsterInstance, landing: LandingResource, lake: LakeResource, source: str
) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, resources={"landing": landing, "lake": lake}
    )
    target = automation.LANDING_TARGETS[source]
    return automation.evaluate_landing(context, landing, lake, target)


@pytest.mark.parametrize("drop", DROPS, ids=[f"{d.source}:{d.name}:{d.expect}" for d in DROPS])
def test_a_malformed_drop_ends_in_a_reject_an_error_or_a_quarantine(
    tmp_path: Path, drop: Drop, instance: dg.DagsterInstance
) -> None:
    path = tmp_path / "landing" / drop.source / drop.name
    path.parent.mkdir(parents=True)
    path.write_bytes(drop.payload)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    landing = LandingResource(path=str(tmp_path / "landing"), settle_s=0, completion="settle")
    lake = LakeResource(root_uri=str(tmp_path / "lake"), service_timeout_s=30)

    result = _sensor(instance, landing, lake, drop.source)

    rejects = lake.read("ops", automation.REJECTS_TABLE)
    if drop.outcome == "reject":
        assert not result.run_requests
        assert rejects.select("file", "source").rows() == [
            (f"{drop.source}/{drop.name}", drop.source)
        ]
        assert drop.expect in rejects["reason"].item(), rejects["reason"].item()
        return
    assert rejects.height == 0, rejects.rows()
    (request,) = result.run_requests
    source = SOURCES[drop.source]
    partition_key = request.partition_key

    def check() -> pl.DataFrame:
        return read_delivery(landing, source, partition_key).rows.collect()

    if drop.outcome == "error":
        with pytest.raises(dg.Failure) as failure:
            check()
        message = str(failure.value.description)
        assert message.startswith(f"{drop.source} partition {partition_key}: ")
        assert drop.name in message and drop.expect in message, message
        return
    delivered = check()
    curated, quarantined = contracts.apply_contract(
        delivered, source.contract(partition_key), partition_key=partition_key
    )
    assert quarantined.height >= 1
    assert curated.height + quarantined.height == delivered.height
    assert all(drop.expect in reason for reason in quarantined["reason"]), quarantined.rows()
    assert set(quarantined["_source_file"]) == {f"{drop.source}/{drop.name}"}
