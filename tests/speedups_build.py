"""Make ``ddb_cdc_speedups`` (the experimental C extensions of ``speedups/``, issue 16) importable
for the tests that check it: the installed distribution when it has every extension module a test
needs, else a build of ``speedups/`` made here with the machine's C compiler (``setup.py
build_ext`` into a temporary directory, a few seconds, once per process). Skips the calling test
module where there is no C compiler.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "speedups"
_built: Path | None = None


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # the package itself is missing
        return False


def build_speedups(*modules: str) -> None:
    """Make ``ddb_cdc_speedups`` and its extension modules ``modules`` (e.g. ``"_decode"``)
    importable: as installed if it has them all, else built here from ``speedups/`` (then that
    build is imported, also in place of an installed copy that lacks one of them)."""
    global _built
    wanted = [f"ddb_cdc_speedups.{name}" for name in modules]
    if all(_has(name) for name in ["ddb_cdc_speedups", *wanted]):
        return
    if _built is None:
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            pytest.skip("no C compiler to build speedups/ (the experimental C extensions)", allow_module_level=True)
        build = Path(tempfile.mkdtemp(prefix="ddb-cdc-speedups-"))
        done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(build),
                               "--build-temp", str(build / "tmp")], cwd=SOURCE, capture_output=True, text=True)
        assert done.returncode == 0, f"building speedups/ failed:\n{done.stdout}\n{done.stderr}"
        for py in (SOURCE / "src" / "ddb_cdc_speedups").glob("*.py"):
            shutil.copy(py, build / "ddb_cdc_speedups" / py.name)
        _built = build
    sys.path.insert(0, str(_built))
    for name in [m for m in sys.modules if m == "ddb_cdc_speedups" or m.startswith("ddb_cdc_speedups.")]:
        del sys.modules[name]  # an installed copy without every module: import the build instead
    importlib.invalidate_caches()
    missing = [name for name in wanted if not _has(name)]
    assert not missing, f"the build of speedups/ in {_built} lacks {missing}"
