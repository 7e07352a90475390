"""The landing zone where upstream systems drop files."""

from pathlib import Path

from dagster import ConfigurableResource


class LandingResource(ConfigurableResource):
    """Folder of delivered files, one sub-folder per source.

    Attributes
    ----------
    path
        Root of the landing zone (``$PIPELINE_HOME/landing`` by default).
    """

    path: str

    @property
    def root(self) -> Path:
        """The landing folder as a path."""
        return Path(self.path)
