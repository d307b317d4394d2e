"""What tests/conftest.py does for every test: hypothesis derandomised under CI, torch's thread count and
default dtype restored after each test, and under CI a skip that does not need CUDA fails the session."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch

from ci_skips import in_ci
from conftest import torch_settings_restored

TESTS = Path(__file__).resolve().parent


def hypothesis_tests() -> list:
    """Every @given test of the suite, imported from the modules that use hypothesis."""
    found = []
    for path in sorted(TESTS.glob("test_*.py")):
        if "@given" in path.read_text() and path != Path(__file__).resolve():
            module = importlib.import_module(path.stem)
            found += [test for _, test in inspect.getmembers(module, inspect.isfunction)
                      if getattr(test, "is_hypothesis_test", False)]
    return found


def test_hypothesis_is_derandomised_under_ci():
    """The tests' own @settings inherit the profile conftest loads before they are imported."""
    tests = hypothesis_tests()
    assert len(tests) == sum(path.read_text().count("@given") for path in TESTS.glob("test_*.py")
                             if path != Path(__file__).resolve())
    assert {test._hypothesis_internal_use_settings.derandomize for test in tests} == {in_ci()}


def test_torch_settings_are_restored_after_each_test(request):
    assert "restore_torch_settings" in request.fixturenames  # autouse: around every test
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    with pytest.raises(RuntimeError), torch_settings_restored():
        torch.set_num_threads(threads + 1)
        torch.set_default_dtype(torch.float64)
        raise RuntimeError("a failing test")
    assert (torch.get_num_threads(), torch.get_default_dtype()) == (threads, dtype)


INNER_TESTS = {
    "test_skips.py": '''
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_needs_cuda():
    pass

def test_needs_a_package():
    pytest.skip("DeepSpeed is not installed")
''',
    "test_collection_skip.py": '''
import pytest
pytest.importorskip("a_package_that_is_not_installed")

def test_never_collected():
    pass
''',
}


@pytest.mark.parametrize("ci", ["true", None], ids=["ci", "local"])
def test_ci_fails_on_a_skip_that_does_not_need_cuda(pytester, monkeypatch, ci):
    """Under CI=true: the package skip (in a test, and a module-level importorskip at collection) fail the
    session, named with their reasons; the CUDA skip does not. Without CI, skips are skips."""
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(**{name.removesuffix(".py"): source for name, source in INNER_TESTS.items()})
    result = pytester.runpytest("-p", "ci_skips")
    result.assert_outcomes(passed=1, skipped=3)
    if not ci:
        assert result.ret == pytest.ExitCode.OK
        return
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*skips CI does not allow*",
        "test_collection_skip.py: could not import 'a_package_that_is_not_installed'*",
        "test_skips.py::test_needs_a_package: DeepSpeed is not installed",
    ])
    assert "test_needs_cuda" not in result.stdout.str()
