"""Run policy as plain functions: what the operators decide from a run's history and task states."""

from __future__ import annotations

import json
from pathlib import Path

from goldsmith import runpolicy
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan

PLATFORM = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12", "version": "latest"}


def plan(tmp_path: Path, error_handling: dict | None = None):
    body = {"location": "westeurope", "properties": {
        "source": PLATFORM, "customize": [{"type": "Shell", "name": "noop", "inline": ["true"]}],
        **({"errorHandling": error_handling} if error_handling else {}),
        "distribute": [{"type": "VHD", "runOutputName": "vhd"}]}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(body))
    return make_plan(load_template(path))


def test_keep_vm_only_on_abort_and_a_failure(tmp_path):
    failed = {"customize.0_noop": "failed", "distribute.vhd": "upstream_failed"}
    assert not runpolicy.keep_vm(plan(tmp_path), {}, failed)  # default: cleanup
    aborting = plan(tmp_path, {"onCustomizerError": "abort"})
    assert runpolicy.keep_vm(aborting, {}, failed)
    assert not runpolicy.keep_vm(aborting, {}, {"customize.0_noop": "success"})
    assert not runpolicy.keep_vm(aborting, {"onCustomizerError": "cleanup"}, failed)  # the run's parameter wins
    assert runpolicy.keep_vm(plan(tmp_path, {"onValidationError": "abort"}), {}, {"validate.0_check": "failed"})


def test_a_run_succeeded_when_every_distribution_did_and_nothing_failed():
    assert runpolicy.succeeded({"distribute.a": "success", "distribute.b": "success", "capture": "success"})
    assert not runpolicy.succeeded({"distribute.a": "success", "validate.0_x": "failed"})
    assert not runpolicy.succeeded({"distribute.a": "success", "distribute.b": "skipped"})
    assert not runpolicy.succeeded({"plan": "skipped"})  # nothing distributed


def test_consecutive_failures_count_back_to_the_last_success():
    results = [{"succeeded": s} for s in (False, True, False, False)]
    assert runpolicy.consecutive_failures(results) == 2
    assert runpolicy.consecutive_failures([]) == 0
