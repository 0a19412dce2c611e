"""Shared pytest setup.

In CI (CI=true) nothing an issue requires may be skipped: a skip of any test not marked
`optional_env` (GPU-only rows, an optional peer like llama.cpp) fails the session.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "optional_env: may skip in CI (needs a GPU or an optional extra)")


_bad_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        if "optional_env" not in report.keywords:
            _bad_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _bad_skips:
        session.config._bad_skips = list(_bad_skips)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    bad = getattr(terminalreporter.config, "_bad_skips", None)
    if bad:
        terminalreporter.write_line(f"CI: {len(bad)} required test(s) were skipped (a skip is a failure in CI):", red=True)
        for n in bad:
            terminalreporter.write_line(f"  {n}", red=True)
