"""The guest of a Linux VM in the double: a real OpenSSH sshd in a private mount namespace.

The "VM" is a copy-on-write view of this host: /etc, /var, /root, /home, /usr, /opt and /srv are
overlays whose upper layers live in the VM's directory (its OS disk, kept across deallocate and
start), and /tmp is private. On first boot it does what cloud-init/waagent do on Azure: creates
`adminUsername` with the `osProfile` public keys and passwordless sudo. So customizers, sudo and even
the deprovision step (which deletes that user and the host keys) run for real, and the host is never
touched. sshd listens on port 22 of each of the VM's addresses (loopback 127.x.y.z, one per NIC and
public IP), so a backend reaches it exactly as it would reach an Azure VM: `ssh adminUsername@ipAddress`.

Needs root (port 22, mounts, useradd) and `unshare`; `supported()` says why not when it can't.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd refuses to re-exec itself unless started by absolute path
OVERLAID = ("etc", "var", "root", "home", "usr", "opt", "srv")
STATE = "/etc/goldsmith-armdouble"  # inside the VM: sshd's config and host key, on the VM's own disk

# Runs as root inside the new mount namespace, then becomes the VM's sshd.
BOOT = r"""
set -eu
for d in $OVERLAID; do
    mkdir -p "$VM/upper/$d" "$VM/work/$d"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$VM/upper/$d,workdir=$VM/work/$d" "/$d"
done
for d in $OVERLAID; do mountpoint -q "/$d"; done  # never provision against the host's own files
if [ ! -e "$STATE/provisioned" ]; then
    mkdir -p "$STATE"
    ssh-keygen -q -t ed25519 -N "" -f "$STATE/host_key"
    useradd -m -s /bin/bash -p "*" "$ADMIN_USER"  # "*": no password, but not locked (sshd refuses "!")
    install -d -m 700 -o "$ADMIN_USER" -g "$ADMIN_USER" "/home/$ADMIN_USER/.ssh"
    printf '%s\n' "$PUBLIC_KEYS" > "/home/$ADMIN_USER/.ssh/authorized_keys"
    chown "$ADMIN_USER:$ADMIN_USER" "/home/$ADMIN_USER/.ssh/authorized_keys"
    mkdir -p /etc/sudoers.d
    echo "$ADMIN_USER ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/90-cloud-init-users
    # A customizer that reboots or powers off must not take the host down with it.
    for cmd in reboot shutdown poweroff halt; do
        rm -f "/usr/sbin/$cmd"  # a symlink to systemctl: writing through it would replace systemctl
        printf '#!/bin/sh\necho "ARM double: %s is not simulated in this VM" >&2\nexit 1\n' "$cmd" > "/usr/sbin/$cmd"
        chmod 755 "/usr/sbin/$cmd"
    done
    touch "$STATE/provisioned"
fi
cp "$VM/sshd_config" "$STATE/sshd_config"
mkdir -p "$VM/tmp" && chmod 1777 "$VM/tmp" && mount --bind "$VM/tmp" /tmp
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e -f "$STATE/sshd_config"
"""


def supported() -> str | None:
    """None if VMs can get their sshd here, else the reason they can't."""
    if os.geteuid() != 0:
        return "VM SSH endpoints need root (port 22, mount namespaces, useradd)"
    for tool in (SSHD, "/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/ssh-keygen", "/usr/sbin/useradd"):
        if not os.path.exists(tool):
            return f"{tool} missing: run `make setup` (openssh-server, util-linux, passwd)"
    return None


def allocate_address(taken: set[str]) -> str:
    """A free loopback address whose port 22 is bindable (all of 127/8 reaches `lo` on Linux).
    Random, so two doubles on one host (parallel test runs) are unlikely to meet."""
    while True:
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        if address in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((address, 22))
            except OSError:
                continue
        taken.add(address)
        return address


def _namespace(pid: int) -> str | None:
    """The mount namespace a process is in, or None if it is gone (or a zombie)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _kill_namespace(namespace: str) -> None:
    """SIGKILL every process in a mount namespace, and wait until they are all gone (a dying process
    leaves the namespace before it exits: the last one unmounts the overlays)."""
    killed: set[int] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = {int(p) for p in os.listdir("/proc") if p.isdigit() and _namespace(int(p)) == namespace}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= pids
        if not pids and not any(_alive(pid) for pid in killed):
            return
        time.sleep(0.02)
    raise RuntimeError(f"processes of the VM's namespace {namespace} survived SIGKILL for 10s")


def _alive(pid: int) -> bool:
    """Not gone, and not a zombie (dead, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VmHost:
    """One Linux VM's guest. `directory` is its disk; `addresses` the IPs its sshd listens on (those its
    NSGs let SSH reach; read at every start)."""

    def __init__(self, directory: Path, admin_user: str, public_keys: list[str], addresses: list[str]):
        self.directory = directory
        self.admin_user = admin_user
        self.public_keys = public_keys
        self.addresses = addresses
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        if self._proc:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # Reachable nowhere (NSGs): sshd still runs, Run Command needs the guest, on a port nobody is told.
        self._listen = [(address, 22) for address in self.addresses] or [("127.0.0.1", _free_port())]
        (self.directory / "sshd_config").write_text("\n".join([
            *(f"ListenAddress {address}:{port}" for address, port in self._listen),
            f"HostKey {STATE}/host_key",
            "PidFile none",
            "StrictModes no",  # the home directories live on overlays of a temp dir
            "UsePAM no",
            "PermitRootLogin no",  # as on Azure: log in as adminUsername, then sudo
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "Subsystem sftp internal-sftp",
        ]) + "\n")
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "VM": str(self.directory),
            "OVERLAID": " ".join(d for d in OVERLAID if os.path.isdir(f"/{d}")),
            "STATE": STATE,
            "ADMIN_USER": self.admin_user,
            "PUBLIC_KEYS": "\n".join(self.public_keys),
        }
        self._log = open(self.directory / "sshd.log", "ab")
        self._proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", BOOT],
            env=env, stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"VM sshd exited with {self._proc.returncode}: {self.log_text()}")
            try:
                for address in self._listen:
                    socket.create_connection(address, timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"VM sshd did not listen on {self._listen} within 20s: {self.log_text()}")

    def log_text(self) -> str:
        return (self.directory / "sshd.log").read_text(errors="replace")

    def stop(self) -> None:
        """Power off: every process in the VM's mount namespace (sshd, sessions, what they left running,
        Run Command scripts) is killed, and the namespace and its mounts go with them."""
        if self._proc is None:
            return
        namespace = _namespace(self._proc.pid)
        self._proc.kill()
        self._proc.wait()
        if namespace and namespace != _namespace(os.getpid()):  # sshd may have died before unshare did
            _kill_namespace(namespace)
        self._log.close()
        self._proc = self._log = None

    def destroy(self) -> None:
        """Delete the VM: power off and remove its disk (the overlays' upper layers)."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def run_script(self, script: str, env: dict[str, str], timeout: float) -> tuple[int, str, str]:
        """Run a shell script as root inside the VM (Run Command's RunShellScript); TimeoutError if it
        runs longer than `timeout`. Powering off the VM kills it."""
        if self._proc is None:
            raise RuntimeError("VM is not running")
        exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
        proc = subprocess.Popen(
            ["nsenter", "--target", str(self._proc.pid), "--mount", "--", "/bin/bash", "-s"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"},
            start_new_session=True)
        try:
            stdout, stderr = proc.communicate(exports + "cd /root\n" + script, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TimeoutError(f"script ran longer than {timeout}s") from None
        return proc.returncode, stdout, stderr
