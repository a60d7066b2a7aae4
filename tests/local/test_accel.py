"""The accelerator choice and the KVM -> TCG fallback, on any host: choose_accel's inputs are module constants
pointed at files of the test's own, and a QEMU that fails under KVM as nested KVM does ("failed to set MSR")
is a wrapper around the real one, first on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from local.test_qemu import KEY, qemu_processes_in

from goldsmith.local import qemu


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A fake host: a usable /dev/kvm (a writable file), no kvm_pvm module, a CPU with vmx."""
    kvm, cpuinfo = tmp_path / "kvm", tmp_path / "cpuinfo"
    kvm.touch()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme sse2 vmx\n")
    monkeypatch.setattr(qemu, "KVM_DEVICE", str(kvm))
    monkeypatch.setattr(qemu, "PVM_MODULE", str(tmp_path / "kvm_pvm"))
    monkeypatch.setattr(qemu, "CPUINFO", str(cpuinfo))
    monkeypatch.delenv("GOLDSMITH_ACCEL", raising=False)
    return tmp_path


def test_kvm_only_where_it_works(host):
    assert qemu.choose_accel() == ("kvm", "/dev/kvm is usable and the CPU has hardware virtualisation")
    (host / "cpuinfo").write_text("flags\t\t: fpu sse2\n")
    assert qemu.choose_accel() == ("tcg", "the CPU has no vmx/svm flag")
    (host / "cpuinfo").write_text("flags\t\t: fpu svm\n")
    (host / "kvm_pvm").mkdir()
    assert qemu.choose_accel()[0] == "tcg" and "nested KVM" in qemu.choose_accel()[1]
    (host / "kvm").chmod(0o000)
    if os.geteuid() != 0:  # root may open anything
        assert qemu.choose_accel() == ("tcg", f"{host / 'kvm'} is missing or not accessible")
    (host / "kvm").unlink()
    assert qemu.choose_accel() == ("tcg", f"{host / 'kvm'} is missing or not accessible")


# Under -accel kvm it fails as QEMU does on nested KVM; otherwise it is the real QEMU (argv[0] kept, so the
# process's command line is the one recorded in vm.json).
FAILING_UNDER_KVM = """#!/bin/bash
if [[ " $* " == *" -accel kvm "* ]]; then
    echo "qemu-system-x86_64: error: failed to set MSR 0x48d to 0xff00000016" >&2
    exit 1
fi
exec -a "$0" {real} "$@"
"""


def test_a_forced_kvm_launch_that_fails_falls_back_to_tcg(tmp_path, monkeypatch):
    real = shutil.which(qemu.QEMU)
    if real is None:
        pytest.fail(f"{qemu.QEMU} missing: run `make setup`")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / qemu.QEMU).write_text(FAILING_UNDER_KVM.format(real=real))
    (bin_dir / qemu.QEMU).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("GOLDSMITH_ACCEL", "kvm")
    empty = tmp_path / "os.qcow2"  # the firmware finds nothing to boot; QEMU runs all the same
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(empty), "64M"], check=True)
    vm = qemu.launch(tmp_path / "staging", empty, vcpus=1, memory_mib=512, user="packer", ssh_public_key=KEY,
                     hostname="vm")
    try:
        assert (vm.accel, vm.accel_reason) == ("tcg", "fell back: KVM failed at start")
        assert vm.is_running() and "tcg,thread=multi" in vm.argv
        assert qemu.VMState.load(tmp_path / "staging") == vm
        assert "failed to set MSR" in (tmp_path / "staging" / qemu.QEMU_LOG).read_text()
    finally:
        vm.stop(timeout=1)
    assert not vm.is_running() and qemu_processes_in(tmp_path) == []
