"""With CI=true (any of true/1/yes), a skipped test fails the run unless its reason is on the allow-list:
a missing tool must not turn ~100 tests into a green run. Locally, skips stay skips.

The allow-list holds what depends on the host or on credentials a CI job does not have, by the words their
skip reasons contain (keep them in those reasons):
- "/dev/kvm": KVM-only paths (the TCG fallback is tested everywhere);
- "PowerShell parser": the syntax check of generated scripts needs `pwsh`;
- "GOLDSMITH_SMOKE_AZURE_CONN": the opt-in smoke test against a real subscription.
"""

from __future__ import annotations

import os

import pytest

ALLOWED = ("/dev/kvm", "PowerShell parser", "GOLDSMITH_SMOKE_AZURE_CONN")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_unexpected(report) -> None:
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _reason(report)
    if not any(allowed in reason for allowed in ALLOWED):
        report.outcome = "failed"
        report.longrepr = (f"unexpected skip with CI=true: {reason}\n(install what it needs, e.g. `make setup` "
                           f"as root, or add the reason to the allow-list in tests/ci_skips.py: {', '.join(ALLOWED)})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unexpected(outcome.get_result())
