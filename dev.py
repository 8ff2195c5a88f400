#!/usr/bin/env python3
"""Set up the development environment and run the project's jobs.

Needs nothing but Python >= 3.10 and pip. Each command first makes sure `.venv/` exists and
holds the package with its dev extras, pinned by `constraints.txt` (torch==2.13.0, so a CPU
machine never pulls a multi-GB CUDA build); it reinstalls only when `pyproject.toml` or
`constraints.txt` changed.

    python3 dev.py demo [key=value ...]   train + evaluate on scikit-learn's digits
    python3 dev.py test [--slow] [pytest args]   ruff, mypy and the test suite
    python3 dev.py setup                  only the environment
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".traineval-install"


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    code = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if code:
        sys.exit(code)


def setup() -> None:
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    fingerprint = _fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    _run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    _run(PY, "-m", "pip", "install", "--quiet", "-c", "constraints.txt", "-e", ".[dev]")
    STAMP.write_text(fingerprint)


def demo(args: list[str]) -> None:
    setup()
    _run(BIN / "traineval", "demo", *args)


def test(args: list[str]) -> None:
    setup()
    _run(PY, "-m", "ruff", "check", "src", "tests", "benchmarks", "examples", "dev.py")
    _run(PY, "-m", "ruff", "format", "--check", "src", "tests", "benchmarks", "examples", "dev.py")
    _run(PY, "-m", "mypy")
    if "--slow" in args:
        args = [a for a in args if a != "--slow"] + ["-m", "slow or not slow"]
    _run(PY, "-m", "pytest", *args)


def main() -> None:
    command, *rest = sys.argv[1:] or ["--help"]
    if command == "setup":
        setup()
    elif command == "demo":
        demo(rest)
    elif command == "test":
        test(rest)
    else:
        print(__doc__)
        sys.exit(0 if command in ("-h", "--help") else 2)


if __name__ == "__main__":
    main()
