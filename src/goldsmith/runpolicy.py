"""Run policy: the decisions the operators take from a run's history and its tasks' states, as plain functions.

- skip-unchanged: a build that would repeat the last successful one is skipped at `plan`;
- keep-VM-on-error: `errorHandling` `abort` keeps the build VM when a customizer (or validator) failed;
- result recording: a run succeeded when every distribution succeeded and no task failed;
- the source trigger pauses after repeated failed builds, as AIB's does.

`states` maps task ids to their Airflow states (the other tasks of the run); `results` are the run results
`runoutputs.list_results` returns, oldest first.
"""

from __future__ import annotations

from typing import Any, Mapping

from goldsmith.template.plan import BuildPlan


def unchanged_since(plan: BuildPlan, source: Mapping[str, Any], results: list[dict[str, Any]]) -> str | None:
    """Why this build would repeat the last successful one, or None when something changed."""
    last = next((r for r in reversed(results) if r["succeeded"]), None)
    if last and last["digest"] == plan.digest and (last["source"].get("id"), last["source"].get("exactVersion")) == (
            source.get("id"), source.get("exactVersion")):
        return (
            f"nothing changed since the successful build {last['runId']}: same source {source['id']} "
            f"({source.get('exactVersion')}), same template and scripts ({plan.digest[:19]}). Trigger with "
            "forceRebuild to build anyway, or set \"goldsmith\": {\"rebuild\": \"always\"} for patch rebuilds.")
    return None


def failed(states: Mapping[str, str], prefix: str) -> list[str]:
    return sorted(t for t, s in states.items() if t.startswith(prefix) and s == "failed")


def keep_vm(plan: BuildPlan, params: Mapping[str, Any], states: Mapping[str, str]) -> bool:
    """errorHandling `abort` (the run's `onCustomizerError` parameter overrides the template's) and a failure."""
    handling = plan.error_handling
    on_customizer = params.get("onCustomizerError") or handling.onCustomizerError
    return bool((on_customizer == "abort" and failed(states, "customize."))
                or (handling.onValidationError == "abort" and failed(states, "validate.")))


def succeeded(states: Mapping[str, str]) -> bool:
    distributed = [s for t, s in states.items() if t.startswith("distribute.")]
    return bool(distributed) and all(s == "success" for s in distributed) and "failed" not in states.values()


def consecutive_failures(results: list[dict[str, Any]]) -> int:
    count = 0
    for result in reversed(results):
        if result["succeeded"]:
            break
        count += 1
    return count
