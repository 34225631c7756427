"""What each install extra costs on disk: `pip install fedmq[EXTRA]` into a fresh venv. Prints JSON.

    python bench/install.py                       # base, dp, secagg (the device's choices)
    python bench/install.py --extras dp secagg monitor coordinator

For each extra, a new venv (python -m venv) gets `pip install <this checkout>[EXTRA]` (not
editable, so fedmq itself is counted); the figure is the venv's size on disk (du of every file,
in MB of 10^6 bytes) and the packages pip added. The extra's cost is its venv minus the base
venv (plain `pip install fedmq`). pip's download cache is used: sizes do not depend on it.
Measured on this machine's CPython and platform (x86_64 wheels); a Pi's aarch64 wheels differ
a little (bench/edge.py --pi-root measures the base venv there).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE_EXTRAS = ("dp", "secagg")


def disk_mb(path: Path) -> float:
    """Bytes of every regular file under `path` (not following links), in MB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def packages(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], check=True,
                         capture_output=True, text=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(out)}


def measure(extra: str | None, workdir: Path) -> dict:
    """One fresh venv with fedmq[extra]: its size and the packages in it."""
    venv = workdir / (extra or "base")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    empty = disk_mb(venv)
    before = packages(python)
    target = f"{ROOT}[{extra}]" if extra else str(ROOT)
    t0 = time.perf_counter()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", target],
                   check=True, cwd=workdir)
    seconds = time.perf_counter() - t0
    after = packages(python)
    return {"venv_mb": round(disk_mb(venv), 1), "empty_venv_mb": round(empty, 1),
            "install_s": round(seconds, 1),
            "added": {k: v for k, v in sorted(after.items()) if k not in before}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extras", nargs="*", default=list(DEVICE_EXTRAS), help="extras to measure beside the base install")
    p.add_argument("-o", "--output", help="also write the JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedmq-install-") as tmp:
        base = measure(None, Path(tmp))
        extras = {}
        for extra in args.extras:
            cell = measure(extra, Path(tmp))
            cell["extra_mb"] = round(cell["venv_mb"] - base["venv_mb"], 1)
            cell["extra_packages"] = {k: v for k, v in cell["added"].items() if k not in base["added"]}
            extras[extra] = cell
    doc = {"benchmark": "install", "python": platform.python_version(), "machine": platform.machine(),
           "command": "python bench/install.py" + (f" --extras {' '.join(args.extras)}" if args.extras != list(DEVICE_EXTRAS) else ""),
           "base": base, "extras": extras}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
