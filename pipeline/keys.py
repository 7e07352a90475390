"""Asset keys and check names: one spelling for every reference.

Assets, checks, guards, sensors and tests import these constants instead of
repeating strings, so a rename is one edit and a typo is an import error.
"""

from dagster import AssetCheckKey, AssetKey

# bronze: as delivered, plus lineage columns
BRONZE_CLAIMS = AssetKey(["bronze", "claims"])
BRONZE_FX_TICKS = AssetKey(["bronze", "fx_ticks"])
BRONZE_FX_INCIDENTS = AssetKey(["bronze", "fx_incidents"])
BRONZE_LOAN_BOOK = AssetKey(["bronze", "loan_book"])
BRONZE_LOAN_SCENARIOS = AssetKey(["bronze", "loan_scenarios"])

# curated features
CLAIMS_BY_DISTRICT = AssetKey(["curated", "claims_by_district"])
FX_SPREADS = AssetKey(["curated", "fx_spreads"])
FX_INCIDENTS = AssetKey(["curated", "fx_incidents"])
LOAN_BOOK = AssetKey(["curated", "loan_book"])
LOAN_SCENARIOS = AssetKey(["curated", "loan_scenarios"])
# policy-level claims with personal data redacted or tokenised, and the scan's audit log
CLAIMS_REDACTED = AssetKey(["curated", "claims_redacted"])
PII_DETECTION_LOG = AssetKey(["gold", "pii_detection_log"])

# models and gold outputs
CREDIBILITY_POSTERIOR = AssetKey(["gold", "credibility_posterior"])
CREDIBILITY_TABLE = AssetKey(["gold", "credibility_table"])
FX_CHALLENGER_MODEL = AssetKey(["models", "fx_challenger_model"])
FX_CHAMPION_MODEL = AssetKey(["models", "fx_champion_model"])
FX_ANOMALY_SCORES = AssetKey(["gold", "fx_anomaly_scores"])
FX_MODEL_MONITOR = AssetKey(["gold", "fx_model_monitor"])
LOAN_LOSS_DISTRIBUTION = AssetKey(["gold", "loan_loss_distribution"])

# data-contract check names (bronze: what arrived; curated: what we publish)
CHECK_FILE_SCHEMA = "delivered_schema_matches_contract"
CHECK_ROWS_BREAKING_CONTRACT = "rows_breaking_contract_are_quarantined"
CHECK_INGEST_LAG = "ingested_within_24h_of_delivery"
CHECK_NO_UNDECLARED_COLUMNS = "delivered_columns_are_all_declared"
CHECK_CURATED_CONTRACT = "curated_rows_satisfy_contract"
CHECK_RECONCILES = "rows_in_equal_curated_plus_quarantined"

# model gates
CHECK_RHAT = "posterior_rhat_below_1_01"
CHECK_DIVERGENCES = "no_divergent_transitions"
CHECK_ESS = "posterior_ess_bulk_above_400"
CHECK_ESS_TAIL = "posterior_ess_tail_above_400"
CONVERGENCE_CHECKS = (CHECK_RHAT, CHECK_DIVERGENCES, CHECK_ESS, CHECK_ESS_TAIL)
CHECK_POSTERIOR_PREDICTIVE = "claims_consistent_with_posterior_predictive"
# every check on credibility_posterior; the table's guard requires them all
CREDIBILITY_POSTERIOR_CHECKS = (*CONVERGENCE_CHECKS, CHECK_POSTERIOR_PREDICTIVE)

CHECK_CHALLENGER_BEATS_CHAMPION = "challenger_beats_champion"
CHECK_CHAMPION_KPI = "champion_kpi_within_bounds"
CHECK_FEATURE_DRIFT = "model_features_within_drift_bounds"

CHECK_MC_ERROR = "mc_error_within_bound"
CHECK_EL_ANALYTIC = "expected_loss_matches_analytic"
CHECK_VASICEK = "quantiles_match_vasicek_reference"
CHECK_CONTRIBUTIONS = "contributions_add_up_to_var_and_es"


def check_key(asset_key: AssetKey, name: str) -> AssetCheckKey:
    """Return the check key for ``name`` on ``asset_key``."""
    return AssetCheckKey(asset_key=asset_key, name=name)
