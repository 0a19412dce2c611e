"""The CI skip guard of tests/conftest.py, run on throwaway test files in a child pytest (pytester)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CONFTEST = (HERE / "conftest.py").read_text().replace('pytest_plugins = ["pytester"]', "")


def _run(pytester, monkeypatch, ci: bool, files: dict[str, str], extra_optional: str = ""):
    pytester.makeconftest(CONFTEST + extra_optional)
    for name, body in files.items():
        pytester.makepyfile(**{name: body})
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")


MODULE_SKIP = {"test_mod": "import pytest\nnope = pytest.importorskip('no_such_module_xyz')\n\ndef test_a():\n    pass\n",
               "test_ok": "def test_b():\n    pass\n"}


def test_module_level_skip_fails_in_ci(pytester, monkeypatch):
    r = _run(pytester, monkeypatch, True, MODULE_SKIP)
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    out = r.stdout.str()
    assert "CI: 1 required test(s) or module(s) were skipped" in out and "test_mod.py" in out
    assert "no_such_module_xyz" in out


def test_module_level_skip_is_allowed_outside_ci(pytester, monkeypatch):
    r = _run(pytester, monkeypatch, False, MODULE_SKIP)
    assert r.ret == pytest.ExitCode.OK
    r.assert_outcomes(passed=1, skipped=1)


def test_skipped_test_and_parametrization_fail_in_ci(pytester, monkeypatch):
    body = ("import pytest\n\ndef test_s():\n    pytest.skip('tool missing')\n\n"
            "@pytest.mark.parametrize('x', [1, 2])\ndef test_p(x):\n    if x == 2:\n        pytest.skip('no')\n")
    r = _run(pytester, monkeypatch, True, {"test_t": body})
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    assert "CI: 2 required test(s)" in r.stdout.str()


def test_allow_listed_test_may_skip_in_ci(pytester, monkeypatch):
    body = ("import pytest\n\n@pytest.mark.parametrize('x', [1, 2])\ndef test_opt(x):\n    pytest.skip('extra')\n\n"
            "def test_req():\n    pass\n")
    r = _run(pytester, monkeypatch, True, {"test_o": body},
             extra_optional='\nOPTIONAL["test_o.py::test_opt"] = "an optional extra"\n')
    assert r.ret == pytest.ExitCode.OK, r.stdout.str()
    r.assert_outcomes(passed=1, skipped=2)


def test_allow_list_names_real_tests_with_reasons():
    from tests.conftest import OPTIONAL

    for nodeid, why in OPTIONAL.items():
        path, name = nodeid.split("::", 1)
        src = (HERE.parent / path).read_text()
        assert re.search(rf"^def {re.escape(name)}\(", src, re.M), f"{nodeid}: no such test (stale allow-list)"
        assert len(why) > 10, f"{nodeid}: say why it may skip"
