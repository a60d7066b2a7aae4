"""Build-host affinity: each local template pinned to one host's queue and VM pool; azure builds anywhere."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from goldsmith import affinity
from goldsmith.core import Build
from goldsmith.dag_factory import build_dags
from goldsmith.local.backend import MARKER, LocalBackend
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan

HOSTS = "build1,build2,build3"


def write(folder: Path, name: str, backend: str = "local") -> None:
    body = {"location": "westeurope", "goldsmith": {"backend": backend}, "properties": {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12", "version": "latest"},
        "customize": [{"type": "Shell", "name": "hi", "inline": ["true"]}],
        "distribute": [{"type": "VHD", "runOutputName": "vhd"}],
    }}
    if backend == "azure":
        body["properties"]["distribute"] = [{"type": "ManagedImage", "runOutputName": "img", "location": "westeurope",
                                             "imageId": "/subscriptions/s/resourceGroups/g/providers/"
                                                        "Microsoft.Compute/images/x"}]
        body["properties"]["stagingResourceGroup"] = None
    (folder / f"{name}.json").write_text(json.dumps(body))


def test_no_build_hosts_means_the_default_queue_and_the_cluster_pool(monkeypatch) -> None:
    monkeypatch.delenv(affinity.HOSTS_VAR, raising=False)
    assert affinity.placement("app", "local") == affinity.Placement(None, "default", "goldsmith_build_vms")
    assert affinity.pools() == ["goldsmith_build_vms"]


def test_a_local_template_is_pinned_to_one_host_by_a_stable_hash(monkeypatch) -> None:
    monkeypatch.setenv(affinity.HOSTS_VAR, HOSTS)
    names = [f"template-{i}" for i in range(30)]
    placed = {n: affinity.placement(n, "local") for n in names}
    assert {p.host for p in placed.values()} == {"build1", "build2", "build3"}  # spread over every host
    for p in placed.values():
        assert (p.queue, p.pool) == (f"goldsmith.{p.host}", f"goldsmith_build_vms.{p.host}")
    # Every scheduler and worker process must agree: not Python's per-process salted hash().
    code = ("from goldsmith import affinity; import json; "
            f"print(json.dumps([affinity.placement(n, 'local').host for n in {names!r}]))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, affinity.HOSTS_VAR: HOSTS, "PATH": "/usr/bin:/bin"})
        assert json.loads(out.stdout) == [placed[n].host for n in names]
    assert affinity.pools() == ["goldsmith_build_vms.build1", "goldsmith_build_vms.build2", "goldsmith_build_vms.build3"]


def test_the_template_map_overrides_the_hash_and_azure_runs_anywhere(monkeypatch) -> None:
    monkeypatch.setenv(affinity.HOSTS_VAR, HOSTS)
    monkeypatch.setenv(affinity.TEMPLATE_HOSTS_VAR, json.dumps({"a": "build3", "b": "build3"}))
    assert affinity.placement("a", "local").queue == "goldsmith.build3"
    assert affinity.placement("b", "local").pool == "goldsmith_build_vms.build3"
    assert affinity.placement("a", "azure") == affinity.Placement(None, "default", "goldsmith_build_vms")


@pytest.mark.parametrize(("hosts", "mapping", "message"), [
    ("build1,bad host", "", "GOLDSMITH_BUILD_HOSTS: 'bad host' is not a host name"),
    ("build1,build1", "", "GOLDSMITH_BUILD_HOSTS: a host is listed twice"),
    ("build1", "{app: build1}", "GOLDSMITH_TEMPLATE_HOSTS: not JSON"),
    ("build1", '["build1"]', "GOLDSMITH_TEMPLATE_HOSTS: must be a JSON object"),
    ("build1", '{"app": "build9"}', "template 'app' is pinned to 'build9', which is not in GOLDSMITH_BUILD_HOSTS"),
])
def test_bad_settings_name_the_variable_and_the_fix(monkeypatch, hosts, mapping, message) -> None:
    monkeypatch.setenv(affinity.HOSTS_VAR, hosts)
    monkeypatch.setenv(affinity.TEMPLATE_HOSTS_VAR, mapping)
    with pytest.raises(affinity.AffinityError, match=message.replace("(", r"\(")):
        affinity.placement("app", "local")


def test_dags_route_every_task_to_the_host_queue_and_vm_tasks_to_its_pool(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(affinity.HOSTS_VAR, "build1,build2")
    monkeypatch.setenv(affinity.TEMPLATE_HOSTS_VAR, '{"app": "build2"}')
    write(tmp_path, "app")
    dag = build_dags(tmp_path)["app"]
    assert {t.queue for t in dag.tasks} == {"goldsmith.build2"}
    assert dag.task_dict["provision"].pool == "goldsmith_build_vms.build2"
    assert dag.task_dict["customize.0_hi"].pool == "goldsmith_build_vms.build2"
    assert dag.task_dict["plan"].pool != "goldsmith_build_vms.build2"


def test_bad_settings_become_a_placeholder_dag_not_a_broken_dag_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(affinity.HOSTS_VAR, "build1")
    monkeypatch.setenv(affinity.TEMPLATE_HOSTS_VAR, '{"app": "nowhere"}')
    write(tmp_path, "app")
    write(tmp_path, "other")
    dags = build_dags(tmp_path)
    assert "invalid-template" in dags["app"].tags
    assert "nowhere" in dags["app"].description and "GOLDSMITH_BUILD_HOSTS" in dags["app"].description
    assert dags["other"].task_dict["provision"].queue == "goldsmith.build1"  # the other template still builds


def test_prepare_staging_records_its_host_and_a_step_elsewhere_names_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GOLDSMITH_HOST", "build1")
    write(tmp_path, "app")
    plan = make_plan(load_template(tmp_path / "app.json"))
    backend = LocalBackend(Build(plan, "app", "manual__1", {}, logging.getLogger("test")))
    out = backend.prepare_staging()
    assert out["host"] == "build1"
    assert json.loads((backend.staging / MARKER).read_text())["host"] == "build1"
    assert affinity.wrong_host(out["host"]) is None
    monkeypatch.setenv("GOLDSMITH_HOST", "build2")
    assert backend.prepare_staging()["host"] == "build1"  # a retry reports where the area really is
    reason = affinity.wrong_host(out["host"])
    assert "on host 'build1'" in reason and "ran on 'build2'" in reason and "goldsmith.build1" in reason
