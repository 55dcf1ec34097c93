"""Packaging: `adapters/` ships as `flatscan.adapters`, in the wheel as in the editable install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_maps_adapters_under_flatscan(tmp_path: Path) -> None:
    # Build from a copy: setuptools writes build/ next to the sources.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("flatscan", "adapters"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path), str(source)], check=True)
    (wheel,) = tmp_path.glob("flatscan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "flatscan/adapters/__init__.py" in names and "flatscan/adapters/resnet.py" in names
    assert "flatscan/flatness.py" in names
    assert not [n for n in names if n.startswith("adapters/")], "a top-level adapters package was packaged"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "flatscan = flatscan.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_editable_install_imports_adapters_from_anywhere(tmp_path: Path) -> None:
    # From a neutral directory: flatscan.adapters imports, a top-level `adapters` does not exist.
    code = (
        "import importlib.util, flatscan.adapters, flatscan.adapters.resnet; "
        "assert importlib.util.find_spec('adapters') is None, 'top-level adapters installed'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_a_family_missing_from_the_installed_timm_is_skipped() -> None:
    """An older timm without a family's module still loads every other adapter."""
    code = (
        "import sys, timm\n"
        "sys.modules['timm.models.starnet'] = None  # as if this timm had no StarNet\n"
        "import flatscan\n"
        "from flatscan import adapters\n"
        "families = {a.family for a in flatscan.list_adapters()}\n"
        "assert 'starnet' in adapters.UNAVAILABLE and 'starnet' not in families, families\n"
        "assert flatscan.describe(timm.create_model('test_resnet')).family == 'resnet'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
