"""Operator extra links: from each distribute task to the artifact it made.

Airflow 3 computes a link on the worker when the task ends and stores it in XCom; the UI shows it as a button
on the task instance. An Azure artifact (managed image, gallery version) links to its Azure portal page; a local
one (local gallery version, VHD file) to its lineage record, the asset event the task emitted (which version,
built from which source, by which template digest and run) in Airflow's REST API.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from airflow.providers.common.compat.sdk import BaseOperatorLink, XCom, conf

PORTAL = "https://portal.azure.com/#resource"


class ArtifactLink(BaseOperatorLink):
    name = "Artifact"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        output = XCom.get_value(ti_key=ti_key, key="return_value") or {}
        return artifact_url(output, "backend:azure" in operator.dag.tags, ti_key)


def artifact_url(output: dict[str, Any], azure: bool, ti_key: Any) -> str:
    """'' when the task made nothing (failed or skipped): Airflow shows no button then."""
    if not output:
        return ""
    if azure and output.get("artifactId"):
        return PORTAL + output["artifactId"]
    query = urlencode({"source_dag_id": ti_key.dag_id, "source_run_id": ti_key.run_id, "source_task_id": ti_key.task_id})
    # Without [api] base_url the link is relative to the UI's own host, which serves the REST API too.
    return f"{conf.get('api', 'base_url', fallback='').rstrip('/')}/api/v2/assets/events?{query}"
