"""Shell/File customizers, validators and deprovision over a real sshd (tests/sshd_fixture.py)."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from goldsmith.customizers import (
    DEPROVISION_SCRIPT,
    ChecksumMismatch,
    CustomizerError,
    CustomizerFailed,
    DeprovisionFailed,
    FetchError,
    ValidationFailed,
    deprovision,
    fetch,
    run_file,
    run_shell,
    run_validator_file,
    run_validator_shell,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Web:
    """A local HTTP server: `files` maps a path to its body; `failures` to status codes answered first."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.failures: dict[str, list[int]] = {}
        self.requests: list[str] = []
        web = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                web.requests.append(path)
                pending = web.failures.get(path)
                status = pending.pop(0) if pending else (200 if path in web.files else 404)
                body = web.files[path] if status == 200 else b"nope"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})


@pytest.fixture
def web():
    w = Web()
    w.thread.start()
    yield w
    w.server.shutdown()
    w.server.server_close()
    w.thread.join()


def remote_tmp_scripts(comm, name):
    return comm.run(f"ls /tmp/goldsmith-{name}-*.sh 2>/dev/null").tail


# -- fetch --------------------------------------------------------------------------------------


def test_fetch_file_uri_with_checksum(tmp_path):
    source = tmp_path / "a script.sh"
    source.write_bytes(b"echo hi\n")
    uri = source.as_uri()
    assert fetch(uri) == b"echo hi\n"
    assert fetch(uri, sha(b"echo hi\n")) == b"echo hi\n"
    with pytest.raises(ChecksumMismatch) as caught:
        fetch(uri, "0" * 64)
    assert (caught.value.uri, caught.value.expected, caught.value.actual) == (uri, "0" * 64, sha(b"echo hi\n"))
    assert uri in str(caught.value) and "0" * 64 in str(caught.value) and sha(b"echo hi\n") in str(caught.value)


def test_fetch_missing_file_and_unknown_scheme(tmp_path):
    with pytest.raises(FetchError, match="cannot read .*missing"):
        fetch((tmp_path / "missing").as_uri())
    with pytest.raises(FetchError, match="unsupported scheme 'ftp'"):
        fetch("ftp://example.com/x.sh")


def test_fetch_http_with_checksum(web):
    web.files["/s.sh"] = b"echo web\n"
    assert fetch(f"{web.url}/s.sh", sha(b"echo web\n")) == b"echo web\n"
    with pytest.raises(ChecksumMismatch):
        fetch(f"{web.url}/s.sh", sha(b"something else"))


def test_fetch_retries_server_errors_then_succeeds(web, caplog):
    web.files["/flaky"] = b"ok"
    web.failures["/flaky"] = [503, 500]
    assert fetch(f"{web.url}/flaky", backoff=0) == b"ok"
    assert len(web.requests) == 3
    assert "attempt 1 of 10 failed (HTTP 503" in caplog.text


def test_fetch_gives_up_after_the_last_attempt(web):
    web.failures["/down"] = [502] * 3
    with pytest.raises(FetchError, match="after 3 attempts; last error: HTTP 502"):
        fetch(f"{web.url}/down", attempts=3, backoff=0)


def test_fetch_fails_fast_on_404_and_redacts_the_query(web):
    with pytest.raises(FetchError, match="HTTP 404") as caught:
        fetch(f"{web.url}/gone.sh?sv=2024&sig=TOPSECRET", backoff=0)
    assert len(web.requests) == 1
    assert "TOPSECRET" not in str(caught.value) and "<redacted>" in str(caught.value)


# -- Shell --------------------------------------------------------------------------------------


def test_inline_runs_as_the_build_user_and_streams(comm):
    lines = []
    outcome = run_shell(comm, inline=["echo first", "id -un"], on_line=lines.append, name="hello")
    assert lines == ["first", comm.user]
    assert outcome.exit_code == 0 and not outcome.rebooted
    assert remote_tmp_scripts(comm, "hello") == []  # removed after success


def test_inline_stops_at_the_first_failing_command(comm):
    # Packer runs inline commands with `#!/bin/sh -e`.
    lines = []
    with pytest.raises(CustomizerFailed) as caught:
        run_shell(comm, inline=["echo one", "sh -c 'exit 3'", "echo never"], on_line=lines.append, name="fails")
    assert lines == ["one"]
    assert caught.value.exit_code == 3 and caught.value.tail == ["one"]
    assert "customizer 'fails' failed: exit code 3" in str(caught.value) and "    one" in str(caught.value)
    assert len(remote_tmp_scripts(comm, "fails")) == 1  # kept for debugging
    comm.run("rm -f /tmp/goldsmith-fails-*.sh")


def test_env_reaches_the_script(comm):
    lines = []
    run_shell(comm, inline=['echo "$API_TOKEN"'], on_line=lines.append, name="env", env={"API_TOKEN": "t0k"})
    assert lines == ["t0k"]


def test_script_uri_from_file_uses_its_own_shebang(comm, shared_tmp):
    script = b"#!/bin/bash\nwords=(a b c)\necho \"${#words[@]} words\"\n"
    (shared_tmp / "s.sh").write_bytes(script)
    lines = []
    run_shell(comm, script_uri=(shared_tmp / "s.sh").as_uri(), sha256=sha(script), on_line=lines.append, name="bash")
    assert lines == ["3 words"]


def test_script_uri_from_http_checksum_ok_and_mismatch(comm, web):
    web.files["/setup.sh"] = b"echo from web\n"
    lines = []
    run_shell(comm, script_uri=f"{web.url}/setup.sh", sha256=sha(b"echo from web\n"),
              on_line=lines.append, name="web")
    assert lines == ["from web"]
    with pytest.raises(ChecksumMismatch, match="setup.sh"):
        run_shell(comm, script_uri=f"{web.url}/setup.sh", sha256="ab" * 32, on_line=lines.append, name="bad")
    assert remote_tmp_scripts(comm, "bad") == []  # nothing was uploaded


def test_shell_needs_exactly_one_source(comm):
    with pytest.raises(ValueError, match="exactly one of inline and scriptUri"):
        run_shell(comm, on_line=print, name="none")
    with pytest.raises(ValueError, match="scriptUri only"):
        run_shell(comm, inline=["true"], sha256="ab" * 32, on_line=print, name="sum")


# Kills the sshd session process (the script's grandparent), as a reboot would, then the shells.
DROP_CONNECTION = "kill -9 $(awk '{print $4}' /proc/$PPID/stat) $PPID $$"


def test_a_script_that_drops_the_connection_counts_as_a_reboot(comm):
    lines = []
    outcome = run_shell(comm, inline=["echo rebooting", "sleep 0.3", DROP_CONNECTION], on_line=lines.append,
                        name="reboot")
    assert outcome.rebooted and outcome.exit_code is None and lines == ["rebooting"]
    comm.wait_until_ready(timeout=10)
    comm.run("rm -f /tmp/goldsmith-reboot-*.sh")


# -- validators ---------------------------------------------------------------------------------


def test_validator_shell_passes_and_fails(comm, shared_tmp):
    assert run_validator_shell(comm, inline=["test -d /tmp"], on_line=print, name="tmp").exit_code == 0
    with pytest.raises(ValidationFailed, match="validator 'missing' failed: exit code 1") as caught:
        run_validator_shell(comm, inline=[f"test -e {shared_tmp}/nope"], on_line=print, name="missing")
    assert caught.value.exit_code == 1
    comm.run("rm -f /tmp/goldsmith-missing-*.sh")
    with pytest.raises(ValidationFailed, match="cannot read"):
        run_validator_shell(comm, script_uri=(shared_tmp / "nope.sh").as_uri(), on_line=print, name="fetch")


def test_validator_that_drops_the_connection_fails(comm):
    with pytest.raises(ValidationFailed, match="lost the connection"):
        run_validator_shell(comm, inline=[DROP_CONNECTION], on_line=print, name="drop")
    comm.wait_until_ready(timeout=10)
    comm.run("rm -f /tmp/goldsmith-drop-*.sh")


# -- File ---------------------------------------------------------------------------------------


def test_file_is_uploaded_after_verification(comm, shared_tmp, web):
    web.files["/motd"] = b"welcome\n"
    destination = shared_tmp / "motd"
    run_file(comm, source_uri=f"{web.url}/motd", destination=str(destination), sha256=sha(b"welcome\n"),
             name="motd")
    assert destination.read_bytes() == b"welcome\n"
    with pytest.raises(ChecksumMismatch):
        run_file(comm, source_uri=f"{web.url}/motd", destination=str(destination), sha256="0" * 64, name="m")


def test_file_parent_directory_must_exist(comm, shared_tmp):
    (shared_tmp / "src").write_text("x")
    missing = shared_tmp / "no" / "such" / "dir"
    with pytest.raises(CustomizerError, match=f"'cfg': destination directory {missing} does not exist.*mkdir -p"):
        run_file(comm, source_uri=(shared_tmp / "src").as_uri(), destination=f"{missing}/app.conf", name="cfg")
    with pytest.raises(CustomizerError, match="must be an absolute path"):
        run_file(comm, source_uri=(shared_tmp / "src").as_uri(), destination="app.conf", name="rel")


def test_file_validator_failure(comm, shared_tmp):
    (shared_tmp / "src").write_text("x")
    with pytest.raises(ValidationFailed, match="validator 'v' failed: .*does not exist"):
        run_validator_file(comm, source_uri=(shared_tmp / "src").as_uri(), destination=f"{shared_tmp}/no/x", name="v")


# -- deprovision --------------------------------------------------------------------------------


def harmless_builtin(marker: Path) -> str:
    # Stands in for DEPROVISION_SCRIPT, which must never run against the test host.
    return f'#!/bin/sh\necho "builtin for $1 as $(id -un)" > {marker}\nrm -f "$0"\n'


def test_deprovision_override_script_is_honoured(comm, shared_tmp):
    override = shared_tmp / "DeprovisioningScript.sh"
    override.write_text(f"echo custom deprovision\ntouch {shared_tmp}/override-ran\n")
    lines = []
    outcome = deprovision(comm, on_line=lines.append, override_path=str(override),
                          script=harmless_builtin(shared_tmp / "builtin-ran"))
    assert outcome.exit_code == 0 and lines == ["custom deprovision"]
    assert (shared_tmp / "override-ran").exists() and not (shared_tmp / "builtin-ran").exists()


def test_deprovision_runs_the_builtin_with_sudo_without_an_override(comm, shared_tmp):
    if shutil.which("sudo") is None:
        pytest.skip("sudo missing: run `make setup`")
    deprovision(comm, on_line=print, override_path=str(shared_tmp / "absent.sh"),
                script=harmless_builtin(shared_tmp / "builtin-ran"))
    assert (shared_tmp / "builtin-ran").read_text() == f"builtin for {comm.user} as root\n"
    assert comm.run("ls /tmp/goldsmith-deprovision-*.sh").exit_code != 0


def test_deprovision_failure(comm, shared_tmp):
    override = shared_tmp / "DeprovisioningScript.sh"
    override.write_text("echo cannot; exit 4\n")
    with pytest.raises(DeprovisionFailed, match="exit code 4") as caught:
        deprovision(comm, on_line=print, override_path=str(override), script=harmless_builtin(shared_tmp / "b"))
    assert caught.value.tail == ["cannot"]


def test_builtin_deprovision_script_parses():
    subprocess.run(["sh", "-n"], input=DEPROVISION_SCRIPT, text=True, check=True)


# The real script runs in a private mount namespace where /etc, /var, /root and /home are overlays
# on a temp dir, so it can delete users, keys and apt lists without touching the host.
NAMESPACE_HARNESS = r"""
set -eu
for d in etc var root home; do
    mkdir -p "$T/$d.upper" "$T/$d.work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$d.upper,workdir=$T/$d.work" "/$d"
done
for d in etc var root home; do mountpoint -q "/$d"; done  # never run the script against the host
useradd -m gsbuild
mkdir -p /home/gsbuild/.ssh /var/lib/apt/lists /var/lib/dbus && touch /home/gsbuild/.ssh/authorized_keys
mkdir -p /etc/ssh && touch /etc/ssh/ssh_host_test_key /etc/ssh/ssh_host_test_key.pub
echo 0123456789abcdef > /etc/machine-id
echo dbus > /var/lib/dbus/machine-id
touch /var/lib/apt/lists/some_Packages /root/.bash_history
mkdir -p /etc/sudoers.d && echo 'gsbuild ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-cloud-init-users
cp "$T/deprovision.sh" "$T/run.sh"
sh "$T/run.sh" gsbuild
echo "user=$(getent passwd gsbuild || echo gone)"
echo "home=$(test -e /home/gsbuild && echo kept || echo gone)"
echo "hostkeys=$(ls /etc/ssh | grep -c ssh_host_ || true)"
echo "machine-id=$(wc -c < /etc/machine-id)"
echo "dbus-id=$(test -e /var/lib/dbus/machine-id && echo kept || echo gone)"
echo "apt-lists=$(ls /var/lib/apt/lists | grep -c Packages || true)"
echo "history=$(test -e /root/.bash_history && echo kept || echo gone)"
echo "sudoers=$(test -e /etc/sudoers.d/90-cloud-init-users && echo kept || echo gone)"
echo "unit=$(test -e /etc/systemd/system/multi-user.target.wants/goldsmith-ssh-hostkeys.service && echo on || echo off)"
echo "script=$(test -e "$T/run.sh" && echo kept || echo gone)"
"""


@pytest.mark.parametrize("with_cloud_init", [False, True], ids=["no-cloud-init", "cloud-init"])
def test_builtin_deprovision_script_in_a_namespace(tmp_path, with_cloud_init):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    (tmp_path / "deprovision.sh").write_text(DEPROVISION_SCRIPT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if with_cloud_init:
        (bin_dir / "cloud-init").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/cloud-init-args\n')
        (bin_dir / "cloud-init").chmod(0o755)
    env = {**os.environ, "T": str(tmp_path), "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespaces here: {probe.stderr.decode().strip()}")
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", NAMESPACE_HARNESS],
                         env=env, capture_output=True, text=True, timeout=60)
    if "overlay" in run.stderr and run.returncode != 0:
        pytest.skip(f"overlayfs unavailable: {run.stderr.strip()}")
    assert run.returncode == 0, run.stdout + run.stderr
    state = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line and " " not in line)
    assert state == {
        "user": "gone", "home": "gone", "hostkeys": "0", "machine-id": "0", "dbus-id": "gone",
        "apt-lists": "0", "history": "gone", "script": "gone",
        "sudoers": "gone" if with_cloud_init else "kept",
        "unit": "off" if with_cloud_init else "on",
    }
    if with_cloud_init:
        assert (tmp_path / "cloud-init-args").read_text() == "clean --logs --seed\n"
