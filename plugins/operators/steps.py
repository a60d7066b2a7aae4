"""The build-step operators: thin glue between an Airflow task and one backend step.

Each reads the plan (XCom of `plan`) and its run context, calls one backend step, and returns small JSON.
Imported as `goldsmith.operators.steps` (see pyproject); plugins/.airflowignore keeps Airflow's plugin loader
from importing this folder a second time under the generic name `operators`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from airflow.configuration import conf
from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from goldsmith import affinity, changes, lineage, runoutputs, runpolicy, secrets, updates
from goldsmith.core import Build, BuildError, Pending, Reused, backend_for, trigger_for
from goldsmith.links import ArtifactLink
from goldsmith.template.loader import TemplateError, load_template
from goldsmith.template.plan import BuildPlan, make_plan


class GoldsmithStepOperator(BaseOperator):
    """A step that raises Pending (long operations it started) is called again once they end: after a deferral
    to its trigger (deferrable=True, needs a triggerer), or after this worker ran the trigger itself."""

    ui_color = "#f3e3b5"

    def __init__(self, *, template_file: str,
                 deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False), **kwargs: Any):
        super().__init__(**kwargs)
        self.template_file = template_file
        self.deferrable = deferrable

    needs_secrets = False  # the steps that run the template's scripts

    def build(self, context: Context) -> Build:
        plan = BuildPlan.model_validate(context["ti"].xcom_pull(task_ids="plan"))
        try:
            values = secrets.resolve(plan.options.secrets) if self.needs_secrets else {}
        except secrets.SecretError as e:
            raise AirflowException(str(e)) from None  # retried: a connection may be created meanwhile
        return Build(plan, context["dag"].dag_id, context["run_id"], dict(context["params"]), self.log, values,
                     source=context["ti"].xcom_pull(task_ids="plan", key="source") or {})

    def execute(self, context: Context) -> Any:
        build = self.build(context)
        if self.task_id != "prepare_staging":
            staged = context["ti"].xcom_pull(task_ids="prepare_staging") or {}
            if reason := affinity.wrong_host(staged.get("host")):
                raise AirflowFailException(f"{self.task_id}: {reason}")
        while True:
            try:
                # Goldsmith's own XCom never carries a credential that a URI in the template held.
                return secrets.strip_secrets_json(self.run_step(build, context))
            except Reused as e:
                self.log.info("%s", e)  # Airflow logs a skip without its message
                raise AirflowSkipException(str(e)) from None
            except BuildError as e:
                # Bad input or a refused operation: a retry would fail the same way. Anything else is retried.
                raise AirflowFailException(secrets.strip_secrets(str(e))) from None
            except Pending as pending:
                context["ti"].xcom_push(key="pending", value={"waiting_for": pending.what, **pending.wait})
                trigger = trigger_for(pending.wait)
                if self.deferrable:  # bounded like the task itself: a trigger never waits forever
                    self.defer(trigger=trigger, method_name="execute_complete", timeout=self.execution_timeout)
                _check_event(asyncio.run(_first_event(trigger)))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        _check_event(event)
        return self.execute(context)

    def run_step(self, build: Build, context: Context) -> Any:
        raise NotImplementedError


async def _first_event(trigger: Any) -> dict[str, Any]:
    async with contextlib.aclosing(trigger.run()) as events:
        async for event in events:
            return event.payload
    raise AirflowException(f"{trigger!r} ended without an event")


def _check_event(event: dict[str, Any]) -> None:
    if event.get("status") != "success":  # the operation failed: retried, as a retry may succeed
        raise AirflowException(event.get("message") or f"waiting failed: {event}")

class PlanOperator(BaseOperator):
    """Loads and validates the template, checksums its scripts, resolves the source's exact version."""

    ui_color = "#d9ead3"

    def __init__(self, *, template_file: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.template_file = template_file

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            plan = make_plan(load_template(self.template_file))
        except TemplateError as e:
            raise AirflowFailException(f"invalid template:\n{e}") from None
        build = Build(plan, context["dag"].dag_id, context["run_id"], dict(context["params"]), self.log)
        try:
            source = backend_for(build).resolve_source()
        except BuildError as e:
            raise AirflowFailException(str(e)) from None
        self.log.info("plan %s: digest %s, source %s", plan.name, plan.digest, source)
        if plan.options.rebuild != "always" and not context["params"].get("forceRebuild"):
            reason = runpolicy.unchanged_since(plan, source, runoutputs.list_results(plan.name))
            if reason and plan.options.rebuild == "onUpdates":
                reason = _without_updates(plan, self.log)
            if reason:
                self.log.info(reason)  # Airflow logs a skip as "Skipping task." without its message
                raise AirflowSkipException(reason)
        context["ti"].xcom_push(key="source", value=source)
        context["ti"].xcom_push(key="digest", value=plan.digest)
        return plan.model_dump(mode="json", by_alias=True, exclude_none=True)


class PrepareStagingOperator(GoldsmithStepOperator):
    def run_step(self, build: Build, context: Context) -> Any:
        return backend_for(build).prepare_staging()


class ProvisionOperator(GoldsmithStepOperator):
    def run_step(self, build: Build, context: Context) -> Any:
        return backend_for(build).provision(context["ti"].xcom_pull(task_ids="plan", key="source"))


class CustomizeOperator(GoldsmithStepOperator):
    needs_secrets = True

    def __init__(self, *, index: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.index = index

    def run_step(self, build: Build, context: Context) -> Any:
        return backend_for(build).customize(build.plan.customize_steps()[self.index])


class ValidateOperator(GoldsmithStepOperator):
    needs_secrets = True

    def __init__(self, *, index: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.index = index

    def run_step(self, build: Build, context: Context) -> Any:
        return backend_for(build).validate(build.plan.validate_steps()[self.index])


class GeneralizeOperator(GoldsmithStepOperator):
    def run_step(self, build: Build, context: Context) -> Any:
        failed = runpolicy.failed(_task_states(context), "customize.")
        if failed:  # runs after failed validations (continueDistributeOnFailure), never after failed customizers
            raise AirflowSkipException(f"not generalizing: {', '.join(failed)} failed")
        return backend_for(build).generalize()


class CaptureOperator(GoldsmithStepOperator):
    def run_step(self, build: Build, context: Context) -> Any:
        return backend_for(build).capture()


class DistributeOperator(GoldsmithStepOperator):
    operator_extra_links = (ArtifactLink(),)

    def __init__(self, *, run_output_name: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.run_output_name = run_output_name

    def run_step(self, build: Build, context: Context) -> Any:
        step = next(s for s in build.plan.distribute_steps() if s.name == self.run_output_name)
        source = context["ti"].xcom_pull(task_ids="plan", key="source")
        output = secrets.strip_secrets_json(backend_for(build).distribute(step, source))
        artifact = output.get("artifactId") or output.get("artifactUri")
        for line in changes.since_previous(artifact) if artifact else []:  # the log ends with what changed
            self.log.info("%s", line)
        # The asset event says which version this is and where it came from; rebuild chains and lineage read it.
        context["outlet_events"][self.outlets[0]].extra = {
            **output, "type": step.item.type, "version": lineage.image_version(output.get("artifactId")),
            "source": source, "templateDigest": build.plan.digest,
            "dagRunId": build.run_id, "regions": [r.name for r in getattr(step.item, "targetRegions", None) or []],
            "startDate": context["ti"].start_date.isoformat() if context["ti"].start_date else None,
        }
        # Kept for the OpenLineage listener, which calls the method below in a forked process: there an XCom
        # read would go through the task runner's channel to its supervisor, shared with the parent, and hang.
        self._openlineage = lineage.openlineage_for_distribution(
            lineage.source_uri(build.plan.template.properties.source), self.outlets[0].uri, output, source,
            build.plan.digest)
        return output

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        return getattr(self, "_openlineage", None)


class CleanupStagingOperator(GoldsmithStepOperator):
    """Always runs (a teardown): stops the VM and removes the staging area, unless errorHandling says abort."""

    def run_step(self, build: Build, context: Context) -> Any:
        states = _task_states(context)
        outcome = backend_for(build).cleanup(keep_vm=runpolicy.keep_vm(build.plan, build.params, states))
        runoutputs.record_result(build.plan.name, build.run_id, succeeded=runpolicy.succeeded(states),
                                 digest=build.plan.digest,
                                 source=context["ti"].xcom_pull(task_ids="plan", key="source"))
        return outcome


def _without_updates(plan: BuildPlan, log: Any) -> str | None:
    """Why an unchanged `onUpdates` build would repeat the last one (its apt sources carry nothing newer), or None
    after logging the updates that make it build."""
    try:
        found = updates.since_last_build(plan.name, plan.options.backend)
    except updates.UpdatesError as e:  # the archive may be back at the next try
        raise AirflowException(f"onUpdates: can't read the image's package archives: {e}") from None
    if found is None:
        log.info("onUpdates: no SBOM of an earlier successful build to compare with: building")
        return None
    run_id, pending = found
    if pending:
        log.info("onUpdates: %d package updates since the build %s:\n  %s", len(pending), run_id,
                 "\n  ".join(map(str, pending)))
        return None
    return (f"nothing changed since the successful build {run_id}: same source, template and scripts, and its apt "
            "sources carry no newer version of any installed package")


def _task_states(context: Context) -> dict[str, str]:
    states = context["ti"].get_task_states(dag_id=context["dag"].dag_id, run_ids=[context["run_id"]])
    return {t: s for t, s in states.get(context["run_id"], {}).items() if t != context["ti"].task_id}
