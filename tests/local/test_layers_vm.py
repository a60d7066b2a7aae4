"""Step layers with real build VMs: a corrupted layer is built again, a changed file invalidates from its step on.

Three boots (75 s each under TCG idle, up to 10 min on a loaded host). The steps run through the local backend as
the step operators call them, a Reused step being what Airflow shows as skipped (tests/test_layers_live.py
drives resume and reuse through Airflow's REST API). Template: mark one · File payload · mark three, which needs
a host port to be listening (closed in the first run: the build fails at its last customizer).
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from goldsmith.core import Build, BuildError, Reused
from goldsmith.local import layers
from goldsmith.local.backend import LocalBackend
from goldsmith.local.gallery import LocalGallery
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan

from test_build_e2e import read_file_from_image  # tests/ is on sys.path (conftest's plugins)
from .test_qemu import qemu_processes_in

pytestmark = [pytest.mark.vm, pytest.mark.pending]
GALLERY = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/golden/providers/Microsoft.Compute"
MARKS = "/etc/goldsmith-marks"


def template(path: Path, payload: Path, port: int) -> Path:
    append = f"echo {{}} | sudo tee -a {MARKS}"
    path.write_text(json.dumps({"location": "westeurope", "properties": {
        "vmProfile": {"vmSize": "Standard_D2s_v3"},
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": [
            {"type": "Shell", "name": "one", "inline": [append.format("one")]},
            {"type": "File", "name": "payload", "sourceUri": payload.as_uri(), "destination": "/tmp/payload"},
            {"type": "Shell", "name": "three", "inline": [
                f"bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}'", f"cat /tmp/payload | sudo tee -a {MARKS}"]},
        ],
        "distribute": [{"type": "ManagedImage", "runOutputName": "img", "location": "westeurope",
                        "imageId": f"{GALLERY}/images/layered"}],
    }}))
    return path


def run(path: Path, run_id: str) -> tuple[LocalBackend, dict[str, str]]:
    """The build's tasks in DAG order, cleanup_staging always last; returns the backend and each step's outcome
    (ok, reused: ..., or failed: ...) and the marks file of the captured image."""
    plan = make_plan(load_template(path))
    backend = LocalBackend(Build(plan, "layered", run_id, {}, logging.getLogger("test")))
    source = backend.resolve_source()
    backend = LocalBackend(Build(plan, "layered", run_id, {}, logging.getLogger("test"), source))
    outcome: dict[str, str] = {}
    try:
        backend.prepare_staging()
        backend.provision(source)
        for step in plan.customize_steps():
            try:
                backend.customize(step)
                outcome[step.task_id] = "ok"
            except Reused as e:
                outcome[step.task_id] = f"reused: {e}"
        backend.generalize()
        backend.capture()
        backend.distribute(plan.distribute_steps()[0], source)
    except BuildError as e:
        outcome["failed"] = str(e)
    finally:
        image = backend.staging / "image.qcow2"
        outcome["marks"] = read_file_from_image(image, MARKS, backend.staging) if image.exists() else ""
        backend.cleanup(keep_vm=False)
    return backend, outcome


@pytest.mark.timeout(3600)
def test_a_corrupted_layer_is_rebuilt_and_a_changed_file_invalidates_its_step_on(tmp_path, base_image,
                                                                                  monkeypatch) -> None:
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GOLDSMITH_LAYERS", str(tmp_path / "layers"))
    cache = layers.LayerCache()
    payload = tmp_path / "payload.txt"
    payload.write_text("payload v1\n")
    with socket.socket() as s:  # a port nothing listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = template(tmp_path / "layered.json", payload, port)

    # 1. Fails at its last customizer; the layers of the two steps before it are cached, then cleaned up.
    backend, first = run(path, "run-1")
    assert "customize.2_three" in first["failed"], first
    assert (first["customize.0_one"], first["customize.1_payload"]) == ("ok", "ok")
    keys = layers.chain_keys(backend.build.plan, backend.build.source, None)
    assert [bool(cache.meta(k)) for k in keys] == [True, True, False]
    assert cache.meta(keys[1])["task"] == "customize.1_payload" and cache.meta(keys[1])["run"] == "layered/run-1"
    assert not backend.staging.exists() and qemu_processes_in(tmp_path) == []

    with socket.create_server(("127.0.0.1", port)):  # the mirror is back
        # 2. The payload step's layer corrupted: detected, not used; the build starts from step one's layer and
        # writes the payload layer anew.
        corrupted = cache.path(keys[1])
        corrupted.chmod(0o644)
        with corrupted.open("r+b") as f:
            f.seek(corrupted.stat().st_size // 2)
            f.write(b"\xff" * 4096)
        _, repaired = run(path, "run-2")
        assert "failed" not in repaired, repaired
        assert repaired["customize.0_one"].startswith("reused: customize.0_one: already in the cached layer")
        assert "made by run layered/run-1" in repaired["customize.0_one"]
        assert (repaired["customize.1_payload"], repaired["customize.2_three"]) == ("ok", "ok")
        assert cache.meta(keys[1])["run"] == "layered/run-2" and cache.get(keys[1], Path(cache.meta(keys[0])["base"]))
        assert repaired["marks"] == "one\npayload v1\n"  # step one's mark once: it did not run again
        image = LocalGallery(tmp_path / "home" / "gallery").resolve_managed_image(f"{GALLERY}/images/layered")
        assert [r["task"] for r in image.metadata["provenance"]["layers"]] == ["customize.0_one"]

        # 3. The payload file changed: its checksum invalidates its step and every later one.
        payload.write_text("payload v2\n")
        backend, changed = run(path, "run-3")
        assert [changed[t][:6] for t in ("customize.0_one", "customize.1_payload", "customize.2_three")] == [
            "reused", "ok", "ok"], changed
        assert changed["marks"] == "one\npayload v2\n"
    assert qemu_processes_in(tmp_path) == [] and not any((tmp_path / "home" / "staging").iterdir())
    assert all(not any(refs.iterdir()) for refs in cache.root.glob("*.refs"))
