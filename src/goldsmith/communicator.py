"""SSH to a build VM: wait for it to boot, run commands with streamed output, copy files.

Every backend (local QEMU, Azure) reaches its build VM through this one class, so the customizers,
validators and the deprovision step are written once (see `goldsmith.customizers`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

log = logging.getLogger(__name__)

TAIL_LINES = 50
# A line longer than this (binary output, a progress bar without newlines) is delivered in pieces
# so that a chatty command cannot grow memory without bound.
MAX_LINE_BYTES = 64 * 1024
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CommunicatorError(Exception):
    """The build VM could not be reached or did not behave as SSH expects."""


class NotReady(CommunicatorError):
    """wait_until_ready() ran out of time."""


class CommandTimeout(CommunicatorError):
    """A command ran longer than its timeout; `tail` holds its last output lines."""

    def __init__(self, message: str, tail: list[str]):
        super().__init__(message)
        self.tail = tail


@dataclass(frozen=True)
class CommandResult:
    """How a command ended. `exit_code` is None when `disconnected`; -1 when killed by a signal
    (paramiko does not report exit-signal)."""

    exit_code: int | None
    tail: list[str] = field(default_factory=list)
    disconnected: bool = False


class _AcceptAndLogHostKey(paramiko.MissingHostKeyPolicy):
    """Accept any host key, but log its fingerprint.

    Build VMs are ephemeral: each one generates fresh host keys at first boot (cloud-init may even
    regenerate them and restart sshd while we connect), so there is no known key to pin against.
    The fingerprint in the task log lets an operator compare it with the VM's console output.
    """

    def missing_host_key(self, client, hostname, key):
        log.info("accepting host key of %s: %s %s", hostname, key.get_name(), key.fingerprint)


class SSHCommunicator:
    """One SSH connection to a build VM, as the build user.

    Use as a context manager; call wait_until_ready() before anything else, and again after a
    command reported `disconnected` (the guest rebooted).
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        key_path: str | os.PathLike,
        *,
        connect_timeout: float = 10.0,
        alive_interval: float = 30.0,
    ):
        self.host = host
        self.port = port
        self.user = user
        self.key_path = Path(key_path)
        self.connect_timeout = connect_timeout
        # After this long without output, run() checks that the peer still answers: a VM that is
        # reset hard (or a NAT port forward whose guest vanished) never closes the TCP connection.
        self.alive_interval = alive_interval
        self._client: paramiko.SSHClient | None = None

    def __enter__(self) -> SSHCommunicator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SSHCommunicator({self.user}@{self.host}:{self.port})"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- connecting ---------------------------------------------------------------------------

    def wait_until_ready(self, timeout: float, *, cloud_init: bool = True) -> None:
        """Connect (retrying while the VM boots), then wait for cloud-init to finish, if present
        (``cloud_init=False``: the caller knows it finished during this boot).

        Refused, reset and dropped connections and failed logins are retried until `timeout`
        seconds have passed: during first boot sshd may not listen yet, cloud-init may not have
        installed the build user's key yet, and cloud-init restarts sshd when it regenerates keys.
        """
        key = self._load_key()
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                self._connect(key)
                if cloud_init:
                    self._wait_for_cloud_init(deadline)
                return
            except CommandTimeout as e:
                raise NotReady(f"{self}: cloud-init did not finish within {timeout:.0f}s: "
                               f"{' | '.join(e.tail[-5:])}") from e
            except (OSError, EOFError, paramiko.SSHException, CommunicatorError) as e:
                self.close()
                delay = min(2.0 ** (attempt - 1), 5.0)
                if time.monotonic() + delay > deadline:
                    raise NotReady(
                        f"{self}: not reachable over SSH within {timeout:.0f}s ({attempt} attempts); "
                        f"last error: {type(e).__name__}: {e}. Check that the VM booted (console log), "
                        f"that port {self.port} is forwarded/allowed, and that user {self.user!r} "
                        f"accepts the key {self.key_path}"
                    ) from e
                log.info("%s: not ready (attempt %d: %s: %s); retrying in %.0fs",
                         self, attempt, type(e).__name__, e, delay)
                time.sleep(delay)

    def _load_key(self) -> paramiko.PKey:
        try:
            return paramiko.PKey.from_path(self.key_path)
        except (OSError, paramiko.SSHException) as e:
            raise CommunicatorError(
                f"SSH private key {self.key_path}: cannot be loaded ({e}); it must be an unencrypted "
                f"OpenSSH or PEM private key file"
            ) from e

    def _connect(self, key: paramiko.PKey) -> None:
        self.close()
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_AcceptAndLogHostKey())
        try:
            client.connect(
                self.host,
                self.port,
                username=self.user,
                pkey=key,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                look_for_keys=False,
                allow_agent=False,
            )
        except BaseException:
            client.close()
            raise
        self._client = client

    def _wait_for_cloud_init(self, deadline: float) -> None:
        # Customizing while cloud-init still runs races with it (apt locks, users, sshd restarts).
        # /run/cloud-init/result.json appears when cloud-init is done with this boot, /run/cloud-init/disabled
        # when it is off for this boot (/run is emptied at boot); testing them first saves `cloud-init status`,
        # which takes seconds to start under emulation.
        script = ("test -f /run/cloud-init/result.json -o -f /run/cloud-init/disabled && exit 0; "
                  "if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait; else exit 100; fi")
        result = self.run(script, on_line=lambda line: log.info("cloud-init: %s", line),
                          timeout=max(deadline - time.monotonic(), 1.0))
        if result.disconnected:
            raise CommunicatorError("connection dropped while waiting for cloud-init (reboot or sshd restart)")
        if result.exit_code not in (0, 100):
            # 1 = a cloud-init module failed, 2 = recoverable errors/deprecations. The source image's
            # cloud-init config is not ours to fix, and the VM is reachable, so carry on but say so.
            log.warning("%s: cloud-init finished with exit code %s: %s",
                        self, result.exit_code, " | ".join(result.tail[-5:]))

    @property
    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport() if self._client else None
        if transport is None or not transport.is_active():
            raise CommunicatorError(f"{self}: not connected; call wait_until_ready() first")
        return transport

    def _peer_alive(self) -> bool:
        """Opening a channel needs a round trip to the server, and (unlike keepalives) has a timeout."""
        try:
            self._transport.open_session(timeout=self.connect_timeout).close()
            return True
        except (CommunicatorError, paramiko.SSHException, OSError, EOFError):
            return False

    # -- commands -----------------------------------------------------------------------------

    def run(
        self,
        command: str,
        *,
        on_line: Callable[[str], None] | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        """Run `command` with the user's login shell; deliver each output line (stdout and stderr
        combined) to `on_line` as it arrives.

        On `timeout` the channel is closed and CommandTimeout raised; the remote process may
        live on. `env` is exported before the command. Its values are never logged; they are, however,
        part of the command line inside the (single-tenant) build VM, since sshd accepts only
        a few variables through the SSH protocol (AcceptEnv).
        """
        log.info("%s: run: %s%s", self, command, f" (env: {', '.join(env)})" if env else "")
        try:
            channel = self._transport.open_session(timeout=self.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            self.close()
            raise CommunicatorError(f"{self}: connection lost before the command started ({e}); "
                                    f"call wait_until_ready() to reconnect") from e
        try:
            channel.set_combine_stderr(True)
            channel.settimeout(1.0)
            channel.exec_command(_with_env(command, env or {}))
            return self._collect(channel, on_line or (lambda line: None), timeout)
        finally:
            channel.close()

    def _collect(self, channel: paramiko.Channel, on_line: Callable[[str], None],
                 timeout: float | None) -> CommandResult:
        tail: deque[str] = deque(maxlen=TAIL_LINES)

        def emit(raw: bytes) -> None:
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            tail.append(line)
            on_line(line)

        deadline = None if timeout is None else time.monotonic() + timeout
        last_heard = time.monotonic()
        pending = b""
        while True:
            try:
                data = channel.recv(32768)
            except socket.timeout:
                data = None
            now = time.monotonic()
            if data:
                last_heard = now
                *lines, pending = (pending + data).split(b"\n")
                for raw in lines:
                    emit(raw)
                while len(pending) > MAX_LINE_BYTES:
                    emit(pending[:MAX_LINE_BYTES])
                    pending = pending[MAX_LINE_BYTES:]
                continue
            if data == b"" and channel.status_event.wait(0.1):
                break  # end of output and the channel closed or reported its exit status
            if deadline is not None and now > deadline:
                if pending:
                    emit(pending)
                raise CommandTimeout(f"{self}: command did not finish within {timeout:.0f}s", list(tail))
            if now - last_heard > self.alive_interval:
                if not self._peer_alive():
                    self.close()
                    break
                last_heard = now
        if pending:
            emit(pending)
        if channel.exit_status != -1:
            return CommandResult(channel.exit_status, list(tail))
        # No exit status: the connection dropped (reboot), or sshd reported a signal, which
        # paramiko ignores. Only the former leaves the server unable to answer.
        if self._client is not None and self._peer_alive():
            return CommandResult(-1, list(tail))
        self.close()
        log.info("%s: connection dropped before the command reported an exit status", self)
        return CommandResult(None, list(tail), disconnected=True)

    # -- files --------------------------------------------------------------------------------

    def upload(self, data_or_path: bytes | str | os.PathLike, remote_path: str, mode: int | None = None) -> None:
        """Copy bytes (or a local file, given its path) to `remote_path` over SFTP.

        The parent directory must exist; FileNotFoundError/PermissionError name the remote path.
        """
        data = data_or_path if isinstance(data_or_path, bytes) else Path(data_or_path).read_bytes()
        log.info("%s: upload %d bytes to %s", self, len(data), remote_path)
        with self._sftp() as sftp:
            try:
                with sftp.open(remote_path, "wb") as f:
                    if mode is not None:  # before the content: a secret file is never readable by others
                        f.chmod(mode)
                    f.set_pipelined(True)
                    f.write(data)
            except FileNotFoundError as e:
                raise FileNotFoundError(e.errno, f"{remote_path}: no such directory on {self.host}") from e
            except PermissionError as e:
                raise PermissionError(e.errno, f"{remote_path}: not writable by {self.user}") from e

    def download(self, remote_path: str) -> bytes:
        with self._sftp() as sftp:
            buffer = io.BytesIO()
            try:
                sftp.getfo(remote_path, buffer)
            except FileNotFoundError as e:
                raise FileNotFoundError(e.errno, f"{remote_path}: no such file on {self.host}") from e
            return buffer.getvalue()

    def _sftp(self) -> paramiko.SFTPClient:
        return paramiko.SFTPClient.from_transport(self._transport)


def _with_env(command: str, env: Mapping[str, str]) -> str:
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"environment variable name {name!r} is not a valid shell identifier")
    exports = "".join(f"export {name}={shlex.quote(value)}; " for name, value in env.items())
    return exports + command


def create_build_key(key: Path) -> None:
    """An ed25519 key pair for one build at `key` (and `key`.pub), unless it exists. The private key is created
    0600 (O_EXCL: never readable by others, not even before a chmod) and renamed into place whole, so a retry
    finds either no key or a complete one."""
    if key.exists():
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    tmp = key.with_suffix(f".tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    key.with_suffix(".pub").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" goldsmith-build\n")
    tmp.rename(key)
