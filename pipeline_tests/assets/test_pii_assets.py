"""The PII scan as materialised: nothing raw downstream, policy versions, the salt."""

import os
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from pipeline import keys
from pipeline.domain.contracts import CLAIMS_PERSONAL_COLUMNS
from pipeline.domain.demo_data import write_demo_landing
from pipeline.resources.pii import DEFAULT_POLICY, SALT_VARIABLE, PiiResource
from pipeline_tests.conftest import Platform

MONTH = "2026-07"
VALUATION = "2026-09-30"
SCAN = [keys.CLAIMS_REDACTED, keys.PII_DETECTION_LOG]
STRUCTURED = [c for c in CLAIMS_PERSONAL_COLUMNS if c != "adjuster_notes"]


def _demo(platform: Platform) -> pl.DataFrame:
    """Small demo drops with the injected defects; returns the delivered claims."""
    write_demo_landing(
        platform.settings.landing_dir,
        n_policies=400,
        ticks_per_symbol=20,
        fx_dates=(),
        claims_months=(MONTH,),
        valuation_dates=(VALUATION,),
        inject_defects=True,
    )
    return pl.read_csv(
        platform.settings.landing_dir / "claims" / f"claims_{MONTH}.csv", infer_schema=False
    )


def _raw_values(platform: Platform, delivered: pl.DataFrame) -> set[str]:
    """Every delivered policyholder value (also IBANs and cards in fours) and every value
    the generator put in the notes (its answer key), except those the policy keeps."""
    raw = set()
    for column in STRUCTURED:
        for value in delivered[column].to_list():
            raw.add(value)
            if column in ("policyholder_iban", "policyholder_card"):
                raw.add(" ".join(value[i : i + 4] for i in range(0, len(value), 4)))
    policy = PiiResource(salt=os.environ[SALT_VARIABLE]).policy()
    keep = [e for e, rule in policy.entities.items() if rule.action == "keep"]
    key = pl.read_parquet(platform.settings.landing_dir / "_truth" / f"claims_pii_{MONTH}.parquet")
    assert key.filter(pl.col("entity_type") == "PERSON").height > 0
    return raw | set(key.filter(~pl.col("entity_type").is_in(keep))["text"])


def _tables(lake_root: Path, layers: tuple[str, ...]) -> list[tuple[str, str]]:
    return sorted(
        (layer, p.name)
        for layer in layers
        if (lake_root / layer).is_dir()
        for p in (lake_root / layer).iterdir()
        if (p / "_delta_log").is_dir()
    )


def test_no_curated_gold_or_quarantine_table_holds_a_raw_policyholder_value(
    platform: Platform,
) -> None:
    delivered = _demo(platform)
    platform.materialize([keys.BRONZE_CLAIMS, *SCAN, keys.CLAIMS_BY_DISTRICT], MONTH)
    platform.materialize(
        [keys.BRONZE_LOAN_BOOK, keys.LOAN_BOOK, keys.BRONZE_LOAN_SCENARIOS, keys.LOAN_SCENARIOS],
        VALUATION,
    )
    raw = _raw_values(platform, delivered)
    tables = _tables(Path(platform.settings.lake_uri), ("curated", "gold", "quarantine"))
    assert ("curated", "claims_redacted") in tables and ("gold", "pii_detection_log") in tables
    assert ("quarantine", "claims_by_district") in tables
    leaks = {}
    for layer, table in tables:
        frame = platform.lake.read(layer, table)
        text = "\n".join(
            "\n".join(frame[c].cast(pl.String).drop_nulls().to_list()) for c in frame.columns
        )
        found = sorted(v for v in raw if v in text)
        if found:
            leaks[f"{layer}/{table}"] = found
    assert not leaks, leaks  # no exceptions: witnesses and other drivers included
    # the redacted rows are all there, personal columns replaced, the rest as delivered
    redacted = platform.lake.read("curated", "claims_redacted")
    assert redacted.height == delivered.height
    assert redacted.sort("_row_number")["policy_id"].to_list() == delivered["policy_id"].to_list()
    assert redacted["policyholder_email"].str.starts_with("<EMAIL_ADDRESS:").all()
    assert (redacted["policyholder_card"] == "<CREDIT_CARD>").all()
    quarantined = platform.lake.read("quarantine", "claims_by_district")
    assert quarantined.height > 0 and not quarantined["record"].str.contains("policyholder").any()


def test_a_month_scanned_in_batches_equals_the_month_scanned_at_once(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan reads bronze in batches and spills them: the outcome may not depend on it."""
    delivered = _demo(platform)
    platform.materialize([keys.BRONZE_CLAIMS, *SCAN], MONTH)
    audit = ["dagster_run_id"]
    whole = platform.lake.read("curated", "claims_redacted").sort("_row_number")
    log = platform.lake.read("gold", "pii_detection_log").drop(audit, strict=False)

    monkeypatch.setattr("pipeline.stores.claims_pii.SCAN_BATCH_ROWS", 37)
    result = platform.materialize(SCAN, MONTH)
    batched = platform.lake.read("curated", "claims_redacted").sort("_row_number")
    batched_log = platform.lake.read("gold", "pii_detection_log").drop(audit, strict=False)
    assert batched.height == whole.height == delivered.height > 37 * 10
    assert batched.equals(whole)
    order = ["document_id", "column", "start"]
    assert batched_log.sort(order).equals(log.sort(order))
    assert log.height > 100
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == keys.PII_DETECTION_LOG
    ]
    assert event.materialization.metadata["dagster/row_count"].value == log.height


def test_a_policy_version_change_rewrites_only_what_it_affects(
    platform: Platform, tmp_path: Path
) -> None:
    _demo(platform)
    platform.materialize([keys.BRONZE_CLAIMS, *SCAN], MONTH)
    before = platform.lake.read("curated", "claims_redacted").sort("_row_number")
    log_before = platform.lake.read("gold", "pii_detection_log")
    policy = tmp_path / "pii_policy.yaml"
    policy.write_text(
        DEFAULT_POLICY.read_text()
        .replace('version: "2026.12.2"', 'version: "2026.12.2-email"')
        .replace("EMAIL_ADDRESS: {action: tokenise", "EMAIL_ADDRESS: {action: redact")
    )
    platform.resources["pii"] = PiiResource(salt=os.environ[SALT_VARIABLE], policy_path=str(policy))
    platform.materialize(SCAN, MONTH)
    after = platform.lake.read("curated", "claims_redacted").sort("_row_number")
    log_after = platform.lake.read("gold", "pii_detection_log")

    assert set(log_before["policy_version"]) == {"2026.12.2"}
    assert set(log_after["policy_version"]) == {"2026.12.2-email"}
    spans = ["document_id", "column", "entity_type", "start", "end", "score", "recognizer"]
    assert log_before.sort(spans).select(spans).equals(log_after.sort(spans).select(spans))
    joined = log_before.join(log_after, on=spans, suffix="_new")
    assert set(joined.filter(pl.col("action") != pl.col("action_new"))["entity_type"]) == {
        "EMAIL_ADDRESS"
    }
    email_docs = set(
        log_after.filter(
            (pl.col("entity_type") == "EMAIL_ADDRESS") & (pl.col("column") == "adjuster_notes")
        )["document_id"]
    )
    docs = before.select(pl.format("{}#{}", "_source_file", "_row_number"))[:, 0]
    changed = before["adjuster_notes"] != after["adjuster_notes"]
    assert email_docs and set(docs.filter(changed)) == email_docs
    unchanged = [c for c in before.columns if c not in ("policyholder_email", "adjuster_notes")]
    unchanged = [c for c in unchanged if not c.startswith("_ingested")]
    assert before.select(unchanged).equals(after.select(unchanged))
    assert (after["policyholder_email"] == "<EMAIL_ADDRESS>").all()


def test_an_unset_salt_fails_the_scan_naming_the_variable(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    _demo(platform)
    platform.materialize([keys.BRONZE_CLAIMS], MONTH)
    monkeypatch.delenv(SALT_VARIABLE)
    platform.resources["pii"] = PiiResource(salt=dg.EnvVar(SALT_VARIABLE))
    with pytest.raises(Exception, match=SALT_VARIABLE):
        platform.materialize(SCAN, MONTH)
    assert platform.lake.read("curated", "claims_redacted").height == 0
