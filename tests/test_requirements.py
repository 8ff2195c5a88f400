"""traineval refuses a torch older than 2.10 when imported, in a sentence."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from traineval.system.requirements import check_torch, torch_release


@pytest.mark.parametrize(
    ("version", "release"),
    [("2.13.0+cpu", (2, 13)), ("2.10.0a0+git1234", (2, 10)), ("2.9.1", (2, 9)), ("3.0", (3, 0))],
)
def test_torch_release(version, release):
    assert torch_release(version) == release


@pytest.mark.parametrize("version", ["2.9.1", "2.5.0+cu121", "1.13.1"])
def test_an_old_torch_is_refused(version):
    with pytest.raises(ImportError, match=rf"needs torch>=2\.10, found torch {re.escape(version)}"):
        check_torch(version)


@pytest.mark.parametrize("version", ["2.10.0", "2.13.0+cpu", "3.1.0"])
def test_a_current_torch_passes(version):
    check_torch(version)


OLD_METADATA = (
    "from importlib import metadata\n"
    "real = metadata.version\n"
    "metadata.version = lambda name: {torch} if name == 'torch' else real(name)\n"
)
NO_METADATA = (
    "from importlib import metadata\n"
    "def version(name):\n"
    "    raise metadata.PackageNotFoundError(name)\n"
    "metadata.version = version\n"
    "import torch; torch.__version__ = '2.4.1'\n"
)


@pytest.mark.parametrize(
    "setup", [OLD_METADATA.format(torch="'2.4.1'"), NO_METADATA], ids=["metadata", "module"]
)
def test_importing_traineval_with_an_old_torch_fails_with_the_sentence(setup):
    """Read from the installed package's metadata (torch itself is not imported for it), or
    from torch where it has no metadata."""
    code = setup + "import traineval"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "traineval needs torch>=2.10, found torch 2.4.1" in done.stderr
