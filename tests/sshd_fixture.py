"""A real OpenSSH sshd on 127.0.0.1 for the communicator and customizer tests.

Sessions log in as a non-root user with passwordless sudo, as on a build VM: the current user, or when the
tests run as root (CI), the dedicated user `goldsmith-test` (created on first use), so a step that forgets
sudo fails here as it would there. Files the sessions and the test both touch go in `shared_tmp`. sshd has
its own host key, client key and config in a temp dir, and is stopped with every session process it forked,
so nothing outlives the tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from goldsmith.communicator import SSHCommunicator

SSHD = "/usr/sbin/sshd"  # sshd refuses to re-exec itself unless started by absolute path
TEST_USER = "goldsmith-test"  # the sessions' user when the tests run as root


@dataclass(frozen=True)
class SSHServer:
    host: str
    port: int
    user: str
    key_path: Path
    pid: int
    dir: Path

    def communicator(self, **kwargs) -> SSHCommunicator:
        return SSHCommunicator(self.host, self.port, self.user, self.key_path, **kwargs)


def session_user() -> str:
    """The user SSH sessions run as: never root (see the module docstring)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.getuid()).pw_name
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        # Password '*': no password login, but not a locked account (sshd without PAM refuses locked ones).
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", TEST_USER], check=True)
    sudoers = Path(f"/etc/sudoers.d/{TEST_USER}")
    if not sudoers.exists():
        sudoers.write_text(f"{TEST_USER} ALL=(ALL) NOPASSWD:ALL\n")
        sudoers.chmod(0o440)
    return TEST_USER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_sshd(env: Mapping[str, str] | None = None, port: int | None = None,
                 client_key: Path | None = None) -> Iterator[SSHServer]:
    """sshd on 127.0.0.1 (`port`, else a free one) accepting `client_key` (else a new key),
    with `env` set in its sessions."""
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.skip(f"{SSHD} or ssh-keygen missing: run `make setup` (apt openssh-server, openssh-client)")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    user = session_user()
    with tempfile.TemporaryDirectory(prefix="goldsmith-sshd-") as tmp:
        d = Path(tmp)
        d.chmod(0o755)  # sshd reads authorized_keys as the session user
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host_key"], check=True)
        if client_key is None:
            client_key = d / "client_key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", client_key], check=True)
        (d / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
        port = port or free_port()
        # A fresh HOME: the host user's dotfiles (e.g. pyenv init in .bashrc, which bash reads
        # under sshd) would slow every command down, and a build VM has none of them.
        (d / "home").mkdir()
        shutil.chown(d / "home", user, pwd.getpwnam(user).pw_gid)
        env = {"HOME": str(d / "home"), **(env or {})}
        (d / "sshd_config").write_text("\n".join([
            f"ListenAddress 127.0.0.1:{port}",
            f"HostKey {d / 'host_key'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            "PidFile none",
            "StrictModes no",  # the temp dir is not a home directory with the modes sshd expects
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin no",
            "Subsystem sftp internal-sftp",
            "SetEnv " + " ".join(f"{name}={value}" for name, value in env.items()),
        ]) + "\n")
        log = open(d / "sshd.log", "wb")
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", d / "sshd_config"], stdout=log, stderr=log)
        try:
            _wait_listening(port, proc, d / "sshd.log")
            yield SSHServer("127.0.0.1", port, user, Path(client_key), proc.pid, d)
        finally:
            _stop(proc)
            log.close()


def _wait_listening(port: int, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {port} within 10s: {log_path.read_text()}")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(proc: subprocess.Popen) -> None:
    # Session processes call setsid(), so a process-group kill would miss them; walk /proc instead.
    leftovers = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(is_running(pid) for pid in leftovers) and time.monotonic() < deadline:
        time.sleep(0.02)


def is_running(pid: int) -> bool:
    """True unless the process is gone or a zombie (dead, waiting for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def sshd() -> Iterator[SSHServer]:
    with running_sshd() as server:
        yield server


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory both the test and the SSH sessions' user may read and write (tmp_path is the
    test user's own)."""
    path = Path(tempfile.mkdtemp(prefix="goldsmith-shared-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def comm(sshd: SSHServer) -> Iterator[SSHCommunicator]:
    with sshd.communicator() as c:
        c.wait_until_ready(timeout=10)
        yield c
