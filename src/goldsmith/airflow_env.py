"""The environment in which Airflow runs Goldsmith's DAGs (the README's contract), for the demo and the tests.

`AIRFLOW_HOME` set, `airflow db migrate` done, the DAGs folder at dags/, the plugins folder at plugins/,
`GOLDSMITH_TEMPLATES` at a folder of templates and `GOLDSMITH_HOME` at a state folder; then
`airflow dags test <template stem>` builds that template.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from goldsmith.dag_factory import BUILD_VM_POOL, PROJECT_ROOT

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def airflow_environ(airflow_home: Path, templates: Path, home: Path, *, vm_slots: int = 2) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "GOLDSMITH_TEMPLATES": str(templates),
        "GOLDSMITH_HOME": str(home),
        "GOLDSMITH_VM_SLOTS": str(vm_slots),
    })
    return env


def prepare(env: dict[str, str]) -> None:
    """Migrates the metadata DB (idempotent) and creates the pool that bounds concurrent build VMs."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [AIRFLOW, "pools", "set", BUILD_VM_POOL, env.get("GOLDSMITH_VM_SLOTS", "2"), "Goldsmith build VMs on this host"],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )
