"""The README documents what the code does: graph, commands, settings and snippets."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.definitions import defs
from pipeline.graph_doc import asset_graph_mermaid, readme_with_graph

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO_TIMEOUT_S = 840  # about 2 min on a 2-core laptop; below `make test`'s --timeout=900
SNIPPET_TIMEOUT_S = 300


def code_blocks(language: str) -> list[str]:
    """Bodies of the fenced ```language blocks of the README, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.M | re.S)


def make_targets(makefile: str) -> set[str]:
    """Targets a Makefile defines (rules ``name:``, not variable assignments ``:=``)."""
    return set(re.findall(r"^([A-Za-z][\w.-]*):(?!=)", makefile, re.M))


def clean_environment(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: no setting of this platform or of MLflow."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIPELINE_", "DAGSTER_", "MLFLOW_", "LAKE_", "LANDING_"))
    }
    env.update(extra)
    return env


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


def test_every_make_command_in_the_readme_is_a_makefile_target():
    makefile = (ROOT / "Makefile").read_text()
    # code only: bash blocks and `inline` spans, e.g. `COMPUTE=spark make dev`
    code = "\n".join(code_blocks("bash") + re.findall(r"`([^`\n]+)`", README))
    named = set(re.findall(r"(?:^|[ \t;&|(])make[ \t]+([A-Za-z][\w.-]*)", code, re.M))
    assert {"demo", "test", "dev"} <= named, named
    missing = sorted(named - make_targets(makefile))
    assert not missing, f"README names make targets the Makefile lacks: {missing}"


def test_readme_python_snippets_compile():
    snippets = code_blocks("python")
    assert snippets, "README has no python snippet"
    for i, snippet in enumerate(snippets):
        compile(snippet, f"README.md python block {i + 1}", "exec")


def test_readme_loads_models_from_the_embedded_store_named_explicitly():
    """Without a tracking URI MLflow would read (and create) ./mlflow.db instead."""
    readers = [s for s in code_blocks("python") if "models:/" in s]
    assert readers, "README shows no snippet loading a registered model"
    for snippet in readers:
        assert 'mlflow.set_tracking_uri("sqlite:///.pipeline/mlflow.db")' in snippet


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only ``.pipeline``, the output of a real ``pipeline demo``.

    The demo runs as the command does (``python -m pipeline.cli demo`` in its own
    process, ``PIPELINE_HOME`` pointing into the folder), from another working
    directory, so the folder holds nothing the README snippets did not find there.
    """
    workdir = tmp_path_factory.mktemp("readme_workdir")
    demo_cwd = tmp_path_factory.mktemp("demo_cwd")
    home = workdir / ".pipeline"
    env = clean_environment(
        PIPELINE_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), PYTHONPATH=str(ROOT)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo"],
        cwd=demo_cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"pipeline demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert sorted(p.name for p in workdir.iterdir()) == [".pipeline"]
    return workdir


@pytest.mark.slow
def test_readme_python_snippets_run_verbatim_in_a_fresh_shell_on_demo_output(
    demo_workdir: Path,
) -> None:
    """Each snippet, as printed, in a new interpreter whose working directory holds the
    demo's ``.pipeline``: it runs, and it writes nothing into that directory (no
    ``mlflow.db``, no ``mlruns``)."""
    snippets = code_blocks("python")
    assert snippets
    for i, snippet in enumerate(snippets):
        proc = subprocess.run(
            [sys.executable, "-c", snippet],
            cwd=demo_workdir,
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=SNIPPET_TIMEOUT_S,
            check=False,
        )
        assert proc.returncode == 0, (
            f"README python block {i + 1} failed:\n{snippet}\n{proc.stderr}"
        )
    left = sorted(p.name for p in demo_workdir.iterdir())
    assert left == [".pipeline"], f"README snippets wrote {left} into the working directory"
    assert not (demo_workdir / "mlflow.db").exists()
    assert not (demo_workdir / "mlruns").exists()
