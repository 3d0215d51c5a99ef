"""Packaging: the explicit package list in pyproject.toml covers shodh/, and the shipped DeepSpeed
configs (top-level ds_configs/) resolve as the package `shodh.ds_configs`. The built wheel itself is
checked by .ci/wheel_smoke."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_shodh_directory_is_a_listed_package():
    listed = set(setuptools_table()["packages"])
    on_disk = {".".join(d.relative_to(REPO).parts) for d in [REPO / "shodh", *(REPO / "shodh").rglob("*")]
               if d.is_dir() and d.name != "__pycache__" and any(f.is_file() for f in d.iterdir())}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == {"shodh.ds_configs"}


def test_package_data_globs_cover_every_data_file():
    data = setuptools_table()["package-data"]
    assert setuptools_table()["package-dir"] == {"shodh.ds_configs": "ds_configs"}
    assert data["shodh.ds_configs"] == ["*.json"] and data["shodh"] == ["profiles/*.yaml"]
    stray = [p.name for p in (REPO / "ds_configs").iterdir() if p.is_file() and p.suffix not in (".json", ".py")]
    stray += [p.name for p in (REPO / "shodh" / "profiles").iterdir() if p.is_file() and p.suffix != ".yaml"]
    assert stray == [], "these files would not be installed"


def test_shipped_ds_configs_resolve_as_package_resources():
    from shodh.train.engine import ds_config_path

    shipped = sorted((REPO / "ds_configs").glob("*.json"))
    assert {p.name for p in shipped} >= {"zero2_cpu_fp32.json", "zero2_gpu_bf16.json"}
    for path in shipped:
        assert resources.files("shodh.ds_configs").joinpath(path.name).read_text() == path.read_text()
        assert ds_config_path(path.name).read_text() == path.read_text()
