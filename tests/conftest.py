"""In CI every dependency is installed, so a test module skipped for a missing import is a
broken install or a stale test (one once skipped every server test for a renamed extra): fail it."""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and "could not import" in str(report.longrepr):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid}: skipped for a missing import in CI ({reason}); "
                           "install the extras .ci/run installs, or fix the import")
