"""The DAG factory: one DAG per template, the build steps wired in AIB's order, broken templates isolated."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from goldsmith.airflow_env import AIRFLOW, airflow_environ, prepare
from goldsmith.dag_factory import BUILD_VM_POOL, build_dags

GALLERY = "/subscriptions/s/resourceGroups/golden/providers/Microsoft.Compute/galleries/g/images/"


def template(**properties) -> dict:
    body = {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": [
            {"type": "Shell", "name": "install tools", "inline": ["true"]},
            {"type": "File", "sourceUri": "file:///etc/hostname", "destination": "/tmp/h"},
        ],
        "validate": {"inVMValidations": [{"type": "Shell", "name": "check", "inline": ["true"]}]},
        "distribute": [
            {"type": "VHD", "runOutputName": "vhd"},
            {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": GALLERY + "app"},
        ],
    }
    body.update(properties)
    return {"location": "westeurope", "properties": body}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "app.json").write_text(json.dumps(template(buildTimeoutInMinutes=30)))
    (tmp_path / "broken.json").write_text('{"location": "x", "properties": {"source": {"type": "ISO"}}}')
    (tmp_path / "windows.json").write_text(json.dumps(template(customize=[{"type": "WindowsRestart"}])))
    return tmp_path


def test_one_dag_per_template_with_the_build_steps_in_order(folder: Path) -> None:
    dags = build_dags(folder)
    assert sorted(dags) == ["app", "broken", "windows"]
    dag = dags["app"]
    assert set(dag.task_dict) == {
        "plan", "prepare_staging", "provision", "customize.0_install_tools", "customize.1_file",
        "validate.0_check", "generalize", "capture", "distribute.vhd", "distribute.sig", "cleanup_staging",
    }
    down = lambda task_id: sorted(dag.task_dict[task_id].downstream_task_ids)  # noqa: E731
    assert down("plan") == ["prepare_staging"]
    # Each step after provision also hangs on it: a step a cached layer holds is skipped, the next still runs.
    assert down("provision") == ["customize.0_install_tools", "customize.1_file", "generalize", "validate.0_check"]
    assert dag.task_dict["customize.1_file"].trigger_rule == "none_failed_min_one_success"
    assert down("customize.1_file") == ["validate.0_check"]
    assert down("validate.0_check") == ["generalize"]
    assert down("capture") == ["distribute.sig", "distribute.vhd"]  # distribution targets run in parallel
    assert down("distribute.vhd") == ["cleanup_staging"]
    cleanup = dag.task_dict["cleanup_staging"]
    assert cleanup.is_teardown and "prepare_staging" in cleanup.upstream_task_ids
    assert dag.task_dict["provision"].pool == BUILD_VM_POOL
    assert dag.task_dict["customize.0_install_tools"].execution_timeout == timedelta(minutes=30)
    assert dag.max_active_runs == 1
    assert {"goldsmith", "backend:local", "source:PlatformImage"} <= set(dag.tags)
    assert "galleryImageVersion" in dag.params and dag.params["onCustomizerError"] == "cleanup"


def test_an_invalid_template_becomes_a_placeholder_that_fails_with_its_errors(folder: Path) -> None:
    dags = build_dags(folder)
    broken = dags["broken"]
    assert list(broken.task_dict) == ["invalid_template"]
    assert broken.description.startswith("INVALID TEMPLATE:")
    assert "source type 'ISO' was removed" in broken.doc_md
    assert "distribute" in broken.doc_md
    windows = dags["windows"]
    assert list(windows.task_dict) == ["invalid_template"]
    assert "needs a Windows build VM" in windows.doc_md


def test_default_timeout_is_four_hours_and_continue_on_validation_failure(tmp_path: Path) -> None:
    validate = {"continueDistributeOnFailure": True, "inVMValidations": [{"type": "Shell", "inline": ["false"]}]}
    (tmp_path / "t.json").write_text(json.dumps(template(validate=validate)))
    dag = build_dags(tmp_path)["t"]
    assert dag.task_dict["provision"].execution_timeout == timedelta(hours=4)
    assert dag.task_dict["generalize"].trigger_rule == "all_done"


def test_source_validation_only_builds_nothing(tmp_path: Path) -> None:
    validate = {"sourceValidationOnly": True, "inVMValidations": [{"type": "Shell", "inline": ["true"]}]}
    (tmp_path / "t.json").write_text(json.dumps(template(validate=validate)))
    dag = build_dags(tmp_path)["t"]
    assert set(dag.task_dict) == {"plan", "prepare_staging", "provision", "validate.0_shell", "cleanup_staging"}


def test_a_task_process_builds_only_its_own_dag(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "app")
    assert list(build_dags(folder)) == ["app"]


@pytest.mark.airflow
def test_real_airflow_loads_valid_dags_beside_a_broken_one(folder: Path, tmp_path: Path) -> None:
    env = airflow_environ(tmp_path / "airflow", folder, tmp_path / "home")
    prepare(env)
    subprocess.run([AIRFLOW, "dags", "reserialize"], env=env, check=True, capture_output=True)
    listing = subprocess.run([AIRFLOW, "dags", "list", "-o", "json"], env=env, check=True, capture_output=True,
                             text=True).stdout
    dag_ids = {d["dag_id"] for d in json.loads(listing[listing.index("[{"):])}
    assert dag_ids == {"app", "broken", "windows"}
    errors = subprocess.run([AIRFLOW, "dags", "list-import-errors", "-o", "json"], env=env, check=True,
                            capture_output=True, text=True).stdout
    assert "Traceback" not in errors and "app" not in errors
