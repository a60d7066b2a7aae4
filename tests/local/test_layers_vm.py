"""Step layers with real build VMs: resume a failed build, reuse unchanged steps, invalidate, detect corruption.

One first build seeds every scenario (six boots in all, ~75 s each under TCG). The steps run through the local
backend exactly as the step operators call them, a Reused step being what Airflow shows as skipped.
Template: mark one · reboot + mark two · File payload · mark three, which needs a host port to be listening
(closed in the first run: the build fails at its last customizer, as a flaky mirror would make it).
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

pytestmark = pytest.mark.vm
GALLERY = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/golden/providers/Microsoft.Compute"
MARKS = "/etc/goldsmith-marks"


def template(path: Path, payload: Path, port: int, last: str = "three") -> Path:
    append = f"echo {{}} | sudo tee -a {MARKS}"
    path.write_text(json.dumps({"location": "westeurope", "properties": {
        "vmProfile": {"vmSize": "Standard_D2s_v3"},
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": [
            {"type": "Shell", "name": "one", "inline": [append.format("one")]},
            {"type": "Shell", "name": "two", "inline": [append.format("two"), "sudo systemctl reboot"]},
            {"type": "File", "name": "payload", "sourceUri": payload.as_uri(), "destination": "/tmp/payload"},
            {"type": "Shell", "name": "three", "inline": [
                f"bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}'", append.format(last), "cat /tmp/payload"]},
        ],
        "distribute": [{"type": "ManagedImage", "runOutputName": "img", "location": "westeurope",
                        "imageId": f"{GALLERY}/images/layered"}],
    }}))
    return path


def run(path: Path, run_id: str, *, steps_from: int = 0) -> tuple[LocalBackend, dict[str, str]]:
    """The build's tasks in DAG order from customize step `steps_from` (an Airflow clear of that task), with
    cleanup_staging always last; returns the backend and each step's outcome (ok, reused: ..., failed: ...)."""
    plan = make_plan(load_template(path))
    backend = LocalBackend(Build(plan, "layered", run_id, {}, logging.getLogger("test")))
    source = backend.resolve_source()
    backend = LocalBackend(Build(plan, "layered", run_id, {}, logging.getLogger("test"), source))
    outcome: dict[str, str] = {}
    try:
        backend.prepare_staging()
        if steps_from == 0:
            backend.provision(source)
        for step in plan.customize_steps()[steps_from:]:
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
        marks = backend.staging / "image.qcow2"
        outcome["marks"] = read_file_from_image(marks, MARKS, backend.staging) if marks.exists() else ""
        backend.cleanup(keep_vm=False)
    return backend, outcome


@pytest.mark.timeout(3600)
def test_resume_reuse_invalidate_and_corruption(tmp_path, base_image, monkeypatch) -> None:
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GOLDSMITH_LAYERS", str(tmp_path / "layers"))
    cache = layers.LayerCache()
    payload = tmp_path / "payload.txt"
    payload.write_text("payload v1\n")
    with socket.socket() as s:  # a port nothing listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = template(tmp_path / "layered.json", payload, port)

    # 1. Fails at its last customizer; the layers of the three steps before it are cached, then cleaned up.
    backend, first = run(path, "run-1")
    assert "customize.3_three" in first["failed"], first
    assert [first[f"customize.{i}"] for i in ("0_one", "1_two", "2_payload")] == ["ok"] * 3
    keys = layers.chain_keys(backend.build.plan, backend.build.source, None)
    assert [bool(cache.meta(k)) for k in keys] == [True, True, True, False]
    assert cache.meta(keys[1])["task"] == "customize.1_two" and cache.meta(keys[1])["run"] == "layered/run-1"
    assert not backend.staging.exists() and qemu_processes_in(tmp_path) == []

    # 2. The failed task cleared (the host port now open): one boot from the layer of step 2; steps 0-2 are not
    # run again, so each mark is in the image once.
    with socket.create_server(("127.0.0.1", port)):
        _, resumed = run(path, "run-1", steps_from=3)
        assert "failed" not in resumed, resumed
        assert resumed["marks"] == "one\ntwo\nthree\n"

        # 3. The last step edited: a new run starts from the layer of step 2, reused steps say from which run.
        _, edited = run(template(path, payload, port, last="three-edited"), "run-2")
        assert "failed" not in edited, edited
        assert edited["customize.1_two"].startswith("reused: customize.1_two: already in the cached layer")
        assert "layered/run-1" in edited["customize.2_payload"] and edited["customize.3_three"] == "ok"
        assert edited["marks"] == "one\ntwo\nthree-edited\n"
        image = LocalGallery(tmp_path / "home" / "gallery").resolve_managed_image(f"{GALLERY}/images/layered")
        assert [r["task"] for r in image.metadata["provenance"]["layers"]] == [
            "customize.0_one", "customize.1_two", "customize.2_payload"]

        # 4. The File step's source changed: its checksum invalidates it and every later layer; the reboot
        # step's layer is the start.
        payload.write_text("payload v2\n")
        backend, changed = run(path, "run-3")
        assert [changed[f"customize.{i}"][:6] for i in ("0_one", "1_two", "2_payload", "3_three")] == [
            "reused", "reused", "ok", "ok"], changed
        assert changed["marks"] == "one\ntwo\nthree-edited\n"

        # 5. A corrupted layer is detected and built again, not used.
        keys = layers.chain_keys(backend.build.plan, backend.build.source, None)
        last = cache.path(keys[3])
        last.chmod(0o644)
        with last.open("r+b") as f:
            f.seek(last.stat().st_size // 2)
            f.write(b"\xff" * 4096)
        _, repaired = run(path, "run-4")
        assert repaired["customize.2_payload"].startswith("reused") and repaired["customize.3_three"] == "ok"
        assert cache.meta(keys[3])["run"] == "layered/run-4" and cache.get(keys[3], Path(cache.meta(keys[0])["base"]))
        assert repaired["marks"] == "one\ntwo\nthree-edited\n"
    assert qemu_processes_in(tmp_path) == [] and not any((tmp_path / "home" / "staging").iterdir())
    assert all(not any(refs.iterdir()) for refs in cache.root.glob("*.refs"))
