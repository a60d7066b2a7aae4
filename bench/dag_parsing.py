"""P3: parsing the DAG file with 10, 100 and 1,000 templates, and a task process building only its own DAG;
beside it dag-factory 1.1.0 (PyPI) loading equivalent YAML (one file per template, the same tasks and edges).

Each figure is the median of 3 fresh processes, timed as Airflow's DAG processor parses a file: Airflow already
imported, then `DagBag(<file>)` (the DAG file's imports, reading the templates, making the DAGs). The templates
are bench/validate_templates.py's (one in ten invalid: a placeholder DAG). A task process has Airflow's parsing
context set (`_AIRFLOW_PARSING_CONTEXT_DAG_ID`); dag-factory has no use for it and loads every file.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import distributions, version
from pathlib import Path
from typing import Any

from bench import _report, validate_templates

COUNTS = (10, 100, 1000)
REPEATS = 3
DAG_FILE = Path(__file__).parents[1] / "dags" / "goldsmith_dags.py"
DAG_FACTORY_FILE = 'from dagfactory import load_yaml_dags\n\nload_yaml_dags(globals_dict=globals(), dags_folder="{folder}")\n'
EMPTY = "airflow.providers.standard.operators.empty.EmptyOperator"
# Installed by `make bench` beside the venv, not in it: its Airflow plugin would load in every Airflow process.
DAG_FACTORY_PATH = Path(sys.prefix) / "dag-factory"

# Run in a fresh interpreter: import Airflow first (the DAG processor has), then time the parse alone.
PARSE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
start = time.perf_counter()
bag = DagBag(sys.argv[1], safe_mode=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "dags": len(bag.dags), "errors": len(bag.import_errors)}))
"""


def _parse(dag_file: Path, env: dict[str, str]) -> dict[str, Any]:
    runs = []
    for _ in range(REPEATS):
        done = subprocess.run([sys.executable, "-c", PARSE, str(dag_file)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"parsing {dag_file} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if any(r["errors"] for r in runs):
        raise SystemExit(f"{dag_file}: import errors while parsing")
    return {"seconds": statistics.median(r["seconds"] for r in runs), "dags": runs[0]["dags"]}


def _yaml_equivalent(dag: Any) -> str:
    """The DAG as dag-factory YAML (JSON is YAML): its tasks as EmptyOperators with the same edges."""
    tasks = {t.task_id: {"operator": EMPTY, **({"dependencies": sorted(t.upstream_task_ids)}
                                               if t.upstream_task_ids else {})} for t in dag.tasks}
    config = {"default_args": {"owner": "platform", "start_date": "2024-01-01", "retries": 2},
              "schedule": None, "catchup": False, "max_active_runs": 1, "description": dag.description,
              "tags": sorted(dag.tags), "tasks": tasks}
    return json.dumps({dag.dag_id: config}, indent=2)


def main() -> dict[str, Any]:
    if not (DAG_FACTORY_PATH / "dagfactory").is_dir():
        raise SystemExit(f"dag-factory is not in {DAG_FACTORY_PATH}: run `make bench` (it installs it there)")
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
           # dag-factory reports usage over the network unless told not to
           "AIRFLOW__DAG_FACTORY__ENABLE_TELEMETRY": "False", "DO_NOT_TRACK": "1", "SCARF_NO_ANALYTICS": "1"}
    env.pop("_AIRFLOW_PARSING_CONTEXT_DAG_ID", None)
    parse: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="goldsmith-bench-p3-") as tmp:
        env["AIRFLOW_HOME"] = str(Path(tmp) / "airflow")
        for count in COUNTS:
            templates, yaml = Path(tmp) / f"t{count}", Path(tmp) / f"y{count}"
            templates.mkdir()
            yaml.mkdir()
            validate_templates.generate(templates, count)
            os.environ["GOLDSMITH_TEMPLATES"] = str(templates)
            from goldsmith.dag_factory import build_dags  # noqa: E402 (after the templates folder is set)

            for dag_id, dag in build_dags(templates).items():
                (yaml / f"{dag_id}.yml").write_text(_yaml_equivalent(dag))
            dag_factory_file = Path(tmp) / f"dag_factory_{count}.py"
            dag_factory_file.write_text(DAG_FACTORY_FILE.format(folder=yaml))
            ours = _parse(DAG_FILE, {**env, "GOLDSMITH_TEMPLATES": str(templates)})
            theirs = _parse(dag_factory_file, {**env, "PYTHONPATH": str(DAG_FACTORY_PATH)})
            if ours["dags"] != theirs["dags"]:
                raise SystemExit(f"{count} templates: {ours['dags']} Goldsmith DAGs, {theirs['dags']} from dag-factory")
            parse[str(count)] = {"dags": ours["dags"], "goldsmith_seconds": round(ours["seconds"], 3),
                                 "dag_factory_seconds": round(theirs["seconds"], 3)}
            print(f"  {count:5} templates: Goldsmith {ours['seconds']:7.3f} s   dag-factory {theirs['seconds']:7.3f} s",
                  flush=True)
        # A task of one DAG among the largest set: Airflow sets the parsing context in the task's process.
        count = str(COUNTS[-1])
        one = {**env, "GOLDSMITH_TEMPLATES": str(Path(tmp) / f"t{count}"), "_AIRFLOW_PARSING_CONTEXT_DAG_ID": "t0500",
               "_AIRFLOW_PARSING_CONTEXT_TASK_ID": "provision"}
        ours = _parse(DAG_FILE, one)
        theirs = _parse(Path(tmp) / f"dag_factory_{count}.py", {**one, "PYTHONPATH": str(DAG_FACTORY_PATH)})
        task = {"templates": int(count), "goldsmith_seconds": round(ours["seconds"], 4),
                "goldsmith_dags": ours["dags"], "dag_factory_seconds": round(theirs["seconds"], 3)}
        print(f"  a task process, {count} templates: Goldsmith {ours['seconds']:.3f} s ({ours['dags']} DAG)   "
              f"dag-factory {theirs['seconds']:.3f} s")
    result = {"benchmark": "dag_parsing", "repeats": REPEATS, "parse": parse, "task_process": task,
              "dag_factory_version": next(distributions(name="dag-factory", path=[str(DAG_FACTORY_PATH)])).version, "airflow_version": version("apache-airflow"),
              **_report.machine()}
    _report.save(result)
    return result


if __name__ == "__main__":
    main()
