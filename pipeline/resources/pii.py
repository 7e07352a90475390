"""The PII policy and the tokenisation salt, handed to the scan as one resource."""

from pathlib import Path
from typing import TYPE_CHECKING

from dagster import ConfigurableResource

if TYPE_CHECKING:  # the domain module imports Presidio (~4 s): only the scan loads it
    from pipeline.domain.pii import PiiPolicy

SALT_VARIABLE = "PIPELINE_PII_SALT"
"""Environment variable holding the tokenisation salt (a secret; never in code or logs)."""
DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "pii_policy.yaml"
"""The versioned policy shipped in the package."""


class PiiResource(ConfigurableResource):
    """Policy file and salt of the PII scan.

    ``salt`` comes from ``EnvVar("PIPELINE_PII_SALT")``
    (:func:`pipeline.resources.build_resources`); ``policy_path`` defaults to the
    packaged ``pipeline/pii_policy.yaml``.
    """

    salt: str
    policy_path: str = ""

    def policy(self) -> "PiiPolicy":
        """The parsed policy (:class:`pipeline.domain.pii.PiiPolicyError` when malformed)."""
        from pipeline.domain.pii import parse_policy

        path = Path(self.policy_path) if self.policy_path else DEFAULT_POLICY
        return parse_policy(path.read_text(), str(path))

    def salt_bytes(self) -> bytes:
        """The salt, checked (:class:`pipeline.domain.pii.PiiSaltError` names the variable)."""
        from pipeline.domain.pii import check_salt

        return check_salt(self.salt, SALT_VARIABLE)
