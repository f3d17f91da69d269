"""A green CI run means every reference test ran: the skip policy (tests/skip_policy.py),
proved on generated test files run by a real pytest in a subprocess.

The generated files need a reference that does not exist, import a peer that is "uninstalled"
(blocked in sys.modules, as a missing package is), or declare themselves not applicable.
Runs of the suite's own tests with torch, PEFT or sentencepiece shadowed by a package that fails
to import show the same for existing reference tests (the issue's "a run with one reference package
uninstalled fails in CI mode").
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent

GENERATED = textwrap.dedent("""
    import sys

    import pytest

    from peers import not_applicable, require_peer


    @pytest.fixture
    def uninstalled_sentencepiece():
        sys.modules["sentencepiece"] = None  # what `pip uninstall sentencepiece` leaves for an import
        import sentencepiece  # noqa: F401


    def test_needs_a_peer_nobody_installed():
        require_peer("no_such_reference_package_for_the_skip_policy")


    def test_imports_an_uninstalled_peer_in_a_fixture(uninstalled_sentencepiece):
        pass


    def test_skips_with_plain_pytest_skip():
        pytest.skip("a reference file could not be fetched")


    def test_runs():
        assert True


    def test_needs_a_gpu():
        not_applicable("needs a CUDA device")
""")


def _run_pytest(directory: Path, target: str, *, ci: bool, pythonpath: list[Path], extra: list[str] = ()):
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci:
        env["CI"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, target]
    return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=600)


def _generated_run(tmp_path: Path, ci: bool):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_generated.py").write_text(GENERATED)
    return _run_pytest(tmp_path, "test_generated.py", ci=ci, pythonpath=[TESTS_DIR],
                       extra=["-p", "skip_policy", "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini")])


def test_ci_turns_every_reference_skip_into_a_failure(tmp_path):
    result = _generated_run(tmp_path, ci=True)
    out = result.stdout + result.stderr
    print(out[-3000:])
    assert result.returncode == 1, out
    # a fixture's failure is an error, a test's a failure: both fail the run
    assert "2 failed, 1 passed, 1 skipped, 1 error" in out
    for name in ("needs_a_peer_nobody_installed", "skips_with_plain_pytest_skip"):
        assert f"FAILED test_generated.py::test_{name}" in out
    assert "ERROR test_generated.py::test_imports_an_uninstalled_peer_in_a_fixture" in out
    assert "skipped in CI" in out and "no_such_reference_package_for_the_skip_policy" in out
    assert "'sentencepiece' is not importable" in out
    assert "needs a CUDA device" in out  # the accepted skip is still listed with its reason


def test_outside_ci_a_missing_peer_is_a_skip_that_says_why(tmp_path):
    result = _generated_run(tmp_path, ci=False)
    out = result.stdout + result.stderr
    print(out[-3000:])
    assert result.returncode == 0, out
    assert "1 passed, 4 skipped" in out
    assert "no_such_reference_package_for_the_skip_policy" in out and "pip install -e '.[peers]'" in out
    # the fixture that imported sentencepiece directly skips like require_peer does, not an error
    assert "peer package 'sentencepiece' is not importable" in out
    assert "a reference file could not be fetched" in out


# (uninstalled peer, one real test of the suite that needs it): the fixture-level require_peer
# path (LoRA vs PEFT, the family checkpoints built with sentencepiece) and a test that imports
# its peer directly (torch in the sampler comparison)
REAL_TESTS = [
    ("torch", "tests/test_sampler_reference.py::test_repetition_penalty_matches_transformers"),
    ("peft", "tests/test_lora.py::test_rslora_matches_peft"),
    ("sentencepiece", "tests/test_families.py::test_family_matches_transformers[llama3-safetensors]"),
]


@pytest.mark.parametrize("package,target", REAL_TESTS, ids=[package for package, _ in REAL_TESTS])
def test_a_real_reference_test_fails_in_ci_without_its_peer(package, target, tmp_path):
    """The suite's own reference tests with one peer made uninstalled (a package of that name that
    raises ModuleNotFoundError shadows the real one): CI fails, a local run skips and says why."""
    shadow = tmp_path / "shadow" / package
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{package}'\", name='{package}')\n")
    repo = TESTS_DIR.parent
    ci = _run_pytest(repo, target, ci=True, pythonpath=[shadow.parent, repo])
    print(ci.stdout[-2000:])
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "skipped in CI" in ci.stdout and f"'{package}' is not importable" in ci.stdout, ci.stdout + ci.stderr
    assert " passed" not in ci.stdout.splitlines()[-1], ci.stdout
    local = _run_pytest(repo, target, ci=False, pythonpath=[shadow.parent, repo])
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout + local.stderr
    assert f"'{package}' is not importable" in local.stdout
