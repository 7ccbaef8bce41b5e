"""Installing curate: the distribution's name and extras, torch pinned by a constraints file rather than
capped in pyproject, `curate --version`, clear errors for missing extras, and no network on import."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import curate
from curate.cli import main
from curate.extras import DISTRIBUTION, MissingExtra, require
from tests.readme import readme_section

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
NEWER_TORCH = {"torch": "99.0", "torchvision": "99.0"}


def requirements(lines: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(line) for line in lines]
    return {req.name: req for req in parsed if req.marker is None}


def test_curate_version_through_the_cli():
    run = subprocess.run([sys.executable, "-m", "curate", "--version"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"curate {curate.__version__}"


def test_the_installed_distribution_is_the_source_tree():
    try:
        installed = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DISTRIBUTION} is not installed here (an environment from before the rename)")
    assert installed == curate.__version__


def test_pyproject_takes_any_torch_and_the_constraints_file_pins_the_tested_one():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION and project["scripts"] == {"curate": "curate.cli:main"}
    core = requirements(project["dependencies"])
    for name, newer in NEWER_TORCH.items():
        assert core[name].specifier.contains(newer), f"pyproject caps {name}: {core[name]}"
    pins = requirements([line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")])
    assert (str(pins["torch"].specifier), str(pins["torchvision"].specifier)) == ("==2.14.1", "==0.29.1")
    makefile = (REPO / "Makefile").read_text()
    assert "CONSTRAINTS := requirements/constraints.txt" in makefile
    assert "$(STAMP): pyproject.toml $(CONSTRAINTS)" in makefile
    assert "pip install -q -c $(CONSTRAINTS) -e '.[dev]'" in makefile


def test_optional_dependencies_are_extras_and_dev_has_them_all():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core, extras = requirements(project["dependencies"]), project["optional-dependencies"]
    assert {"dask", "distributed", "matplotlib", "pytest"}.isdisjoint(core)
    assert "faiss-cpu" in core  # dedup's k-means is a default path
    [dask] = map(Requirement, extras["dask"])
    assert dask.name == "dask" and dask.extras == {"distributed"}
    assert [Requirement(r).name for r in extras["report"]] == ["matplotlib"]
    assert [Requirement(r).name for r in extras["s3"]] == ["s3fs"]
    assert f"{DISTRIBUTION}[dask,report,s3]" in extras["dev"]
    assert "moto" in {Requirement(r).name for r in extras["dev"]}  # the S3 API server of the storage tests


def test_the_make_targets_the_readme_names_exist_and_make_their_own_environment(tmp_path: Path):
    """`make -n` (commands printed, none run): every target "Start here" names, the virtual environment a fresh
    clone's `make test` creates with the constraints file, and the pytest workers TEST_WORKERS sets."""
    start_here = readme_section("Start here")
    targets = set(re.findall(r"(?:^ +|`)make ([a-z-]+)", start_here, re.M))
    assert {"demo", "test", "compare", "install", "dask-demo", "bench", "bench-scale", "lint", "clean"} <= targets

    def dry_run(*args: str) -> str:
        outer = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")  # under `make test` a sub-make would print its directory
        env = {k: v for k, v in os.environ.items() if k not in outer}
        command = ["make", "-n", "--no-print-directory", *args]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
        assert run.returncode == 0, (args, run.stderr)
        return run.stdout

    for target in sorted(targets):
        dry_run(target)
    fresh = dry_run("test", f"VENV={tmp_path / 'venv'}")
    assert f"-m venv {tmp_path / 'venv'}" in fresh and "-c requirements/constraints.txt -e '.[dev]'" in fresh
    assert fresh.rstrip().splitlines()[-1].endswith("-n 2 --dist loadfile")
    assert dry_run("test", "TEST_WORKERS=3").rstrip().endswith("-n 3 --dist loadfile")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"


def test_pip_reads_the_project_metadata_offline(tmp_path: Path):
    """What pip resolves from the source tree (built offline, not installed): the name, the extras, torch
    uncapped, so `pip install -e '.[dev]'` takes a newer torch when no constraints file is given."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
               "--ignore-installed", "--quiet", "--report", str(report), str(REPO)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    [item] = json.loads(report.read_text())["install"]
    metadata = item["metadata"]
    assert (metadata["name"], metadata["version"]) == (DISTRIBUTION, curate.__version__)
    assert {"dask", "report", "s3", "dev"} <= set(metadata["provides_extra"])
    core = requirements(metadata["requires_dist"])
    assert all(core[name].specifier.contains(newer) for name, newer in NEWER_TORCH.items())


@pytest.mark.parametrize(("module", "extra"), [("distributed", "dask"), ("matplotlib", "report")])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch, module: str, extra: str):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    with pytest.raises(MissingExtra) as missing:
        require(module, extra, "this feature")
    assert str(missing.value) == f"this feature needs {module}: pip install '{DISTRIBUTION}[{extra}]'"


def test_dask_executor_without_the_extra_fails_before_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setitem(sys.modules, "distributed", None)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"output: {tmp_path / 'run'}\ninput:\n  path: {tmp_path / 'crawl.csv'}\n")
    assert main(["run", str(pipeline), "--executor", "dask", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error == f"curate: error: the dask executor needs distributed: pip install '{DISTRIBUTION}[dask]'\n"
    assert not (tmp_path / "run").exists()


def test_the_report_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    from curate.report import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r"the report needs matplotlib: pip install 'curate-pipeline\[report\]'"):
        plots.funnel_chart([])


NETWORK_PROBE = """
import os, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[:1])
    raise OSError("no network in this test")
socket.create_connection = refuse
socket.socket.connect = refuse
if sys.argv[1] == "curate":
    import curate
import albumentations
print(len(attempts), os.environ.get("NO_ALBUMENTATIONS_UPDATE"))
"""


def probe_albumentations_import(first: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", NETWORK_PROBE, first], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    attempts, value = run.stdout.split()
    return int(attempts), value


def test_importing_curate_then_albumentations_reaches_for_no_network():
    assert probe_albumentations_import("curate") == (0, "1")
    attempts, _ = probe_albumentations_import("nothing")  # the probe sees albumentations' update check
    assert attempts > 0
