"""Shared pytest setup.

In CI (CI=true) nothing an issue requires may be skipped: a skipped test, a skipped parametrization and a module
that skips at import (`pytest.importorskip`, `pytest.skip(allow_module_level=True)`) all fail the session, except
the tests listed in OPTIONAL below — the one place that names what may skip, and why.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]  # tests/test_ci_guard.py runs the guard on throwaway test files

# node id (or a prefix of one: "file.py::test_name" covers its parametrizations) -> why it may skip in CI
OPTIONAL: dict[str, str] = {
    "tests/test_gguf.py::test_llama_cpp_parity_f32_and_f16":
        "needs llama-cpp-python (the bench extra: builds llama.cpp from source, ~5 min); make bench-mobile installs it",
    "tests/test_gguf.py::test_llama_cpp_q4_0_matches_our_int4_weights":
        "needs llama-cpp-python (the bench extra); make bench-mobile installs it",
    "tests/test_gguf.py::test_llama_cpp_runs_the_engines_mmoe_file":
        "needs llama-cpp-python (the bench extra); make bench-mobile installs it",
    "tests/test_gguf.py::test_llama_cpp_glm4moe_parity_sigmoid_bias_f32":
        "needs llama-cpp-python (the bench extra); make bench-mobile installs it",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def is_optional(nodeid: str) -> bool:
    base = nodeid.split("[", 1)[0]
    return any(base == k or base.startswith(k + "::") for k in OPTIONAL)


_bad_skips: list[str] = []


def _record(nodeid: str, reason: str) -> None:
    if in_ci() and not is_optional(nodeid):
        _bad_skips.append(f"{nodeid}  ({reason})")


def _reason(report) -> str:
    lr = report.longrepr
    return lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)


def pytest_collectreport(report):
    # a module-level skip never produces a test report: it shows up only here, as a skipped collector
    if report.skipped:
        _record(report.nodeid, _reason(report))


def pytest_runtest_logreport(report):
    if report.skipped:
        _record(report.nodeid, _reason(report))


def pytest_sessionfinish(session, exitstatus):
    if _bad_skips:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    bad = _bad_skips
    if bad:
        terminalreporter.write_line(f"CI: {len(bad)} required test(s) or module(s) were skipped "
                                    "(a skip is a failure in CI; optional ones are listed in tests/conftest.py):",
                                    red=True)
        for n in bad:
            terminalreporter.write_line(f"  {n}", red=True)
