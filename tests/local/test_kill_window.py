"""A task killed while it starts the build VM leaves no QEMU that cleanup loses track of: vm.json is written
before QEMU starts and QEMU writes its own pid file (goldsmith/local/qemu.py). Each case kills a real
process running the local backend's steps at a point inside the launch, then a fresh backend (the retry or
cleanup task) finds the running QEMU, and cleanup stops it and removes the staging area."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from local.test_qemu import qemu_processes_in

from goldsmith.core import Build
from goldsmith.local.backend import LocalBackend
from goldsmith.local.qemu import VMState
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan

TEMPLATE = {"location": "westus2", "goldsmith": {"backend": "local"}, "properties": {
    "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12", "version": "latest"},
    "distribute": [{"type": "VHD", "runOutputName": "vhd"}]}}

# The task: prepare the staging area, then launch the build VM as provision does (on an empty disk: the
# firmware finds nothing to boot and QEMU idles), dying by SIGKILL at `KILL_AT`.
TASK = textwrap.dedent("""
    import logging, os, signal, subprocess, sys
    from goldsmith.core import Build
    from goldsmith.local import qemu
    from goldsmith.local.backend import LocalBackend
    from goldsmith.template.loader import load_template
    from goldsmith.template.plan import make_plan

    template, disk, kill_at = sys.argv[1:]
    backend = LocalBackend(Build(make_plan(load_template(template)), "tpl", "manual__1", {}, logging.getLogger()))
    backend.prepare_staging()
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if kill_at == "after_launch":  # QEMU runs, its pid not recorded yet
        real_run = qemu.subprocess.run
        qemu.subprocess.run = lambda argv, **k: (real_run(argv, **k), argv[0] == "sh" and die())[0]
    else:  # QEMU runs and is recorded, not yet answering on QMP
        qemu._wait_started = die
    qemu.launch(backend.staging, disk, vcpus=1, memory_mib=512, user="goldsmith", hostname="tpl",
                ssh_public_key=open(backend.staging / "id_ed25519.pub").read())
""")


def backend(template: Path) -> LocalBackend:
    return LocalBackend(Build(make_plan(load_template(template)), "tpl", "manual__1", {},
                              logging.getLogger("test.kill")))


@pytest.mark.parametrize("kill_at", ["after_launch", "while_starting"])
def test_a_task_killed_while_launching_leaves_a_vm_that_cleanup_stops(tmp_path, monkeypatch, kill_at):
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    template = tmp_path / "tpl.json"
    template.write_text(json.dumps(TEMPLATE))
    disk = tmp_path / "os.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    task = subprocess.run([sys.executable, "-c", TASK, str(template), str(disk), kill_at],
                          env={**os.environ, "GOLDSMITH_ACCEL": "tcg"}, capture_output=True, text=True)
    assert task.returncode == -9, task.stderr
    try:
        [orphan] = qemu_processes_in(tmp_path)
        retry = backend(template)
        vm = VMState.load(retry.staging)
        assert vm is not None and vm.is_running() and vm.pid == orphan  # the retry would adopt it
        assert retry.cleanup(keep_vm=False) == {"removed": True}
        assert qemu_processes_in(tmp_path) == [] and not retry.staging.exists()
    finally:
        for pid in qemu_processes_in(tmp_path):
            os.kill(pid, 9)
