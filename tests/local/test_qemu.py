"""The build VM's launcher without booting a guest: acceleration choice, argument checks, state, seed."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from goldsmith.local import qemu
from goldsmith.local.qemu import VMConfigError, VMError, VMState

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBn6lh0cbS0dF0c5o6wRvvB7D4yUEV1Q4M5Xh8nq3GZr test@goldsmith"


def qemu_processes_in(folder: Path) -> list[int]:
    """Pids of QEMU processes whose working directory is inside ``folder`` (ours run in the staging dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"qemu-system" in (proc / "cmdline").read_bytes()
                    and (proc / "cwd").resolve().is_relative_to(folder.resolve())):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_accel_override_and_default(monkeypatch):
    monkeypatch.setenv("GOLDSMITH_ACCEL", "TCG")
    assert qemu.choose_accel() == ("tcg", "GOLDSMITH_ACCEL")
    monkeypatch.setenv("GOLDSMITH_ACCEL", "hvf")
    with pytest.raises(VMConfigError, match="GOLDSMITH_ACCEL='hvf': use 'kvm', 'tcg'"):
        qemu.choose_accel()
    monkeypatch.delenv("GOLDSMITH_ACCEL")
    accel, why = qemu.choose_accel()
    assert accel in ("kvm", "tcg") and why
    if Path("/sys/module/kvm_pvm").exists():
        assert accel == "tcg" and "nested" in why


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vcpus": 0}, "vcpus=0"),
        ({"memory_mib": 64}, "memory_mib=64: must be at least 512"),
        ({"user": "root"}, "user='root'"),
        ({"user": "Bad User"}, "user='Bad User'"),
        ({"ssh_public_key": "not a key"}, "ssh_public_key: expected one OpenSSH public key line"),
        ({"ssh_public_key": KEY + "\n" + KEY}, "ssh_public_key"),
        ({"hostname": "___"}, "hostname='___': needs at least one letter or digit"),
        ({"disk": "missing.qcow2"}, "missing.qcow2 does not exist"),
    ],
)
def test_bad_launch_arguments_name_the_field(tmp_path, changes, message):
    (tmp_path / "os.qcow2").touch()
    args = {"disk": "os.qcow2", "vcpus": 1, "memory_mib": 1024, "user": "packer", "ssh_public_key": KEY,
            "hostname": "vm", **changes}
    args["disk"] = tmp_path / args["disk"]
    with pytest.raises(VMConfigError, match=message):
        qemu.launch(tmp_path / "staging", **args)
    assert not (tmp_path / "staging").exists()


def test_a_read_only_disk_is_refused(tmp_path):
    base = tmp_path / "base.qcow2"
    base.touch(mode=0o444)
    with pytest.raises(VMConfigError, match="is read-only .* boot an overlay of it"):
        qemu.launch(tmp_path / "staging", base, vcpus=1, memory_mib=1024, user="packer", ssh_public_key=KEY,
                    hostname="vm")


def test_hostname_is_made_valid():
    assert qemu._hostname("My_Template.v1") == "My-Template-v1"
    assert len(qemu._hostname("x" * 100)) == 63


def test_load_of_nothing_and_of_a_broken_record(tmp_path):
    assert VMState.load(tmp_path) is None
    (tmp_path / "vm.json").write_text("{")
    with pytest.raises(VMError, match="vm.json is unreadable"):
        VMState.load(tmp_path)


def state_for(tmp_path: Path, pid: int, argv: list[str]) -> VMState:
    return VMState(staging_dir=str(tmp_path), disk="d", pid=pid, port=1, accel="tcg", accel_reason="",
                   vcpus=1, memory_mib=512, user="u", hostname="h", key_path=None, argv=argv)


def test_is_running_checks_the_command_line_not_just_the_pid(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        while not Path(f"/proc/{sleeper.pid}/cmdline").read_bytes():  # until the child has exec'd
            time.sleep(0.01)
        assert state_for(tmp_path, sleeper.pid, ["sleep", "30"]).is_running()
        # A reused pid runs something else.
        assert not state_for(tmp_path, sleeper.pid, ["qemu-system-x86_64", "-m", "512"]).is_running()
        sleeper.kill()
        sleeper.wait()
        assert not state_for(tmp_path, sleeper.pid, ["sleep", "30"]).is_running()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_state_round_trips_through_vm_json(tmp_path):
    state = state_for(tmp_path, 123, ["a", "b"])
    state.save()
    assert json.loads((tmp_path / "vm.json").read_text())["pid"] == 123
    assert VMState.load(tmp_path) == state


def test_seed_iso_has_the_cidata_label_the_user_and_the_key(tmp_path):
    qemu._write_seed(tmp_path, tmp_path / "disk-3.qcow2", "packer", KEY, "buildvm")
    iso = (tmp_path / "seed.iso").read_bytes()
    assert iso[0x8028:0x8028 + 6] == b"cidata"  # primary volume descriptor's volume id
    assert b'"name": "packer"' in iso and KEY.encode() in iso and b"NOPASSWD:ALL" in iso
    assert b'"ssh_genkeytypes": [\n    "ed25519"' in iso and b'"local-hostname": "buildvm"' in iso
    assert f'"instance-id": "goldsmith-{tmp_path.name}-disk-3-'.encode() in iso  # one instance per launch
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]  # the seed's source files are gone


def test_a_qemu_that_fails_to_start_is_reported_and_gone(tmp_path):
    bad = tmp_path / "not-qcow2.img"
    bad.write_bytes(b"\0" * 1024 * 1024)
    with pytest.raises(VMError, match="(?s)QEMU did not start:.*Image is not in qcow2 format"):
        qemu.launch(tmp_path / "staging", bad, vcpus=1, memory_mib=512, user="packer", ssh_public_key=KEY,
                    hostname="vm")
    assert qemu_processes_in(tmp_path) == []
    assert not VMState.load(tmp_path / "staging").is_running()  # recorded before the launch, never ran
