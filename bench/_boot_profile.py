"""Where a build VM's boot goes: `python -m bench._boot_profile [source.qcow2]` (default: the catalog's Debian base).

Boots the image as the local backend does (qemu.launch on an overlay), stamps each serial console line with the
seconds since QEMU started, and prints the milestones (firmware and bootloader, kernel, initramfs, systemd, SSH,
cloud-init done), then the guest's own view (systemd-analyze, cloud-init analyze), a reboot (QEMU ends and is
started again, as the backend does) and the power-off. Not a benchmark of its own: a tool to find what to cut.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from goldsmith.communicator import SSHCommunicator
from goldsmith.local import baseimage, catalog, disk, qemu

MILESTONES = {"Linux version": "kernel starts", "Run /init": "initramfs starts", "systemd 2": "systemd starts",
              "Reached target": "first unit target", "login:": "getty"}


def _stamp_console(path: Path, started: float, stop: threading.Event, lines: list[tuple[float, str]]) -> None:
    while not path.exists() and not stop.is_set():
        time.sleep(0.05)
    with path.open(errors="replace") as f:
        f.seek(0, 2)
        partial = ""
        while not stop.is_set():
            chunk = f.read()
            if not chunk:
                time.sleep(0.05)
                continue
            *complete, partial = (partial + chunk).split("\n")
            lines += [(time.time() - started, line) for line in complete]


def _boot(vm: qemu.VMState, key: Path, label: str) -> None:
    console: list[tuple[float, str]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_stamp_console, args=(vm.path / qemu.CONSOLE_LOG, vm.started_at, stop, console))
    watcher.start()
    banner = vm.wait_for_ssh(900)
    comm = SSHCommunicator("127.0.0.1", vm.port, vm.user, key)
    comm.wait_until_ready(900)
    ready = time.time() - vm.started_at
    stop.set()
    watcher.join()
    print(f"--- {label}")
    seen = set()
    for seconds, line in console:
        for marker, name in MILESTONES.items():
            if marker in line and name not in seen:
                seen.add(name)
                print(f"  {seconds:6.1f} s  {name}")
    print(f"  {banner:6.1f} s  SSH banner\n  {ready:6.1f} s  SSH session, cloud-init done")
    with comm:
        for command in ("systemd-analyze", "systemd-analyze blame | head -15", "systemd-analyze critical-chain",
                        "sudo cloud-init analyze show 2>/dev/null | grep -E 'Finished stage|Total Time|took' | sort -t'(' -k2 -r | head -25"):
            print(f"  $ {command}")
            comm.run(command, on_line=lambda line: print(f"    {line}"))


def main(source: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="goldsmith-boot-") as tmp:
        staging = Path(tmp)
        key = staging / "id_ed25519"
        private = Ed25519PrivateKey.generate()
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        key.chmod(0o600)
        public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        overlay = disk.create_overlay(source, staging / "os.qcow2")
        vm = qemu.launch(staging, overlay, vcpus=2, memory_mib=8192, user="goldsmith",
                         ssh_public_key=public.decode(), hostname="boot-profile", key_path=key)
        try:
            _boot(vm, key, "first boot")
            with SSHCommunicator("127.0.0.1", vm.port, vm.user, key) as comm:
                comm.wait_until_ready(60)
                start = time.time()
                comm.run("sudo systemctl reboot")
            vm.wait_exit(300)
            print(f"--- reboot: QEMU ended {time.time() - start:.1f} s after `systemctl reboot`")
            _boot(vm.relaunch(), key, "after the reboot")
            start = time.time()
            vm.stop(timeout=300)
            print(f"--- ACPI power-off: {time.time() - start:.1f} s")
        finally:
            if vm.is_running():
                vm.stop(timeout=5)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else
         baseimage.ensure_base_image(catalog.resolve("Debian", "debian-12", "12", "latest")))
