"""The Linux customizers, validators and deprovision step, run over any backend's SSHCommunicator.

The functions take plain AIB field values (`inline`, `scriptUri`, `sha256Checksum`, ...) so that they
know nothing of the template model or of Airflow. They follow Packer's shell and file provisioners,
which AIB runs underneath:

- Shell: inline commands become a script starting `#!/bin/sh -e` (Packer's default inline_shebang),
  so the first failing command fails the customizer; a scriptUri script runs with its own shebang.
  Scripts run as the build user, not root: AIB documents that commands needing root use `sudo`.
- A script whose connection drops before it exits (it rebooted the VM) does not fail: the outcome
  says `rebooted=True` and the caller waits for the VM to come back, like Packer's expect_disconnect.
- File: uploaded as the build user, so the destination's parent directory must exist and be
  writable by that user (AIB: use /tmp, then move the file with sudo in a Shell customizer).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from secrets import token_hex

from goldsmith import confine
from goldsmith.communicator import SSHCommunicator

log = logging.getLogger(__name__)

DEPROVISION_OVERRIDE = "/tmp/DeprovisioningScript.sh"  # AIB's documented override path


class CustomizerError(Exception):
    """A customizer, validator or the deprovision step could not do its job."""


class FetchError(CustomizerError):
    """A scriptUri/sourceUri could not be read: after all retries, or at once when retrying cannot
    help (HTTP 4xx, a missing local file, an unsupported scheme)."""


class ChecksumMismatch(CustomizerError):
    """The source was downloaded but is not the file sha256Checksum names (not worth a retry)."""

    def __init__(self, uri: str, expected: str, actual: str):
        super().__init__(
            f"{_redact(uri)}: sha256 is {actual}, but sha256Checksum says {expected}; "
            f"if the new file is intended, update sha256Checksum (lowercase hex of the file), else fix the source"
        )
        self.uri, self.expected, self.actual = uri, expected, actual


class CustomizerFailed(CustomizerError):
    """A script exited non-zero (or, for validators, could not give a verdict)."""

    kind = "customizer"

    def __init__(self, name: str, exit_code: int | None, tail: Sequence[str], reason: str | None = None):
        self.name, self.exit_code, self.tail = name, exit_code, list(tail)
        message = f"{self.kind} {name!r} failed: {reason or f'exit code {exit_code}'}"
        if self.tail:
            message += "; last output lines:\n" + "\n".join(f"    {line}" for line in self.tail)
        super().__init__(message)


class ValidationFailed(CustomizerFailed):
    kind = "validator"


class DeprovisionFailed(CustomizerFailed):
    kind = "deprovision"


@dataclass(frozen=True)
class ShellOutcome:
    """A script that finished (exit code 0) or dropped the connection (`rebooted`, exit_code None)."""

    exit_code: int | None
    tail: list[str] = field(default_factory=list)
    rebooted: bool = False


# -- fetching sources ---------------------------------------------------------------------------


def fetch(uri: str, sha256: str | None = None, *, attempts: int = 10, backoff: float = 1.0,
          timeout: float = 60.0) -> bytes:
    """Read a file:// or http(s):// source; verify its sha256 (lowercase hex) when given.

    HTTP is retried `attempts` times with exponential backoff (AIB logs "attempt 1 of 10") on
    network errors, 408, 429 and 5xx; other 4xx answers will not change, so they fail at once.
    The query string is redacted in logs and errors: Azure blob SAS tokens live there.
    """
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme == "file":
        data = _read_file_uri(uri, parsed)
    elif parsed.scheme in ("http", "https"):
        data = _download(uri, attempts, backoff, timeout)
    else:
        raise FetchError(f"{_redact(uri)}: unsupported scheme {parsed.scheme!r}; use https://, http:// or file://")
    if sha256:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise ChecksumMismatch(uri, sha256, actual)
    return data


def _read_file_uri(uri: str, parsed: urllib.parse.SplitResult) -> bytes:
    if parsed.netloc not in ("", "localhost"):
        raise FetchError(f"{uri}: file:// URIs must name a local path (file:///path), not host {parsed.netloc!r}")
    path = urllib.request.url2pathname(parsed.path)
    try:
        return confine.read(path, "source")
    except confine.ConfinementError as e:
        raise FetchError(f"{uri}: cannot read {e}") from None


def _download(uri: str, attempts: int, backoff: float, timeout: float) -> bytes:
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(uri, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code not in (408, 429) and e.code < 500:
                raise FetchError(f"{_redact(uri)}: HTTP {e.code} {e.reason}; check the URI and its access "
                                 f"(a SAS token or public read access for blob storage)") from e
            error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, HTTPException, OSError) as e:
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt < attempts:
            delay = min(backoff * 2 ** (attempt - 1), 30.0)
            log.warning("download %s: attempt %d of %d failed (%s); retrying in %.1fs",
                        _redact(uri), attempt, attempts, error, delay)
            time.sleep(delay)
    raise FetchError(f"{_redact(uri)}: download failed after {attempts} attempts; last error: {error}")


def _redact(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    return parts._replace(query="<redacted>").geturl() if parts.query else uri


# -- Shell --------------------------------------------------------------------------------------


def run_shell(
    comm: SSHCommunicator,
    *,
    inline: Sequence[str] | None = None,
    script_uri: str | None = None,
    sha256: str | None = None,
    on_line: Callable[[str], None],
    name: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    secrets: Mapping[str, str] | None = None,
) -> ShellOutcome:
    """The Shell customizer: upload the script to /tmp, run it as the build user.

    `secrets` become environment variables through a 0600 file that the command sources and deletes before the
    script starts: their values are on no command line (`ps`, the communicator's log) and on no disk afterwards.

    Raises CustomizerFailed (exit code and output tail) when it exits non-zero, FetchError or
    ChecksumMismatch when scriptUri cannot be had. The script is removed after success and kept
    after a failure, for debugging on a kept VM.
    """
    if (inline is None) == (script_uri is None):
        raise ValueError(f"Shell {name!r}: give exactly one of inline and scriptUri")
    if inline is not None:
        if sha256:
            raise ValueError(f"Shell {name!r}: sha256Checksum applies to scriptUri only; remove it")
        script = ("#!/bin/sh -e\n" + "\n".join(inline) + "\n").encode()
    else:
        script = fetch(script_uri, sha256)
    path = f"/tmp/goldsmith-{_slug(name)}-{token_hex(4)}.sh"  # the slug needs no shell quoting
    comm.upload(script, path, mode=0o700)
    command = f"{path} && rm -f {path}"
    if secrets:
        env_file = f"{path[:-3]}.env"
        comm.upload(_env_file(secrets), env_file, mode=0o600)
        command = f"set -a; . {env_file}; rm -f {env_file}; set +a; {command}"
    redact = _redactor(secrets)
    result = comm.run(command, on_line=lambda line: on_line(redact(line)), env=env, timeout=timeout)
    tail = [redact(line) for line in result.tail]
    if result.disconnected:
        log.info("Shell %r: the connection dropped before the script exited: treating it as a reboot", name)
        return ShellOutcome(None, tail, rebooted=True)
    if result.exit_code != 0:
        raise CustomizerFailed(name, result.exit_code, tail)
    return ShellOutcome(0, tail)


def _redactor(secrets: Mapping[str, str] | None) -> Callable[[str], str]:
    """Replaces secret values a script printed with `***`. Airflow's masker does this in a task supervisor's log
    pipeline; this also covers what has none (`airflow dags test`) and the output tail kept in error messages."""
    values = sorted((v for v in (secrets or {}).values() if v), key=len, reverse=True)

    def redact(text: str) -> str:
        for value in values:
            text = text.replace(value, "***")
        return text
    return redact


def run_validator_shell(
    comm: SSHCommunicator,
    *,
    inline: Sequence[str] | None = None,
    script_uri: str | None = None,
    sha256: str | None = None,
    on_line: Callable[[str], None],
    name: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    secrets: Mapping[str, str] | None = None,
) -> ShellOutcome:
    """The Shell validator: run_shell, but every failure raises ValidationFailed, a dropped
    connection included: a validator checks the VM, and without an exit status there is no verdict."""
    try:
        outcome = run_shell(comm, inline=inline, script_uri=script_uri, sha256=sha256, on_line=on_line,
                            name=name, env=env, timeout=timeout, secrets=secrets)
    except CustomizerFailed as e:
        raise ValidationFailed(name, e.exit_code, e.tail) from e
    except CustomizerError as e:
        raise ValidationFailed(name, None, [], reason=str(e)) from e
    if outcome.rebooted:
        raise ValidationFailed(name, None, outcome.tail, reason="lost the connection before it exited")
    return outcome


def _env_file(values: Mapping[str, str]) -> bytes:
    for name in values:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"secret name {name!r} is not a valid environment variable name")
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items()).encode()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "shell"


# -- File ---------------------------------------------------------------------------------------


def run_file(comm: SSHCommunicator, *, source_uri: str, destination: str, sha256: str | None = None,
             name: str) -> None:
    """The File customizer: fetch, verify and upload one file to `destination` as the build user.
    Raises CustomizerError saying what is wrong and how to fix it (FetchError, ChecksumMismatch)."""
    if not posixpath.isabs(destination):
        raise CustomizerError(f"File {name!r}: destination {destination!r} must be an absolute path "
                              f"including the file name, e.g. /tmp/{posixpath.basename(destination) or 'file'}")
    data = fetch(source_uri, sha256)
    parent = posixpath.dirname(destination)
    try:
        comm.upload(data, destination)
    except FileNotFoundError as e:
        raise CustomizerError(f"File {name!r}: destination directory {parent} does not exist on the build VM; "
                              f"create it in an earlier Shell customizer (sudo mkdir -p {parent}) "
                              f"or upload to /tmp") from e
    except PermissionError as e:
        raise CustomizerError(f"File {name!r}: {destination} is not writable by the build user {comm.user!r}; "
                              f"upload to /tmp and move it with sudo in a Shell customizer") from e
    log.info("File %r: %s -> %s (%d bytes)", name, _redact(source_uri), destination, len(data))


def run_validator_file(comm: SSHCommunicator, *, source_uri: str, destination: str,
                       sha256: str | None = None, name: str) -> None:
    """The File validator: run_file, but failures raise ValidationFailed."""
    try:
        run_file(comm, source_uri=source_uri, destination=destination, sha256=sha256, name=name)
    except CustomizerError as e:
        raise ValidationFailed(name, None, [], reason=str(e)) from e


# -- a template's Linux steps, by type (what every backend's SSH path runs) -------------------------------


def run_linux_customizer(comm: SSHCommunicator, customizer, *, name: str, on_line: Callable[[str], None],
                         secrets: Mapping[str, str] | None = None) -> bool:
    """A Shell or File customizer (the template model's object); True when the guest is rebooting after it.
    `secrets` (goldsmith.secrets, resolved) reach Shell scripts as environment variables."""
    c = customizer
    if c.type == "File":
        run_file(comm, source_uri=c.sourceUri, destination=c.destination, sha256=c.sha256Checksum or None, name=name)
        return False
    if c.type != "Shell":  # refused at plan time; a guard for plans made by another version
        raise CustomizerError(f"{c.type} customizers need a Windows build VM (the azure backend)")
    outcome = run_shell(comm, inline=c.inline, script_uri=c.scriptUri, sha256=c.sha256Checksum or None,
                        on_line=on_line, name=name, secrets=secrets)
    return outcome.rebooted or going_down(comm)


def run_linux_validator(comm: SSHCommunicator, validator, *, name: str, on_line: Callable[[str], None],
                        secrets: Mapping[str, str] | None = None) -> None:
    """A Shell or File in-VM validator (the template model's object); failures raise ValidationFailed."""
    v = validator
    if v.type == "Shell":
        run_validator_shell(comm, inline=v.inline, script_uri=v.scriptUri, sha256=v.sha256Checksum or None,
                            on_line=on_line, name=name, secrets=secrets)
    else:
        run_validator_file(comm, source_uri=v.sourceUri, destination=v.destination,
                           sha256=v.sha256Checksum or None, name=name)


def going_down(comm: SSHCommunicator) -> bool:
    """`systemctl reboot` returns at once, so a script can end with exit 0 while the guest shuts down."""
    result = comm.run("systemctl is-system-running 2>/dev/null || true")
    return result.disconnected or (result.tail[-1:] == ["stopping"])


# -- deprovision --------------------------------------------------------------------------------

# Run as root with the build user's name as $1. Mirrors `waagent -force -deprovision+user` for images
# without the Azure Linux agent, and runs the agent itself when it is there (what AIB does).
DEPROVISION_SCRIPT = r"""#!/bin/sh
set -eu
build_user="$1"
step() { echo "deprovision: $*"; }

if command -v waagent >/dev/null 2>&1; then
    step "waagent -force -deprovision+user"
    waagent -force -deprovision+user
    export HISTSIZE=0
    rm -f "$0"
    sync
    exit 0
fi

if command -v cloud-init >/dev/null 2>&1; then
    step "cloud-init clean --logs --seed (it runs again, and regenerates host keys, at first boot)"
    cloud-init clean --logs --seed
    # cloud-init's per-instance sudo rule for the build user; first boot writes a new one.
    rm -f /etc/sudoers.d/90-cloud-init-users
elif [ -d /etc/systemd/system ]; then
    step "installing goldsmith-ssh-hostkeys.service: without cloud-init nothing else regenerates host keys"
    cat > /etc/systemd/system/goldsmith-ssh-hostkeys.service <<'EOF'
[Unit]
Description=Generate the SSH host keys removed when the image was generalized
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service sshd.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
    mkdir -p /etc/systemd/system/multi-user.target.wants
    ln -sf ../goldsmith-ssh-hostkeys.service /etc/systemd/system/multi-user.target.wants/
fi

step "removing SSH host keys: every VM from the image must get its own"
rm -f /etc/ssh/ssh_host_*

step "emptying /etc/machine-id: systemd generates a new one at first boot"
if [ -e /etc/machine-id ]; then : > /etc/machine-id; fi
rm -f /var/lib/dbus/machine-id

if command -v apt-get >/dev/null 2>&1; then
    step "cleaning apt lists and package cache"
    apt-get clean
    rm -rf /var/lib/apt/lists/*
fi

step "clearing shell history"
export HISTSIZE=0
rm -f /root/.bash_history

if [ "$build_user" = root ]; then
    step "removing root's authorized_keys (the build key)"
    rm -f /root/.ssh/authorized_keys
else
    # -f: our own SSH session is still logged in as this user. It keeps running (this script is
    # root's), but can no longer sudo: the caller powers the VM off from outside.
    step "deleting build user $build_user and its home directory"
    userdel -f -r "$build_user"
fi

rm -f "$0"
sync
step "done"
"""


def deprovision(
    comm: SSHCommunicator,
    *,
    on_line: Callable[[str], None],
    override_path: str = DEPROVISION_OVERRIDE,
    script: str = DEPROVISION_SCRIPT,
    timeout: float | None = 900,
) -> ShellOutcome:
    """Generalize the VM with sudo: the customizer-provided override script if it exists (AIB's
    /tmp/DeprovisioningScript.sh), else `script` with the build user's name as $1.

    Afterwards the build user may be gone, so the caller powers off from outside (ACPI / ARM), as
    AIB does. `rebooted=True` means the script dropped the connection (it powered the VM off).
    `override_path` and `script` exist for tests; builds use the defaults.
    """
    quoted = shlex.quote(override_path)
    if comm.run(f"test -f {quoted}").exit_code == 0:
        log.info("deprovision: running the override %s instead of the built-in steps", override_path)
        command = f"sudo -n sh {quoted}"
    else:
        path = f"/tmp/goldsmith-deprovision-{token_hex(4)}.sh"
        comm.upload(script.encode(), path, mode=0o700)
        command = f"sudo -n sh {shlex.quote(path)} {shlex.quote(comm.user)}"
    result = comm.run(command, on_line=on_line, timeout=timeout)
    if result.disconnected:
        return ShellOutcome(None, result.tail, rebooted=True)
    if result.exit_code != 0:
        raise DeprovisionFailed("generalize", result.exit_code, result.tail)
    return ShellOutcome(0, result.tail)
