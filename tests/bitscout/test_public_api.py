"""What ``bitscout`` promises as a package: its public names, that importing it pulls nothing heavy
or internal, that installing it pulls only its small dependencies, and that it type-checks strictly."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import bitscout

ROOT = Path(__file__).resolve().parents[2]

PUBLIC = [
    "DEFAULT_URL", "AsyncClient", "AsyncJob", "BitscoutError", "BudgetSpec", "Client", "Conflict",
    "DataSource", "Device", "ErrorCode", "Forbidden", "Front", "InternalError", "InvalidRequest", "Job",
    "JobEventRead", "JobFailed", "JobRead", "JobSpec", "JobStatus", "Method", "Metric", "ModelSource",
    "NotFound", "ParetoPointRead", "PayloadTooLarge", "Point", "PointProvenance", "RateLimited", "ResolveRead", "RetryPolicy",
    "SearchSpaceSpec", "ServiceUnavailable", "Task", "Unauthorized", "UploadRead", "__version__", "apply",
    "default_config_path",
]  # fmt: skip


def test_exported_members() -> None:
    """The public names are exactly these (like httpx's tests/test_exported_members.py): adding or
    removing one is a deliberate change of this list."""
    assert sorted(bitscout.__all__) == sorted(PUBLIC)
    assert len(set(bitscout.__all__)) == len(bitscout.__all__)
    for name in bitscout.__all__:
        assert hasattr(bitscout, name), name
    exported = {
        n for n, v in vars(bitscout).items() if not n.startswith("_") and not isinstance(v, type(sys))
    }
    assert exported - set(bitscout.__all__) <= {"annotations"}, exported - set(bitscout.__all__)
    assert callable(bitscout.apply) and bitscout.Point is bitscout.ParetoPointRead


def test_errors_are_one_hierarchy() -> None:
    for name in ("NotFound", "InvalidRequest", "Unauthorized", "Forbidden", "Conflict", "PayloadTooLarge",
                 "RateLimited", "ServiceUnavailable", "InternalError", "JobFailed"):  # fmt: skip
        assert issubclass(getattr(bitscout, name), bitscout.BitscoutError)


def test_docstrings_with_examples() -> None:
    for obj in (bitscout, bitscout.Client, bitscout.AsyncClient, bitscout.Job, bitscout.AsyncJob, bitscout.Front,
                bitscout.RetryPolicy, bitscout.apply, bitscout.Client.submit, bitscout.Job.wait, bitscout.Job.resolve,
                bitscout.Job.download, bitscout.Front.best):  # fmt: skip
        assert obj.__doc__ and "Example::" in obj.__doc__, obj
    for cls in (bitscout.Client, bitscout.AsyncClient, bitscout.Job, bitscout.AsyncJob, bitscout.Front):
        for name, member in vars(cls).items():
            if callable(member) and not name.startswith("_"):
                assert member.__doc__, f"{cls.__name__}.{name}"


def test_importing_the_sdk_pulls_nothing_heavy_or_internal() -> None:
    code = (
        "import sys, bitscout, bitscout.cli, bitscout.commands, bitscout._apply\n"
        "heavy = {'torch', 'fastapi', 'sqlalchemy', 'ray', 'transformers', 'starlette', 'uvicorn', 'pandas',"
        " 'matplotlib', 'search', 'service', 'workers', 'numpy'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_the_sdk_installs_only_small_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {
        dep.split(";")[0]
        .split("[")[0]
        .split("=")[0]
        .split(">")[0]
        .split("<")[0]
        .split("~")[0]
        .split("!")[0]
        .strip()
        .lower()
        for dep in project["dependencies"]
    }
    assert names == {"pydantic", "httpx2", "tqdm", "pyyaml"}
    for heavy in ("torch", "fastapi", "sqlalchemy", "ray", "transformers", "uvicorn", "numpy", "starlette"):
        assert heavy not in names
    assert project["scripts"]["bitscout"] == "bitscout.cli:main"


def test_py_typed_marker() -> None:
    assert (ROOT / "bitscout" / "py.typed").is_file()


@pytest.mark.slow
def test_mypy_strict_on_the_sdk() -> None:
    pytest.importorskip("mypy")
    p = subprocess.run(
        [sys.executable, "-m", "mypy", "bitscout"], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert p.returncode == 0, p.stdout + p.stderr
