"""The PII scan between bronze and curated claims: redacted rows and the detection log.

Bronze keeps the delivery as it came (it is the raw zone, readable by the platform
only); nothing downstream of this scan sees a raw name, e-mail, phone number, IBAN or
card number. ``curated/claims_by_district`` publishes no personal column (the claims
contract declares them personal) and its quarantine withholds them.
"""

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from pipeline import keys
from pipeline.audit import input_versions
from pipeline.metadata import counts_table
from pipeline.resources.lake import LakeResource, PartitionWrite
from pipeline.resources.pii import PiiResource
from pipeline.stores.claims_pii import CLAIMS, scrub_month


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
    """Scan one month of bronze claims, batch by batch; commit redacted rows and log together."""
    month = context.partition_key
    policy, salt = pii.policy(), pii.salt_bytes()
    inputs = input_versions(lake, "bronze/claims")
    scanned = scrub_month(
        lake, month, policy, salt, dagster_run_id=context.run.run_id, inputs=inputs
    )
    try:
        commit = lake.commit_outcome(
            [
                PartitionWrite("curated", "claims_redacted", scanned.redacted, [{"month": month}]),
                PartitionWrite("gold", "pii_detection_log", scanned.log, [{"month": month}]),
            ]
        )
    finally:
        scanned.cleanup()
    context.log.info(
        f"claims {month}: {scanned.spans} spans in {scanned.rows} rows, policy {policy.version}"
    )
    yield MaterializeResult(
        asset_key=keys.CLAIMS_REDACTED,
        metadata={
            "dagster/row_count": scanned.rows,
            "pii_policy_version": policy.version,
            "delta_version": commit.versions["curated/claims_redacted"],
            "batch_id": commit.batch_id,
        },
    )
    yield MaterializeResult(
        asset_key=keys.PII_DETECTION_LOG,
        metadata={
            "dagster/row_count": scanned.spans,
            "pii_policy_version": policy.version,
            "spans_by_entity_and_action": MetadataValue.md(
                counts_table(scanned.spans_by_entity_and_action, label="entity")
            ),
            "documents_with_pii_in_text": scanned.documents_with_pii_in_text,
            "delta_version": commit.versions["gold/pii_detection_log"],
        },
    )


pii_assets = [claims_pii_scan]
