"""The house's layers hold: ``pipeline`` and ``model`` import nothing above them, ``train`` and ``evaluation`` sit
side by side and import nothing of each other, ``experiments``, ``slurm`` and ``benchmarks`` sit on top (the
contract is declared in pyproject.toml and checked by import-linter); the test modules stand alone."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_layers_contract_holds():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken" in out.stdout, out.stdout[-2000:]


def test_test_modules_do_not_import_each_other():
    """A test module that imports another runs that module's import-time skips too (a DALI skip used to skip
    every FFCV test): shared helpers live in plain modules (ramp.py, corpus.py)."""
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not offenders, offenders
