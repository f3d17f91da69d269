"""The repository's structural rules (docs/architecture.md), enforced by the README's test command.

- The import contracts in pyproject.toml ([tool.importlinter]) hold: entry points on top, the
  engine above models/loading/quant/kernels, config and errors import nothing of ours, the
  layers in order, and no import cycle between sibling modules or packages. import-linter
  (the `test` extra) judges them, exactly as `lint-imports` in .ci/run does.
- No source or documentation file is longer than 650 lines.
- No file points outside the repository (a sibling checkout or a machine path).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 650
# Files held to the line limit: code, documentation and configuration (not test data).
SOURCE_SUFFIXES = {".py", ".md", ".cc", ".h", ".c", ".toml", ".yml", ".yaml", ".sh", ".cfg", ".ini", ".jinja"}
SOURCE_NAMES = {"Dockerfile", "Dockerfile.cuda", "run"}
# Spelled in pieces so this file does not match itself.
OUTSIDE_PATHS = ("../" + "shared", "/" + "work" + "/")
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist", "results", "_artifacts", ".cache"}


def _repo_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore; a plain walk without git."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode()
        paths = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        paths = []
        for directory, subdirs, files in os.walk(ROOT):
            subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            paths.extend(Path(directory) / name for name in files)
    return [path for path in paths if path.is_file()]


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary


def _lint_imports_command() -> list[str]:
    script = Path(sys.executable).with_name("lint-imports")
    if script.is_file():
        return [str(script)]
    found = shutil.which("lint-imports")
    assert found, ("lint-imports is not installed: `pip install -e '.[test]'` brings import-linter, "
                   "which checks the import contracts in pyproject.toml")
    return [found]


def test_import_contracts_hold():
    result = subprocess.run([*_lint_imports_command(), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    report = result.stdout[result.stdout.find("Contracts"):] if "Contracts" in result.stdout else result.stdout
    assert result.returncode == 0, f"import contracts broken (pyproject.toml [tool.importlinter]):\n{report}{result.stderr}"
    assert "0 broken" in result.stdout, report


def test_no_source_file_is_over_650_lines():
    too_long = {}
    for path in _repo_files():
        relative = path.relative_to(ROOT)
        if relative.parts[0] == "tests" and "data" in relative.parts:
            continue
        if path.suffix not in SOURCE_SUFFIXES and path.name not in SOURCE_NAMES:
            continue
        text = _text(path)
        if text is not None and text.count("\n") > MAX_LINES:
            too_long[str(relative)] = text.count("\n")
    assert not too_long, f"files over {MAX_LINES} lines (split them): {too_long}"


def test_nothing_points_outside_the_repository():
    found = []
    for path in _repo_files():
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(marker in line for marker in OUTSIDE_PATHS):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "these lines point outside the repository (link docs/architecture.md instead):\n" + "\n".join(found)
