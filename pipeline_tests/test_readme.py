"""The README documents what the code does: graph, commands and settings."""

import re
from pathlib import Path

from pipeline.definitions import defs
from pipeline.graph_doc import asset_graph_mermaid, readme_with_graph

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_asset_graph_matches_definitions():
    expected = readme_with_graph(README, asset_graph_mermaid(defs))
    assert README == expected, (
        "README asset graph is stale: run `.venv/bin/pipeline graph --update-readme README.md`"
    )


def test_readme_documents_every_environment_variable_read_by_settings():
    settings_source = (ROOT / "pipeline" / "settings.py").read_text()
    read_vars = set(re.findall(r'env\.get\("([A-Z_]+)"', settings_source))
    assert read_vars, "no environment variables found in settings.py"
    missing = sorted(v for v in read_vars if f"`{v}`" not in README)
    assert not missing, f"README lacks environment variables {missing}"


def test_readme_names_the_two_commands_and_makefile_has_them():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "dev", "lint", "bench", "setup"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile lacks target {target}"
    assert "make demo" in README and "make test" in README
