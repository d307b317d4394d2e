"""A pytest plugin (tests/conftest.py loads it): under CI a test may skip only because it needs CUDA.

CI runs on CPU machines with every optional package installed (`CI=true bash .ci/run`), so a skip there
is either a GPU test or a check that silently did not run (a missing package, a module-level
`pytest.importorskip`, a collection error turned skip). The second kind fails the session: its tests and
reasons are listed at the end. A skip is allowed when its reason names CUDA or a GPU.
"""
from __future__ import annotations

import os
import re

import pytest

ALLOWED_REASON = re.compile(r"\b(CUDA|GPU)\b")


def in_ci() -> bool:
    """CI sets CI=true (so does GitHub Actions); unset, empty, 0 or false mean a local run."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The reason of a skip report: its longrepr is (path, line, "Skipped: reason")."""
    message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return message.removeprefix("Skipped: ")


class DisallowedSkips:
    """Collects the skips (at collection, setup or call) whose reason does not need CUDA, and fails the
    session when there are any."""

    def __init__(self) -> None:
        self.offenders: list[str] = []

    def _check(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = skip_reason(report)
            if not ALLOWED_REASON.search(reason):
                self.offenders.append(f"{report.nodeid}: {reason}")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._check(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._check(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.offenders and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.offenders:
            terminalreporter.section("skips CI does not allow (only tests that need CUDA may skip)", red=True)
            for line in self.offenders:
                terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    if in_ci():
        config.pluginmanager.register(DisallowedSkips(), "disallowed-skips")
