"""`make demo`: build the shipped templates through Airflow itself, then show what came out.

1. validate every template in include/templates;
2. `airflow dags test debian12-base`: a Debian 12 base image from the platform catalog (bootstrapped offline
   from Debian packages the first time, then cached), published to the local gallery;
3. `airflow dags test debian12-golden`: a golden image built on the base's latest gallery version, hardened,
   validated in the VM, distributed as a gallery version and a fixed VHD;
4. print the run outputs, the gallery with provenance, and how to open the Airflow UI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from goldsmith.airflow_env import AIRFLOW, airflow_environ, prepare
from goldsmith.dag_factory import PROJECT_ROOT
from goldsmith.settings import goldsmith_home, templates_dir

DEMO_BUILDS = ("debian12-base", "debian12-golden")
GOLDSMITH = str(Path(sys.executable).with_name("goldsmith"))


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main() -> int:
    home = goldsmith_home()
    airflow_home = Path(os.environ.get("AIRFLOW_HOME") or home / "airflow")
    templates_folder = templates_dir()
    env = airflow_environ(airflow_home, templates_folder, home)
    templates = sorted(str(p) for p in templates_folder.glob("*.json"))

    say(f"validating {len(templates)} templates in {templates_folder}")
    if subprocess.run([GOLDSMITH, "validate", *templates], env=env).returncode != 0:
        return 1

    say(f"preparing Airflow in {airflow_home} (metadata DB, pool)")
    prepare(env)

    for dag_id in DEMO_BUILDS:
        say(f"building {dag_id} with `airflow dags test {dag_id}` (task logs follow)")
        started = time.monotonic()
        result = subprocess.run([AIRFLOW, "dags", "test", dag_id], env=env)
        if result.returncode != 0:
            say(f"{dag_id} FAILED after {time.monotonic() - started:.0f} s: see the task logs above")
            return 1
        say(f"{dag_id} built in {time.monotonic() - started:.0f} s; run outputs:")
        subprocess.run([GOLDSMITH, "run-outputs", dag_id], env=env, check=True)

    say("the local gallery, with provenance")
    subprocess.run([GOLDSMITH, "gallery", "list"], env=env, check=True)
    say("open the Airflow UI on these DAGs:")
    exports = " ".join(f"{k}={env[k]}" for k in sorted(env) if k.startswith(("AIRFLOW_HOME", "AIRFLOW__CORE__D",
                                                                                "AIRFLOW__CORE__P", "GOLDSMITH_")))
    print(f"  cd {PROJECT_ROOT} && {exports} .venv/bin/airflow standalone")
    print("  then http://localhost:8080 (user admin, password in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
