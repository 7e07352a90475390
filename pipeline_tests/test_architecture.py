"""House rules a machine can check: layers, thin assets, one private-API module, used deps."""

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
MAX_ASSET_LINES = 50
ASSET_DECORATORS = {"asset", "multi_asset", "asset_check", "multi_asset_check"}


def _modules() -> list[Path]:
    return sorted(PIPELINE.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def test_import_contracts_hold() -> None:
    """The layers of DESIGN.md, as import-linter contracts (also run by ``make lint``)."""
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_no_check_imports_an_asset_and_no_asset_imports_checks_or_automation() -> None:
    for path in (PIPELINE / "checks").rglob("*.py"):
        assert not [m for m in _imports(path) if m.startswith("pipeline.assets")], path
    for path in (PIPELINE / "assets").rglob("*.py"):
        bad = [
            m for m in _imports(path) if m.startswith(("pipeline.checks", "pipeline.automation"))
        ]
        assert not bad, f"{path} imports {bad}"


def test_asset_and_check_functions_fit_on_a_screen() -> None:
    too_long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            if not {_decorator_name(d) for d in node.decorator_list} & ASSET_DECORATORS:
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_ASSET_LINES:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not too_long, f"asset/check bodies over {MAX_ASSET_LINES} lines: {too_long}"


def test_no_platform_code_reads_the_demo_answer_key() -> None:
    """``landing/_truth`` is the demo's answer key, for tests only: the gate's labels are
    the incident log (``curated/fx_incidents``). Only the demo generator writes there, and
    the CLI looks for its marker to tell a seeded landing zone."""
    allowed = {Path("pipeline/domain/demo_data.py"), Path("pipeline/cli.py")}
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _modules()
        if path.relative_to(ROOT) not in allowed
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "_truth" in line
    ]
    assert found == [], found
    cli = (ROOT / "pipeline" / "cli.py").read_text()
    assert [line.strip() for line in cli.splitlines() if "_truth" in line] == [
        'marker = settings.landing_dir / "_truth" / "claims_truth.json"'
    ]


def test_private_dagster_api_lives_in_one_module() -> None:
    private = re.compile(r"^dagster(_[a-z]+)?\._")
    users = sorted(
        str(p.relative_to(ROOT)) for p in _modules() if any(private.match(m) for m in _imports(p))
    )
    assert users == ["pipeline/dagster_private.py"]
    overrides = [
        str(p.relative_to(ROOT))
        for p in _modules()
        if re.search(r"def _poll_til_success|def _[a-z_]+\(self, context", p.read_text())
    ]
    assert overrides == ["pipeline/dagster_private.py"]


IMPORTING_ASSETS = """
import json, os, sys
from collections.abc import MutableMapping

class Recording(MutableMapping):
    def __init__(self, env):
        self.env, self.read = dict(env), set()
    def _note(self, key):
        caller = sys._getframe(2).f_code.co_filename
        if "/pipeline/" in caller and "/pipeline_tests/" not in caller:
            self.read.add(key)
    def __getitem__(self, key):
        self._note(key)
        return self.env[key]
    def get(self, key, default=None):
        self._note(key)
        return self.env.get(key, default)
    def __contains__(self, key):
        self._note(key)
        return key in self.env
    def __setitem__(self, key, value):
        self.env[key] = value
    def __delitem__(self, key):
        del self.env[key]
    def __iter__(self):
        return iter(self.env)
    def __len__(self):
        return len(self.env)

os.environ = Recording(os.environ)
import pipeline.assets.credibility, pipeline.assets.fx_anomaly, pipeline.assets.ingest
import pipeline.assets.loan_loss
import pipeline.checks.contracts, pipeline.checks.credibility, pipeline.checks.fx_anomaly
import pipeline.checks.loan_loss
import dagster
sensors = [n for n, m in sys.modules.items() if n.startswith("pipeline.automation")]
print(json.dumps({"read": sorted(os.environ.read), "automation": sensors}))
"""


def test_importing_assets_builds_no_sensor_and_reads_only_the_time_axis_setting() -> None:
    """Asset and check modules read no environment, except where the partitions start.

    Partitions are part of a code location's definitions, so their start date is read
    when :mod:`pipeline.partitions` is imported: ``PIPELINE_PARTITIONS_START``, or the
    start recorded in ``PIPELINE_HOME`` by the demo.
    """
    result = subprocess.run(
        [sys.executable, "-c", IMPORTING_ASSETS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["automation"] == []
    assert set(seen["read"]) <= {"PIPELINE_PARTITIONS_START", "PIPELINE_HOME"}, seen["read"]


HEAVY_AT_RUN_TIME = (
    "presidio_analyzer",
    "spacy",
    "pymc",
    "pytensor",
    "mlflow",
    "pyspark",
    "sklearn",
)


def test_loading_the_code_location_imports_no_model_library() -> None:
    """The code server, the daemon and every sensor tick load the definitions: the model
    libraries (Presidio with spaCy alone cost ~4 s) load only in the runs that use them."""
    script = (
        "import json, sys; import pipeline.definitions; "
        f"print(json.dumps([m for m in {HEAVY_AT_RUN_TIME!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


# Declared dependencies that are used without being imported by ``pipeline``.
USED_WITHOUT_IMPORT = {
    "dagster-webserver": "serves the UI of `make dev` (`dagster dev`)",
    "dagster-graphql": "the webserver's GraphQL API, driven by the end-to-end tests",
    "nutpie": "NUTS sampler PyMC calls for sampler='nutpie'",
    "pip": "MLflow records its version in each logged model's environment",
}
IMPORT_NAMES = {"scikit-learn": "sklearn", "pyarrow": "pyarrow", "pyyaml": "yaml"}


@pytest.mark.parametrize(
    "requirement",
    tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"],
)
def test_every_declared_dependency_is_used(requirement: str) -> None:
    name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]
    if name in USED_WITHOUT_IMPORT:
        return
    module = IMPORT_NAMES.get(name, name.replace("-", "_"))
    users = [p for p in _modules() if any(m.split(".")[0] == module for m in _imports(p))]
    assert users, f"{name} is declared in pyproject.toml but no module of pipeline imports {module}"
