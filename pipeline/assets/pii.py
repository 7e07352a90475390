"""The PII scan between bronze and curated claims: redacted rows and the detection log.

Bronze keeps the delivery as it came (it is the raw zone, readable by the platform
only); nothing downstream of this scan sees a raw name, e-mail, phone number, IBAN or
card number. ``curated/claims_by_district`` publishes no personal column (the claims
contract declares them personal) and its quarantine withholds them.
"""

from collections import Counter

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetSpec,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from pipeline import keys
from pipeline.audit import input_versions, with_audit
from pipeline.metadata import counts_table
from pipeline.resources.lake import LakeResource, PartitionWrite
from pipeline.resources.pii import PiiResource
from pipeline.stores.sources import SOURCES, read_bronze

CLAIMS = SOURCES["claims"]
DOCUMENT_ID = pl.format("{}#{}", pl.col("_source_file"), pl.col("_row_number"))
"""A delivered row: landing file and row number (also in every curated and quarantine row)."""


@multi_asset(
    specs=[
        AssetSpec(
            keys.CLAIMS_REDACTED,
            deps=[keys.BRONZE_CLAIMS],
            description=(
                "Policy-level claims as delivered (text), personal data redacted or tokenised "
                "by the versioned PII policy (pipeline/pii_policy.yaml)."
            ),
            group_name="curated",
            kinds={"delta", "polars"},
            metadata={"layer": "curated"},
        ),
        AssetSpec(
            keys.PII_DETECTION_LOG,
            deps=[keys.BRONZE_CLAIMS],
            description=(
                "Every personal-data span the claims scan acted on: document id, column, "
                "entity type, start, end, score, recognizer, policy version, action."
            ),
            group_name="curated",
            kinds={"delta", "polars"},
            metadata={"layer": "gold"},
        ),
    ],
    partitions_def=CLAIMS.partitions_def,
)
def claims_pii_scan(context: AssetExecutionContext, lake: LakeResource, pii: PiiResource):
    """Scan one month of bronze claims; commit redacted rows and their log together."""
    month = context.partition_key
    policy, salt = pii.policy(), pii.salt_bytes()
    inputs = input_versions(lake, "bronze/claims")
    bronze = read_bronze(lake, CLAIMS, month)
    if bronze.height == 0:
        raise Failure(f"claims partition {month}: bronze has no rows to scan; ingest it first")
    # Presidio (and the spaCy it imports) costs ~4 s of import: loaded by the scan only, so
    # the code server, the daemon and every sensor process start without it
    from pipeline.domain.pii import scrub

    scrubbed, log = scrub(bronze, policy, salt, document_id=DOCUMENT_ID)
    scrubbed = scrubbed.drop("_batch_id", strict=False).with_columns(pl.lit(month).alias("month"))
    log = with_audit(
        log.with_columns(pl.lit(month).alias("month")),
        dagster_run_id=context.run.run_id,
        inputs=inputs,
    )
    commit = lake.commit_outcome(
        [
            PartitionWrite("curated", "claims_redacted", scrubbed, [{"month": month}]),
            PartitionWrite("gold", "pii_detection_log", log, [{"month": month}]),
        ]
    )
    found = Counter(f"{e} ({a})" for e, a in log.select("entity_type", "action").iter_rows())
    context.log.info(
        f"claims {month}: {log.height} spans in {bronze.height} rows, policy {policy.version}"
    )
    yield MaterializeResult(
        asset_key=keys.CLAIMS_REDACTED,
        metadata={
            "dagster/row_count": scrubbed.height,
            "pii_policy_version": policy.version,
            "delta_version": commit.versions["curated/claims_redacted"],
            "batch_id": commit.batch_id,
        },
    )
    yield MaterializeResult(
        asset_key=keys.PII_DETECTION_LOG,
        metadata={
            "dagster/row_count": log.height,
            "pii_policy_version": policy.version,
            "spans_by_entity_and_action": MetadataValue.md(counts_table(found, label="entity")),
            "documents_with_pii_in_text": log.filter(pl.col("column").is_in(policy.text_columns))[
                "document_id"
            ].n_unique(),
            "delta_version": commit.versions["gold/pii_detection_log"],
        },
    )


pii_assets = [claims_pii_scan]
