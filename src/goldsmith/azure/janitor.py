"""The janitor: removes what azure builds left behind when their cleanup could not run (a killed scheduler, a
deleted DAG run, a build kept for debugging whose time is up). Leaked `IT_` groups are a standing AIB complaint.

A staging group carries the tags of its run (`goldsmith.dagId`, `goldsmith.runId`) and an expiry
(`goldsmith.expiry`: the build timeout plus slack, or the end of an `abort` debugging window). Once the expiry
has passed and the run has ended (or is gone), a group goldsmith created is deleted; in a group the template
named (`stagingResourceGroup`), only the resources tagged with that run are, a phase per sweep (the VM first).
A group without expiry keeps a VHD its build was asked to leave there, and is left alone.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from airflow.sdk import DAG, BaseOperator, Context

JANITOR_DAG_ID = "goldsmith_azure_janitor"
RUNNING = {"queued", "running"}


def sweep(clients: Any, run_state: Callable[[str, str], str | None], *, now: datetime | None = None,
          log: logging.Logger | None = None) -> list[str]:
    """Start deleting what expired, ended runs left; returns the ids whose deletion was started."""
    from goldsmith.azure import arm
    from goldsmith.azure.backend import TAG_CREATED_BY, TAG_DAG, TAG_EXPIRY, TAG_RUN

    log = log or logging.getLogger(__name__)
    now = now or datetime.now(timezone.utc)
    started = []
    for group in clients.resources.resource_groups.list(filter=f"tagName eq '{TAG_EXPIRY}'"):
        group = group.as_dict()
        tags = group.get("tags") or {}
        dag_id, run_id = tags.get(TAG_DAG), tags.get(TAG_RUN)
        if not dag_id or not run_id or arm.provisioning_state(group) == "Deleting":
            continue
        try:
            expiry = datetime.fromisoformat(tags[TAG_EXPIRY])
        except ValueError:
            log.warning("%s: tag %s=%r is not a date: leaving it alone", group["id"], TAG_EXPIRY, tags[TAG_EXPIRY])
            continue
        state = run_state(dag_id, run_id)
        if expiry > now or state in RUNNING:
            continue
        rid = arm.ResourceId.parse(group["id"])
        if tags.get(TAG_CREATED_BY) == "goldsmith":
            log.info("deleting %s: run %s of %s is %s, expired %s", rid, run_id, dag_id, state or "gone", expiry)
            arm.delete(clients, rid)
            started.append(str(rid))
            continue
        left = _first_phase_left(clients, rid, tags)  # a group the template named: only what the run created
        if not left:
            clients.resources.resource_groups.update(rid.resource_group, {"tags": {
                k: v for k, v in tags.items() if not k.startswith("goldsmith.")}})
        for resource_id, resource in left:
            log.info("deleting %s, left by run %s of %s", resource_id, run_id, dag_id)
            if arm.provisioning_state(resource) != "Deleting":
                arm.delete(clients, resource_id)
            started.append(str(resource_id))
    return started


def _first_phase_left(clients: Any, group: Any, tags: dict[str, str]) -> list[tuple[Any, dict[str, Any]]]:
    """The resources of the run in the first phase of the cleanup order that has any (a VM before its NIC)."""
    from goldsmith.azure import arm
    from goldsmith.azure.backend import DELETE_ORDER, TAG_DAG, TAG_RUN

    for phase in DELETE_ORDER:
        left = []
        for type_, name in phase:
            rid = arm.resource_id(group.subscription, group.resource_group, type_, name)
            resource = arm.get(clients, rid)
            theirs = (resource or {}).get("tags") or {}
            if resource and (theirs.get(TAG_DAG), theirs.get(TAG_RUN)) == (tags[TAG_DAG], tags[TAG_RUN]):
                left.append((rid, resource))
        if left:
            return left
    return []


class JanitorOperator(BaseOperator):
    """Sweeps with the connection of every azure template in `templates` (a folder of template files)."""

    ui_color = "#e0e0e0"

    def __init__(self, *, templates: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.templates = templates

    def execute(self, context: Context) -> list[str]:
        from goldsmith.azure.hooks import AzureBuildHook

        ti = context["ti"]

        def run_state(dag_id: str, run_id: str) -> str | None:
            try:
                return ti.get_dagrun_state(dag_id=dag_id, run_id=run_id)
            except Exception:  # the run (or its DAG) was deleted: nothing will clean up after it
                return None

        started = []
        for conn_id in _connection_ids(Path(self.templates)):
            started += sweep(AzureBuildHook(conn_id).clients(), run_state, log=self.log)
        return started


def _connection_ids(folder: Path) -> list[str]:
    from goldsmith.template.loader import TemplateError, load_template

    ids = set()
    for path in sorted(folder.glob("*.json")):
        try:
            options = load_template(path).options
        except TemplateError:
            continue
        if options.backend == "azure":
            ids.add(options.azureConnectionId)
    return sorted(ids)


def janitor_dag(templates: Path, start_date: datetime) -> DAG:
    with DAG(
        JANITOR_DAG_ID,
        description="Deletes staging resources of azure builds whose run ended and whose expiry passed",
        doc_md=__doc__,
        schedule="@hourly",
        start_date=start_date,
        catchup=False,
        max_active_runs=1,
        tags=["goldsmith", "backend:azure", "janitor"],
    ) as dag:
        JanitorOperator(task_id="sweep", templates=str(templates), retries=1)
    return dag
