"""How the suite treats a test that cannot run: a pytest plugin, loaded by conftest.py.

A missing reference (transformers, torch, PEFT, sentencepiece, llama-cpp-python, the
default model wheel, the Gemma wheels, llama.cpp's sdist) must never make a run green
without the evidence it was meant to give. So:

- In CI (the environment variable ``CI`` set to anything but ``0``/``false``/``no``), every
  skip is a failure, unless the test declared it cannot apply on this machine with
  ``peers.not_applicable(...)`` (a GPU-only check on a CPU runner, say). A test file that
  skips at import time fails the same way.
- Outside CI a skip stays a skip and the run lists why (``-rs`` is always on).
- Everywhere, a test that dies on ``import torch`` (or another peer) is reported like a
  ``peers.require_peer`` call would: a skip naming the install command outside CI, a
  failure in CI. Fixtures that import a peer directly and those that call
  ``require_peer`` therefore behave the same way.
"""
from __future__ import annotations

import os
import re

import pytest

from peers import INSTALL_HINT, PEER_PACKAGES, NotApplicable

CI_ENV = "CI"
_FALSE = ("", "0", "false", "no", "off")
# How a test module's failed import reads in pytest's collection error.
_MODULE_NOT_FOUND = re.compile(r"ModuleNotFoundError: (No module named '([\w.]+)'|import of ([\w.]+) halted.*)")


def ci_mode() -> bool:
    return os.environ.get(CI_ENV, "").strip().lower() not in _FALSE


def _missing_peer(excinfo) -> str | None:
    """The peer package a ModuleNotFoundError is about, if it is one."""
    if excinfo is None or not excinfo.errisinstance(ModuleNotFoundError):
        return None
    name = (excinfo.value.name or "").split(".")[0]
    return PEER_PACKAGES.get(name)


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _ci_failure(what: str, reason: str) -> str:
    return (f"{what} skipped in CI: {reason}\n"
            f"CI runs every reference test; install what is missing ({INSTALL_HINT}, "
            "the default model: python -m mistralrs_jax.loading.default_model) or run outside CI (unset CI) "
            "to skip it.")


def _report_missing_peer(report, what: str, package: str, detail: str, location) -> None:
    """A failed import of a peer: a failure saying so in CI, else a skip naming the install command."""
    message = f"peer package {package!r} is not importable ({detail}); install the peers with {INSTALL_HINT}"
    if ci_mode():
        report.longrepr = _ci_failure(what, message)
    else:
        report.outcome = "skipped"
        report.longrepr = (*location, f"Skipped: {message}")


def _apply(report, excinfo, what: str, location) -> None:
    if getattr(report, "wasxfail", None) is not None:
        return
    if report.skipped and ci_mode():
        if excinfo is not None and excinfo.errisinstance(NotApplicable):
            return
        report.outcome = "failed"
        report.longrepr = _ci_failure(what, _skip_reason(report.longrepr))
        return
    package = _missing_peer(excinfo)
    if report.failed and package is not None:
        _report_missing_peer(report, what, package, str(excinfo.value), location)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _, lineno, _ = item.location
    _apply(report, call.excinfo, item.nodeid, (str(item.path), (lineno or 0) + 1))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """The same rules for a test file that skips or fails while it is imported."""
    report = yield
    what = str(collector.path)
    if report.skipped and ci_mode():
        report.outcome = "failed"
        report.longrepr = _ci_failure(what, _skip_reason(report.longrepr))
    elif report.failed:
        crash = _MODULE_NOT_FOUND.search(str(report.longrepr))
        package = PEER_PACKAGES.get((crash.group(2) or crash.group(3)).split(".")[0]) if crash else None
        if package is not None:
            _report_missing_peer(report, what, package, crash.group(1), (what, 0))
    return report


def pytest_configure(config):
    reportchars = config.option.reportchars or ""
    if "s" not in reportchars and "a" not in reportchars and "A" not in reportchars:
        config.option.reportchars = reportchars + "s"


def pytest_report_header(config):
    if ci_mode():
        return "CI mode: a skipped reference test fails the run (tests/skip_policy.py)"
    return None
