"""The one ``Definitions`` object of the code location ``pipeline.definitions:defs``."""

from dagster import Definitions

from pipeline import automation
from pipeline.assets.credibility import credibility_assets
from pipeline.assets.fx_anomaly import fx_assets
from pipeline.assets.ingest import bronze_assets, curated_assets
from pipeline.assets.loan_loss import loan_loss_assets
from pipeline.assets.pii import pii_assets
from pipeline.audit import with_code_versions
from pipeline.checks.contracts import contract_checks
from pipeline.checks.credibility import credibility_checks
from pipeline.checks.fx_anomaly import fx_checks
from pipeline.checks.loan_loss import loan_loss_checks
from pipeline.resources import build_resources
from pipeline.settings import get_settings


def build_definitions(settings=None) -> Definitions:
    """Assemble assets, checks, jobs, schedules, sensors and resources."""
    settings = settings or get_settings()
    return Definitions(
        assets=[
            # code versions make the UI show a partition stale after its code changed
            *with_code_versions(bronze_assets, "pipeline.assets.ingest"),
            *with_code_versions(curated_assets, "pipeline.assets.ingest"),
            *with_code_versions(pii_assets, "pipeline.assets.pii"),
            *with_code_versions(credibility_assets, "pipeline.assets.credibility"),
            *with_code_versions(fx_assets, "pipeline.assets.fx_anomaly"),
            *with_code_versions(loan_loss_assets, "pipeline.assets.loan_loss"),
        ],
        asset_checks=[*contract_checks, *credibility_checks, *fx_checks, *loan_loss_checks],
        jobs=automation.jobs,
        schedules=automation.schedules,
        sensors=automation.build_sensors(),
        resources=build_resources(settings),
    )


defs = build_definitions()
