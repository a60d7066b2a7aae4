"""A real build VM: boot the cached Debian base, SSH in, reboot (QEMU ends, relaunch), stop, capture.

Two boots of ~80 s each under TCG; nothing may be left running afterwards.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from goldsmith.local import disk, qemu
from goldsmith.local.qemu import VMState

from .test_qemu import qemu_processes_in

pytestmark = pytest.mark.vm


def ssh(vm: VMState, key: Path, command: str, attempts: int = 10) -> subprocess.CompletedProcess:
    argv = ["ssh", "-i", str(key), "-p", str(vm.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
            f"{vm.user}@127.0.0.1", command]
    for _ in range(attempts):  # cloud-init restarts sshd once during the first boot
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if done.returncode != 255:
            return done
        time.sleep(3)
    return done


@pytest.mark.timeout(1200)
def test_boot_ssh_reboot_relaunch_stop_capture(tmp_path, base_image):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    staging = tmp_path / "IT_rg_template_0123"
    staging.mkdir()
    overlay = disk.create_overlay(base_image, staging / "os.qcow2", size_gb=6)
    vm = qemu.launch(staging, overlay, vcpus=2, memory_mib=2048, user="packer",
                     ssh_public_key=key.with_suffix(".pub").read_text(), hostname="goldsmith_test", key_path=key)
    try:
        assert VMState.load(staging) == vm and vm.is_running()
        first_boot = vm.wait_for_ssh(600)
        done = ssh(vm, key, "sudo true && cat /proc/sys/kernel/random/boot_id && hostname && "
                            "cloud-init status --wait >/dev/null && ls /etc/ssh/ && df --output=size -B1G / | tail -1")
        assert done.returncode == 0, done.stderr
        boot_id, hostname, *rest = done.stdout.split()
        assert hostname == "goldsmith-test"
        assert "ssh_host_ed25519_key" in rest and not any("rsa" in name for name in rest)
        assert int(rest[-1]) >= 5  # cloud-init grew the root filesystem into the 6 GiB overlay

        # A guest reboot ends QEMU (-no-reboot); a fresh QEMU on the same disk comes back.
        ssh(vm, key, "sudo systemctl reboot", attempts=1)
        assert vm.wait_exit(120)
        vm = VMState.load(staging).relaunch()
        second_boot = vm.wait_for_ssh(600)
        done = ssh(vm, key, "sudo true && cat /proc/sys/kernel/random/boot_id")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() != boot_id  # a new boot
        print(f"accel {vm.accel}: SSH after {first_boot:.0f} s, after relaunch {second_boot:.0f} s")

        vm.stop(timeout=120)
        assert not vm.is_running()
    finally:
        if vm.is_running():
            vm.stop(timeout=5)
    assert qemu_processes_in(tmp_path) == []

    vhd = disk.to_fixed_vhd(overlay, tmp_path / "captured.vhd")
    footer = disk.read_vhd_footer(vhd)
    assert footer["disk_type"] == 2 and footer["current_size"] == 6 * disk.GIB and footer["checksum_ok"]
