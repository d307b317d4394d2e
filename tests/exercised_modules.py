"""A pytest plugin (tests/conftest.py loads it): `--check-exercised` fails the session unless every module of
the package ran at least one of its functions in this pytest process.

    python -m pytest -m "not slow" -n 0 --check-exercised tests

checks that the fast tier still exercises every module of megatron_eslm/ (and its kernels) that defines a
function: importing it is not enough, one of its functions or methods must be called. Calls made in other processes (the
rank pool, launched commands) are not seen, so a module the fast tier reaches only there is reported.
"""
from __future__ import annotations

import ast
import sys
import threading
from pathlib import Path

import pytest

import megatron_eslm

PACKAGE = Path(megatron_eslm.__file__).resolve().parent


def _defines_functions(path: Path) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(ast.parse(path.read_text())))


def package_modules() -> dict[str, str]:
    """File path -> module name of every module of the installed package that defines a function (a package's
    `__init__` of imports and a docstring has nothing to run), the kernels included."""
    from megatron_eslm import kernels
    roots = [(PACKAGE, "megatron_eslm"), (Path(kernels.__path__[0]).resolve(), "megatron_eslm.kernels")]
    modules = {}
    for root, prefix in roots:
        for path in sorted(root.rglob("*.py")):
            if not _defines_functions(path):
                continue
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((prefix, *parts)).removesuffix(".__init__")
            modules.setdefault(str(path), name)
    return modules


class ExercisedModules:
    """Records the source files of the functions called (a profile hook on every thread), then reports the
    package's modules none of whose functions ran."""

    def __init__(self) -> None:
        self.codes: set = set()

    def _profile(self, frame, event, arg):
        if event == "call":
            self.codes.add(frame.f_code)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)

    def missing(self) -> list[str]:
        called = {str(Path(code.co_filename).resolve()) for code in self.codes if code.co_name != "<module>"}
        return sorted(name for path, name in package_modules().items() if path not in called)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        sys.setprofile(None)
        threading.setprofile(None)
        self.not_exercised = self.missing()
        if self.not_exercised and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.not_exercised:
            terminalreporter.section("modules none of whose functions ran (--check-exercised)", red=True)
            for name in self.not_exercised:
                terminalreporter.write_line(name)
        else:
            terminalreporter.write_line(f"--check-exercised: every one of the package's "
                                        f"{len(package_modules())} modules ran a function")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--check-exercised", action="store_true",
                     help="fail unless every module of megatron_eslm ran one of its functions in this process")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--check-exercised"):
        if getattr(config.option, "numprocesses", None):  # the tests would run in xdist's workers, unseen
            raise pytest.UsageError("--check-exercised sees this process only: add -n 0")
        config.pluginmanager.register(ExercisedModules(), "exercised_modules_check")
