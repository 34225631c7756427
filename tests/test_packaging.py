"""Building fedmq as each install path does prints no setuptools warning and ships what the tools need.

scripts/setup makes an editable install; the Dockerfiles, scripts/pi-root and a Pi's `pip install` make a
wheel. Both go through pip's build isolation, so the build gets the setuptools pyproject.toml asks for. The
sources are copied as the Dockerfiles copy them (pyproject.toml, README.md and the top-level packages).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from test_compose import ROOT, setuptools_packages


def sources(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in setuptools_packages():
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def pip(*args: str) -> str:
    """Run pip (this venv's) and return what it printed, both streams; a failure shows it."""
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def backend_warnings(out: str) -> list[str]:
    """pip shows each warning the build backend raised as a BuildBackendWarning line."""
    return [line.strip() for line in out.splitlines() if "BuildBackendWarning" in line or "deprecated" in line]


def test_the_wheel_builds_without_warnings_and_holds_the_web_view_and_the_license(tmp_path):
    out = pip("wheel", "--no-deps", "-w", str(tmp_path / "wheels"), str(sources(tmp_path)))
    assert backend_warnings(out) == [], out
    (wheel,) = (tmp_path / "wheels").glob("fedmq-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    web = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "monitor/web").rglob("*") if p.is_file())
    assert web and set(web) <= names, sorted(set(web) - names)


def test_the_editable_install_of_scripts_setup_prints_no_warning(tmp_path):
    src = sources(tmp_path)
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    out = pip("--python", str(env / "bin/python"), "install", "--no-deps", "-e", str(src))
    assert backend_warnings(out) == [], out
    found = subprocess.run([str(env / "bin/python"), "-c", "import importlib.util as u; print(u.find_spec('monitor').origin)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert found.stdout.strip() == str(src / "monitor/__init__.py"), found.stdout + found.stderr
