"""Boots in seconds: a base image booted once, its running state saved, and build VMs started from that state.

Measured on this host (Debian base, 2 vCPU, TCG): a cold boot to SSH with cloud-init done takes 58-80 s idle
(several minutes while other VMs share the cores); a build VM from the saved state answers SSH ~2 s after QEMU
starts. A state is saved per (source disk, vCPUs, memory, accelerator, QEMU version) under
``$GOLDSMITH_CACHE/states/<digest>/``: ``disk.qcow2`` (read-only: the disk as the saved VM left it), ``state.bin``
(QEMU's migration stream), ``id_ed25519`` (the key the saved VM trusts, 0600, never given to a build) and
``state.json``.

A build VM starts on a fresh overlay over ``disk.qcow2`` with ``-incoming`` from ``state.bin``. Before anything
of the build runs, ``hand_over`` makes it its own: the build's key replaces the state's (so nothing from the state
authenticates to it afterwards), new SSH host keys and machine-id, the host's clock, entropy from the host, its
host name. Shared between VMs started from one state, and why that is safe for a throwaway build VM: the kernel's
address-space layout and stack canaries, what was in memory at the save (the base image only, nothing of a
build), and the pool's state before the reseed; each build VM lives for one build on a loopback-only port and
generalize removes host keys, machine-id and cloud-init state from the image as after a cold boot.
Where a state cannot be used (another QEMU version, QEMU refusing the stream, no state yet and none can be made)
the caller boots normally and logs why.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from goldsmith.communicator import SSHCommunicator, create_build_key
from goldsmith.local import baseimage, disk, qemu
from goldsmith.settings import goldsmith_cache

log = logging.getLogger(__name__)

STATE_USER = "goldsmith"
READY_TIMEOUT = 900  # the one cold boot, maybe beside other VMs


class SavedStateError(RuntimeError):
    """A saved state could not be made or used; the build boots normally."""


def enabled() -> bool:
    """`GOLDSMITH_SAVED_STATE=on` starts build VMs from saved states (off by default until proven in P1)."""
    return (os.environ.get("GOLDSMITH_SAVED_STATE") or "off").lower() in ("on", "1", "true", "yes")


def qemu_version() -> str:
    out = subprocess.run([qemu.QEMU, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"


@dataclass(frozen=True)
class SavedState:
    root: Path

    @property
    def disk(self) -> Path:
        return self.root / "disk.qcow2"

    @property
    def stream(self) -> Path:
        return self.root / "state.bin"

    @property
    def key(self) -> Path:
        return self.root / "id_ed25519"

    def meta(self) -> dict:
        return json.loads((self.root / "state.json").read_text())


def state_dir(base: Path, vcpus: int, memory_mib: int, accel: str) -> Path:
    digest = hashlib.sha256(json.dumps([str(Path(base).resolve()), vcpus, memory_mib, accel, qemu_version()])
                            .encode()).hexdigest()[:24]
    return goldsmith_cache() / "states" / digest


def ensure(base: Path, vcpus: int, memory_mib: int, accel: str) -> SavedState:
    """The saved state for these settings, made now (one cold boot) if there is none yet."""
    root = state_dir(base, vcpus, memory_mib, accel)
    state = SavedState(root)
    if state.stream.exists():
        return state
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process boots it; the others wait and use it
        if not state.stream.exists():
            _save(state, base, vcpus, memory_mib)
    return state


def _save(state: SavedState, base: Path, vcpus: int, memory_mib: int) -> None:
    root = state.root
    for leftover in ("disk.qcow2", "vm.json", "state.bin.partial"):
        (root / leftover).unlink(missing_ok=True)
    state.key.unlink(missing_ok=True)
    state.key.with_suffix(".pub").unlink(missing_ok=True)
    create_build_key(state.key)
    public = state.key.with_suffix(".pub").read_text().strip()
    disk.create_overlay(base, state.disk)
    started = time.monotonic()
    vm = qemu.launch(root, state.disk, vcpus=vcpus, memory_mib=memory_mib, user=STATE_USER,
                     ssh_public_key=public, hostname="goldsmith-state")
    try:
        if (vm.vcpus, vm.memory_mib) != (vcpus, memory_mib):
            raise SavedStateError(f"the host capped the VM to {vm.vcpus} vCPU, {vm.memory_mib} MiB")
        vm.wait_for_ssh(READY_TIMEOUT)
        with SSHCommunicator("127.0.0.1", vm.port, STATE_USER, state.key) as comm:
            comm.wait_until_ready(READY_TIMEOUT)
            # Its later boots (a build's reboot step) skip cloud-init, as a cold-booted build VM's do.
            _check(comm.run(f"sudo -n touch {baseimage.BUILD_VM_MARKER} && sync"), "marking the build VM")
        booted = time.monotonic() - started
        qemu.qmp(root, "stop")
        partial = root / "state.bin.partial"
        qemu.qmp(root, "migrate", arguments={"uri": f"exec:cat > {partial}"})
        deadline = time.monotonic() + 300
        while (status := qemu.qmp(root, "query-migrate").get("status")) not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise SavedStateError("saving the VM state took over 300 s")
            time.sleep(0.2)
        if status != "completed":
            raise SavedStateError(f"saving the VM state {status}")
        saved = time.monotonic() - started - booted
    finally:  # a migrated VM is paused for good: quit, no ACPI power-off
        with contextlib.suppress(OSError, qemu.VMError):
            qemu.qmp(root, "quit")
        if not vm.wait_exit(10):
            vm.stop(timeout=5)
    os.chmod(state.disk, 0o444)
    (root / "state.json").write_text(json.dumps({
        "base": str(base), "vcpus": vcpus, "memoryMiB": memory_mib, "accel": vm.accel, "qemu": qemu_version(),
        "argv": vm.argv, "bootSeconds": round(booted, 1), "saveSeconds": round(saved, 1), "created": time.time()}))
    partial.rename(state.stream)
    log.info("saved the running state of %s after a %.0f s boot (%.1f s, %.0f MiB)", base, booted, saved,
             state.stream.stat().st_size / 2**20)


def usable(state: SavedState) -> str | None:
    """Why `state` can't start a VM on this host now, or None."""
    meta = state.meta()
    if meta["qemu"] != qemu_version():
        return f"saved by {meta['qemu']}, this host runs {qemu_version()}"
    return None


def hand_over(comm: SSHCommunicator, *, build_key: str, hostname: str) -> None:
    """Makes a VM started from a saved state this build's own (see the module docstring)."""
    entropy = base64.b64encode(os.urandom(512)).decode()
    script = " && ".join([
        f"date -s @{time.time():.3f} >/dev/null",
        f"echo {entropy} | base64 -d > /dev/urandom",
        "rm -f /etc/ssh/ssh_host_* && ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key",
        "systemctl reload ssh",
        "rm -f /etc/machine-id && systemd-machine-id-setup >/dev/null",
        f"hostnamectl set-hostname {hostname}",
        f"echo '{build_key}' > /home/{STATE_USER}/.ssh/authorized_keys",
    ])
    _check(comm.run(f"sudo -n sh -c \"{script}\""), "handing the VM over to the build")


def _check(result, what: str) -> None:
    if result.exit_code != 0:
        raise SavedStateError(f"{what} failed (exit {result.exit_code}): {' | '.join(result.tail)}")
