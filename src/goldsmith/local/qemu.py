"""The local build VM: one QEMU process per staging directory, outliving the task that started it.

``launch()`` writes a cloud-init NoCloud seed, starts QEMU detached (so it survives the Airflow task)
with its working directory in the staging dir, and records it in ``vm.json``; any later task adopts it
with ``VMState.load(staging_dir)``. Files in the staging dir:
``vm.json``, ``seed.iso``, ``console.log`` (serial console, appended across launches), ``qemu.log``
(QEMU's stderr), ``qmp.sock``, ``qemu.pid``.

No QEMU runs unrecorded: ``vm.json`` (with the exact argv) is written before QEMU starts, and QEMU writes
its own pid to ``qemu.pid``; a task killed between the launch and recording the pid leaves a VM that the
next task (or cleanup) still finds, through the pid file or, before QEMU has written it, by its argv.

Choices, from measurements on this host (see shared/notes/qemu-on-these-machines.md):

- Acceleration is decided before booting (``choose_accel``): nested KVM (kvm_pvm) aborts or crawls, so
  it gets TCG. A KVM boot that still dies with a KVM error is relaunched under TCG automatically.
- Under TCG: ``-machine pc -cpu qemu64`` boots faster than q35/max. The Debian base with 2 vCPUs: SSH
  after ~79 s on an idle host (81 s after a relaunch), 158 s while another VM kept both cores busy.
- ``-no-reboot``: an in-place reboot under TCG costs ~250 s (GRUB crawls after a reset), a fresh QEMU
  ~80 s. A guest reboot therefore ends QEMU; the caller ``relaunch()``-es on the same disk.
- SSH is forwarded on 127.0.0.1 only. Readiness is an SSH banner, not a TCP accept: QEMU's user network
  accepts connections before the guest listens.
- The disk uses ``cache=unsafe``: a build VM's guest flushes (dpkg fsyncs a lot) need not reach the host
  disk; QEMU writes everything out when it exits, before any capture.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
STATE_FILE = "vm.json"
SEED = "seed.iso"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
QMP_SOCKET = "qmp.sock"
PID_FILE = "qemu.pid"
KVM_FAILURES = ("KVM internal error", "emulation failure", "failed to set MSR", "kvm_init_vcpu")
MIN_MEMORY_MIB = 512
# What choose_accel reads (module constants: tests/local/test_accel.py points them at files of its own).
KVM_DEVICE, PVM_MODULE, CPUINFO = "/dev/kvm", "/sys/module/kvm_pvm", "/proc/cpuinfo"


class VMError(RuntimeError):
    """The build VM could not be started, reached or stopped."""


class VMConfigError(ValueError):
    """A launch argument is invalid."""


def choose_accel() -> tuple[str, str]:
    """``("kvm" | "tcg", why)``: KVM only where it works; ``GOLDSMITH_ACCEL=kvm|tcg`` overrides."""
    forced = os.environ.get("GOLDSMITH_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise VMConfigError(f"GOLDSMITH_ACCEL={forced!r}: use 'kvm', 'tcg', or leave it unset")
        return forced, "GOLDSMITH_ACCEL"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return "tcg", f"{KVM_DEVICE} is missing or not accessible"
    if Path(PVM_MODULE).exists():
        return "tcg", "nested KVM (kvm_pvm): QEMU aborts with -cpu host and crawls or dies otherwise"
    flags = set()
    for line in Path(CPUINFO).read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    if not flags & {"vmx", "svm"}:
        return "tcg", "the CPU has no vmx/svm flag"
    return "kvm", "/dev/kvm is usable and the CPU has hardware virtualisation"


@dataclass
class VMState:
    """A build VM as recorded in ``<staging_dir>/vm.json``."""

    staging_dir: str
    disk: str
    pid: int
    port: int
    accel: str
    accel_reason: str
    vcpus: int
    memory_mib: int
    user: str
    hostname: str
    key_path: str | None
    argv: list[str] = field(default_factory=list)
    started_at: float = 0.0
    incoming: str | None = None  # a saved state (goldsmith.local.savedstate) the next start resumes from

    @property
    def path(self) -> Path:
        return Path(self.staging_dir)

    @classmethod
    def load(cls, staging_dir: Path) -> VMState | None:
        """The VM recorded in ``staging_dir``, or None if none was launched there."""
        state_file = Path(staging_dir) / STATE_FILE
        try:
            return cls(**json.loads(state_file.read_text()))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError) as exc:
            raise VMError(f"{state_file} is unreadable ({exc}); stop any QEMU using it and launch again") from None

    def save(self) -> None:
        tmp = self.path / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.rename(self.path / STATE_FILE)

    def is_running(self) -> bool:
        """True if our QEMU still runs: the pid's command line is exactly ours (pids get reused)."""
        if not self.pid:  # recorded before the launch: find the process it became
            self.pid = _launched_pid(self)
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return cmdline.split(b"\0")[:-1] == [a.encode() for a in self.argv]

    def relaunch(self) -> VMState:
        """Start QEMU again on the same disk and seed (after a guest reboot or poweroff ended it)."""
        if self.is_running():
            raise VMError(f"the build VM in {self.staging_dir} is still running (pid {self.pid}); stop it first")
        if not _port_free(self.port):
            self.port = _free_port()
        _start(self)
        return self

    def wait_for_ssh(self, timeout: float = 300) -> float:
        """Wait until the guest's sshd sends its banner; returns seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _ssh_banner(self.port).startswith(b"SSH-"):
                return time.time() - self.started_at
            if not self.is_running():
                if self.accel == "kvm" and _kvm_failed(self.path):
                    log.warning("KVM failed in the guest (see %s); relaunching under TCG", self.path / QEMU_LOG)
                    self.accel, self.accel_reason = "tcg", "fell back: KVM failed during boot"
                    _start(self)
                    deadline = time.monotonic() + timeout
                    continue
                raise VMError(f"the build VM exited before SSH was up.\n{self._diagnostics()}")
            time.sleep(1)
        raise VMError(f"no SSH banner on 127.0.0.1:{self.port} after {timeout:.0f} s.\n{self._diagnostics()}")

    def stop(self, timeout: float = 90) -> None:
        """ACPI power-off via QMP; SIGTERM, then SIGKILL, if the guest doesn't go within ``timeout``."""
        if self.is_running():
            try:
                qmp(self.path, "system_powerdown")
                powered_down = self.wait_exit(timeout)
                if not powered_down:
                    log.warning("build VM pid %d ignored ACPI power-off for %.0f s; terminating it", self.pid, timeout)
            except (OSError, VMError) as exc:
                log.warning("QMP powerdown of pid %d failed (%s); terminating it", self.pid, exc)
                powered_down = False
            if not powered_down:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
                    if self.wait_exit(10):
                        break
        if self.is_running():
            raise VMError(f"could not stop QEMU pid {self.pid}")
        (self.path / QMP_SOCKET).unlink(missing_ok=True)

    def wait_exit(self, timeout: float) -> bool:
        """True once QEMU has exited (within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        return True

    def snapshot_disk(self, overlay: Path) -> None:
        """Freezes the running VM's disk: from now on it writes to the new qcow2 ``overlay`` over it (QMP
        blockdev-snapshot-sync, no pause the guest notices); the old file is left to be read only."""
        overlay = Path(overlay).resolve()
        qmp(self.path, "blockdev-snapshot-sync", timeout=60,
             arguments={"device": "virtio0", "snapshot-file": str(overlay), "format": "qcow2"})
        self.disk = str(overlay)  # a relaunch boots the new top; argv (is_running) stays this QEMU's
        self.save()

    def _diagnostics(self) -> str:
        return (f"{QEMU_LOG} (end):\n{_tail(self.path / QEMU_LOG, 15)}\n"
                f"{CONSOLE_LOG} (end):\n{_tail(self.path / CONSOLE_LOG, 25)}")


def launch(
    staging_dir: Path,
    disk: Path,
    *,
    vcpus: int,
    memory_mib: int,
    user: str,
    ssh_public_key: str,
    hostname: str,
    key_path: Path | None = None,
    incoming: Path | None = None,
) -> VMState:
    """Boot ``disk`` (qcow2, usually an overlay) as the build VM of ``staging_dir``; returns at once.

    ``user`` gets passwordless sudo and ``ssh_public_key`` (one OpenSSH public key line); ``key_path``
    (the matching private key) is only recorded for later tasks. ``hostname`` may be a template name:
    characters a host name can't have become '-'. vCPUs and memory are capped to the host's cores and
    three quarters of its available memory. Call ``wait_for_ssh`` next.
    """
    staging = Path(staging_dir).resolve()
    disk = Path(disk).resolve()
    hostname = _hostname(hostname)
    _check_args(disk, vcpus, memory_mib, user, ssh_public_key)
    staging.mkdir(parents=True, exist_ok=True)
    previous = VMState.load(staging)
    if previous and previous.is_running():
        raise VMError(f"a build VM already runs in {staging}; adopt it with VMState.load() or stop it first")
    _write_seed(staging, disk, user, ssh_public_key.strip(), hostname)
    accel, why = choose_accel()
    log.info("build VM accel %s: %s", accel, why)
    state = VMState(
        staging_dir=str(staging), disk=str(disk), pid=0, port=_free_port(), accel=accel, accel_reason=why,
        vcpus=_cap_vcpus(vcpus), memory_mib=_cap_memory(memory_mib), user=user, hostname=hostname,
        key_path=str(key_path) if key_path else None, incoming=str(incoming) if incoming else None,
    )
    _start(state)
    if incoming:
        _wait_resumed(state)
    return state


def _wait_resumed(state: VMState, timeout: float = 120) -> None:
    """Until the VM started from a saved state runs (QEMU loads the stream, then runs it)."""
    deadline = time.monotonic() + timeout
    try:
        while (status := qmp(state.path, "query-status")["status"]) != "running":
            if status in ("paused", "postmigrate", "prelaunch"):
                qmp(state.path, "cont")
            elif status != "inmigrate" or time.monotonic() > deadline:
                raise VMError(f"the VM from the saved state {state.incoming} is {status}, not running")
            time.sleep(0.1)
    except OSError:
        raise VMError(f"QEMU exited loading the saved state {state.incoming}:\n{_tail(state.path / QEMU_LOG, 5)}") from None
    state.incoming = None  # a relaunch (after a guest reboot) boots the disk
    state.save()


def _hostname(name: str) -> str:
    """A valid host name from e.g. a template name: other characters become '-', at most 63."""
    label = re.sub(r"[^A-Za-z0-9-]+", "-", name)[:63].strip("-")
    if not label:
        raise VMConfigError(f"hostname={name!r}: needs at least one letter or digit")
    return label


def _check_args(disk: Path, vcpus: int, memory_mib: int, user: str, key: str) -> None:
    if not disk.is_file():
        raise VMConfigError(f"disk {disk} does not exist")
    if not disk.stat().st_mode & 0o222:  # root could write it anyway
        raise VMConfigError(f"disk {disk} is read-only (a cached base image?): boot an overlay of it "
                            "(goldsmith.local.disk.create_overlay)")
    if vcpus < 1:
        raise VMConfigError(f"vcpus={vcpus}: must be at least 1")
    if memory_mib < MIN_MEMORY_MIB:
        raise VMConfigError(f"memory_mib={memory_mib}: must be at least {MIN_MEMORY_MIB}")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user) or user == "root":
        raise VMConfigError(f"user={user!r}: use a lower-case Linux user name other than root, like 'packer'")
    if not re.fullmatch(r"(ssh-|ecdsa-|sk-)\S+ \S+( [^\n]*)?", key.strip()):
        raise VMConfigError("ssh_public_key: expected one OpenSSH public key line ('ssh-ed25519 AAAA... comment')")


def _cap_vcpus(vcpus: int) -> int:
    cores = os.cpu_count() or 1
    if vcpus > cores:
        log.info("build VM: %d vCPUs asked, the host has %d cores; using %d", vcpus, cores, cores)
    return min(vcpus, cores)


def _cap_memory(memory_mib: int) -> int:
    meminfo = Path("/proc/meminfo").read_text()
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) // 1024
    cap = max(MIN_MEMORY_MIB, available * 3 // 4)  # leave the host room for Airflow and the page cache
    if memory_mib > cap:
        log.info("build VM: %d MiB asked, %d MiB available on the host; using %d", memory_mib, available, cap)
    return min(memory_mib, cap)


def _write_seed(staging: Path, disk: Path, user: str, key: str, hostname: str) -> None:
    """The NoCloud seed ISO (volume label cidata). JSON is valid YAML, and needs no YAML library."""
    user_data = {
        "users": [{"name": user, "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash",
                   "lock_passwd": True, "ssh_authorized_keys": [key]}],
        "ssh_genkeytypes": ["ed25519"],  # an RSA host key takes ~20 s to generate under TCG
        "ssh_pwauth": False,
        "disable_root": True,
    }
    # One instance per launch: a VM started from a step layer runs cloud-init's per-instance modules again (its
    # key, new host keys), even a resume in the same run, whose staging and disk names repeat the first boot's.
    instance = f"goldsmith-{staging.name}-{disk.stem}-{time.time_ns():x}"[-250:]
    meta_data = {"instance-id": instance, "local-hostname": hostname}
    with tempfile.TemporaryDirectory(dir=staging, prefix=".seed-") as tmp:
        (Path(tmp) / "user-data").write_text("#cloud-config\n" + json.dumps(user_data, indent=2) + "\n")
        (Path(tmp) / "meta-data").write_text(json.dumps(meta_data) + "\n")
        done = subprocess.run(
            ["genisoimage", "-quiet", "-output", str(staging / SEED), "-volid", "cidata", "-joliet", "-rock",
             str(Path(tmp) / "user-data"), str(Path(tmp) / "meta-data")],
            capture_output=True, text=True,
        )
    if done.returncode != 0:
        raise VMError(f"genisoimage failed: {done.stderr.strip()}")


def _opt(value: object) -> str:
    """A value inside a QEMU option list: a comma would start another option (`x.qcow2,file.driver=...`)
    unless doubled, QEMU's escape. Staging paths carry names from the template (a resource group)."""
    return str(value).replace(",", ",,")


def _argv(state: VMState) -> list[str]:
    if state.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg,thread=multi", "-cpu", "qemu64"]
    return [
        shutil.which(QEMU) or QEMU,
        "-name", _opt(f"goldsmith-{state.hostname}"),
        "-machine", "pc", *accel,
        "-smp", str(state.vcpus), "-m", str(state.memory_mib),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-drive", f"file={_opt(state.disk)},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        # A virtio disk: the cloud kernel has no driver for an IDE/AHCI CD-ROM on q35.
        "-drive", f"file={_opt(SEED)},if=virtio,format=raw,readonly=on",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{state.port}-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-rng-pci",
        "-chardev", f"file,id=console,path={CONSOLE_LOG},append=on", "-serial", "chardev:console",
        "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
        "-pidfile", PID_FILE,
        *(["-incoming", f"exec:cat {state.incoming}"] if state.incoming else []),
    ]


# sh starts QEMU in the background and exits at once: QEMU is reparented to init, so it outlives this
# process and is never its zombie; setsid detaches it from our session (no terminal signals). Without job
# control setsid needn't fork, so $! is QEMU's pid.
_LAUNCHER = f'setsid "$@" </dev/null >>{QEMU_LOG} 2>&1 & echo $!'


def _start(state: VMState, attempts: int = 3) -> None:
    """Start QEMU for ``state`` and wait until it answers on QMP; records it in vm.json."""
    if not shutil.which(QEMU):
        raise VMError(f"{QEMU} is not installed (Debian package qemu-system-x86): run `make setup`")
    staging = state.path
    for attempt in range(attempts):
        (staging / QMP_SOCKET).unlink(missing_ok=True)
        (staging / PID_FILE).unlink(missing_ok=True)
        state.argv, state.pid, state.started_at = _argv(state), 0, time.time()
        state.save()  # before QEMU exists: a kill from here on leaves a record (see the module docstring)
        log_offset = (staging / QEMU_LOG).stat().st_size if (staging / QEMU_LOG).exists() else 0
        launched = subprocess.run(["sh", "-c", _LAUNCHER, "sh", *state.argv], cwd=staging,
                                  capture_output=True, text=True, check=True)
        state.pid = int(launched.stdout)
        state.save()
        if _wait_started(state):
            log.info("build VM pid %d (%s, %d vCPU, %d MiB), SSH on 127.0.0.1:%d",
                     state.pid, state.accel, state.vcpus, state.memory_mib, state.port)
            return
        errors = (staging / QEMU_LOG).read_text(errors="replace")[log_offset:]
        if "host forwarding" in errors and attempt + 1 < attempts:
            state.port = _free_port()  # someone took the port between our check and QEMU's bind
        elif state.accel == "kvm" and any(marker in errors for marker in KVM_FAILURES):
            log.warning("QEMU failed under KVM (%s); falling back to TCG", errors.strip().splitlines()[-1])
            state.accel, state.accel_reason = "tcg", "fell back: KVM failed at start"
        else:
            raise VMError(f"QEMU did not start:\n{errors.strip()[-2000:]}")
    raise VMError(f"QEMU did not start after {attempts} attempts; see {staging / QEMU_LOG}")


def _wait_started(state: VMState, timeout: float = 30) -> bool:
    """True once QEMU answers on QMP; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(state.pid):
            return False
        try:
            qmp(state.path, "query-status")
            return True
        except OSError:
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGKILL)
    raise VMError(f"QEMU did not answer on QMP within {timeout:.0f} s; killed it. See {state.path / QEMU_LOG}")


def _launched_pid(state: VMState) -> int:
    """QEMU's pid from its pid file, or (QEMU has not written it yet) the process running exactly the
    recorded argv in the staging dir; 0 if there is none."""
    with contextlib.suppress(OSError, ValueError):
        return int((state.path / PID_FILE).read_text())
    argv = b"\0".join(a.encode() for a in state.argv) + b"\0"
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (proc.name.isdigit() and (proc / "cmdline").read_bytes() == argv
                    and (proc / "cwd").resolve() == state.path.resolve()):
                return int(proc.name)
    return 0


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie doesn't: this host's init may be slow to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def qmp(staging: Path, command: str, timeout: float = 5, arguments: dict | None = None) -> dict:
    """Run one QMP command on the VM's socket and return its result."""
    # Connect through /proc/self/fd: a staging dir path can exceed a socket path's 108 bytes.
    dir_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(f"/proc/self/fd/{dir_fd}/{QMP_SOCKET}")
            stream = sock.makefile("rwb")
            _qmp_read(stream)  # greeting
            for execute, args in (("qmp_capabilities", {}), (command, arguments or {})):
                stream.write(json.dumps({"execute": execute, "arguments": args}).encode() + b"\n")
                stream.flush()
                reply = _qmp_read(stream)
                while "return" not in reply and "error" not in reply:  # skip asynchronous events
                    reply = _qmp_read(stream)
                if "error" in reply:
                    raise VMError(f"QMP {execute} failed: {reply['error'].get('desc')}")
            return reply["return"]
    finally:
        os.close(dir_fd)


def _qmp_read(stream) -> dict:
    line = stream.readline()
    if not line:
        raise ConnectionResetError("QMP connection closed")
    return json.loads(line)


def _ssh_banner(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.settimeout(5)
            return sock.recv(256)
    except OSError:
        return b""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _kvm_failed(staging: Path) -> bool:
    text = (staging / QEMU_LOG).read_text(errors="replace") if (staging / QEMU_LOG).exists() else ""
    return any(marker in text for marker in KVM_FAILURES)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(none)"
