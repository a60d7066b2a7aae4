"""Build VMs from a saved running state: one cold boot saves the base's state, a build VM then starts from it in
seconds and is made the build's own (its key alone, new host keys and machine-id, the host's clock)."""

from __future__ import annotations

import json
import logging
import time

import pytest

from goldsmith.core import Build
from goldsmith.communicator import CommunicatorError, SSHCommunicator
from goldsmith.local import savedstate
from goldsmith.local.backend import BUILD_USER, LocalBackend
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan
from test_build_e2e import read_file_from_image  # tests/ is on sys.path (conftest's plugins)

from .test_qemu import qemu_processes_in

pytestmark = [pytest.mark.vm, pytest.mark.pending]


@pytest.mark.timeout(2400)
def test_a_build_vm_from_the_saved_state_is_the_builds_own(tmp_path, base_image, monkeypatch, caplog) -> None:
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GOLDSMITH_SAVED_STATE", "on")
    monkeypatch.setenv("GOLDSMITH_CACHE", str(tmp_path / "cache"))  # a state of its own; the base stays shared
    (tmp_path / "t.json").write_text(json.dumps({"location": "westeurope", "properties": {
        "vmProfile": {"vmSize": "Standard_D2s_v3"},
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12"},
        "customize": [], "distribute": [{"type": "VHD", "runOutputName": "vhd"}]}}))
    plan = make_plan(load_template(tmp_path / "t.json"))
    backend = LocalBackend(Build(plan, "state", "run-1", {}, logging.getLogger("test"),
                                 {"type": "PlatformImage", "id": "Debian:debian-12:12", "exactVersion": "latest"}))
    monkeypatch.setattr(backend, "_source_disk", lambda source: base_image)
    caplog.set_level(logging.INFO)
    backend.prepare_staging()
    try:
        backend.provision(backend.build.source)  # the first one saves the state, then starts from it
        assert "started from the saved state" in caplog.text and "cold boot" not in caplog.text
        [state] = (tmp_path / "cache" / "states").iterdir()
        state = savedstate.SavedState(state)
        assert state.key.stat().st_mode & 0o777 == 0o600 and not state.disk.stat().st_mode & 0o222
        assert state.meta()["vcpus"] == 2 and state.meta()["qemu"] == savedstate.qemu_version()

        vm = json.loads((backend.staging / "vm.json").read_text())
        with SSHCommunicator("127.0.0.1", vm["port"], BUILD_USER, backend.staging / "id_ed25519") as comm:
            out = comm.run("cat ~/.ssh/authorized_keys; date +%s; cat /etc/machine-id; hostname; "
                           "cat /etc/ssh/ssh_host_ed25519_key.pub").tail
        build_key = (backend.staging / "id_ed25519.pub").read_text().strip()
        assert out[0] == build_key and len(out) == 5
        assert abs(int(out[1]) - time.time()) < 30  # the saved clock was hours behind
        saved_disk = tmp_path / "saved"
        saved_disk.mkdir()
        assert out[2] != read_file_from_image(state.disk, "/etc/machine-id", saved_disk).strip()
        assert out[3] == "t"
        assert out[4].split()[1] != read_file_from_image(state.disk, "/etc/ssh/ssh_host_ed25519_key.pub",
                                                         saved_disk).split()[1]
        with pytest.raises(CommunicatorError):  # the state's key no longer gets in
            with SSHCommunicator("127.0.0.1", vm["port"], BUILD_USER, state.key) as comm:
                comm.wait_until_ready(20, cloud_init=False)
    finally:
        backend.cleanup(keep_vm=False)
    assert qemu_processes_in(tmp_path) == []
