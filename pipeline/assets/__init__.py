"""Asset modules: wiring only, the maths lives in ``pipeline.domain``."""

import warnings

from dagster import BetaWarning, PreviewWarning

# Partitioned asset checks, single-run backfills and multi-dimension partition mappings
# are deliberate choices; their beta/preview notices are noise in the UI and test logs.
warnings.filterwarnings("ignore", category=BetaWarning)
warnings.filterwarnings("ignore", category=PreviewWarning)
