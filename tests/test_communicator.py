"""SSHCommunicator against a real OpenSSH sshd on 127.0.0.1 (tests/sshd_fixture.py)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from goldsmith.communicator import CommandTimeout, CommunicatorError, NotReady, SSHCommunicator
from sshd_fixture import _descendants, free_port, is_running, running_sshd, session_user


def test_lines_are_delivered_as_they_arrive(comm):
    arrivals = []
    result = comm.run("echo one; sleep 0.6; echo two; sleep 0.6; echo three",
                      on_line=lambda line: arrivals.append((time.monotonic(), line)))
    finished = time.monotonic()
    assert [line for _, line in arrivals] == ["one", "two", "three"]
    assert finished - arrivals[0][0] > 1.0  # "one" came while the command was still running
    assert result.exit_code == 0 and not result.disconnected


def test_stdout_and_stderr_are_combined_in_order(comm):
    lines = []
    comm.run("echo out; sleep 0.1; echo err >&2; sleep 0.1; echo out2", on_line=lines.append)
    assert lines == ["out", "err", "out2"]


def test_exit_code_and_tail_of_last_50_lines(comm):
    result = comm.run("seq 1 120; exit 7")
    assert result.exit_code == 7
    assert result.tail == [str(i) for i in range(71, 121)]


def test_crlf_and_unterminated_last_line(comm):
    lines = []
    comm.run(r"printf 'a\r\nb'", on_line=lines.append)
    assert lines == ["a", "b"]


def test_env_is_exported_but_its_values_are_not_logged(comm, caplog):
    caplog.set_level(logging.DEBUG)
    result = comm.run('printf "%s\\n" "$TOKEN"', env={"TOKEN": "s3cr3t 'quoted' $value"})
    assert result.tail == ["s3cr3t 'quoted' $value"]
    assert "TOKEN" in caplog.text and "s3cr3t" not in caplog.text
    with pytest.raises(ValueError, match="not-a-name"):
        comm.run("true", env={"not-a-name": "x"})


def test_upload_and_download(comm, shared_tmp):
    target = shared_tmp / "uploaded.bin"
    comm.upload(b"\x00payload\n", str(target), mode=0o640)
    assert target.read_bytes() == b"\x00payload\n"
    assert target.stat().st_mode & 0o777 == 0o640
    local = shared_tmp / "local.txt"
    local.write_text("from a path")
    comm.upload(local, str(shared_tmp / "copy.txt"))
    assert comm.download(str(shared_tmp / "copy.txt")) == b"from a path"


def test_file_errors_name_the_remote_path(comm, shared_tmp):
    with pytest.raises(FileNotFoundError, match="no-such-dir/x"):
        comm.upload(b"x", str(shared_tmp / "no-such-dir" / "x"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        comm.download(str(shared_tmp / "missing.txt"))


def test_dropped_connection_is_reported_and_reconnect_works(comm):
    # $PPID is the sshd session process: killing it is what a reboot does to the connection.
    result = comm.run("echo before; sleep 0.3; kill -9 $PPID $$")
    assert result.disconnected and result.exit_code is None
    assert result.tail == ["before"]
    with pytest.raises(CommunicatorError, match="wait_until_ready"):
        comm.run("true")
    comm.wait_until_ready(timeout=10)
    assert comm.run("true").exit_code == 0


def test_command_killed_by_a_signal_is_not_a_disconnect(comm):
    result = comm.run("kill -9 $$")
    assert result.exit_code == -1 and not result.disconnected
    assert comm.run("true").exit_code == 0


def test_unresponsive_peer_is_detected_as_a_disconnect(sshd):
    # A stopped session process keeps the TCP connection open but never answers, like a VM that
    # was reset behind a port forward.
    with sshd.communicator(connect_timeout=1, alive_interval=0.5) as comm:
        comm.wait_until_ready(timeout=10)
        before = set(_descendants(sshd.pid))
        try:
            result = comm.run("kill -STOP $PPID; exec sleep 30", timeout=20)
            assert result.disconnected
        finally:
            kill_new_processes(sshd, before)


def kill_new_processes(sshd, before):
    for pid in set(_descendants(sshd.pid)) - before:
        os.kill(pid, signal.SIGKILL)


def test_timeout_raises_with_tail_and_keeps_the_connection(sshd, comm):
    before = set(_descendants(sshd.pid))
    with pytest.raises(CommandTimeout, match="within 1s") as caught:
        comm.run("echo started; exec sleep 30", timeout=0.8)
    assert caught.value.tail == ["started"]
    assert comm.run("true").exit_code == 0
    kill_new_processes(sshd, before)  # closing the channel does not stop the remote command


def test_host_key_fingerprint_is_logged(sshd, caplog):
    caplog.set_level(logging.INFO, logger="goldsmith.communicator")
    with sshd.communicator() as comm:
        comm.wait_until_ready(timeout=10)
    expected = subprocess.run(["ssh-keygen", "-l", "-f", sshd.dir / "host_key.pub"],
                              capture_output=True, text=True, check=True).stdout.split()[1]
    assert expected in caplog.text


def test_not_ready_when_the_server_keeps_resetting(sshd):
    # Accepts and drops connections, as sshd does while cloud-init restarts it.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stop = threading.Event()

        def reset_all():
            listener.settimeout(0.1)
            while not stop.is_set():
                try:
                    listener.accept()[0].close()
                except TimeoutError:
                    pass

        thread = threading.Thread(target=reset_all)
        thread.start()
        try:
            comm = SSHCommunicator("127.0.0.1", listener.getsockname()[1], sshd.user, sshd.key_path)
            started = time.monotonic()
            with pytest.raises(NotReady, match=r"attempts\); last error: .*banner") as caught:
                comm.wait_until_ready(timeout=2)
            assert time.monotonic() - started < 4
            assert sshd.user in str(caught.value)
        finally:
            stop.set()
            thread.join()


def test_wait_until_ready_retries_until_sshd_listens(tmp_path):
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    port = free_port()
    up, done = threading.Event(), threading.Event()

    def boot_later():
        time.sleep(0.5)
        with running_sshd(port=port, client_key=key):
            up.set()
            done.wait(20)

    thread = threading.Thread(target=boot_later)
    thread.start()
    try:
        with SSHCommunicator("127.0.0.1", port, session_user(), key) as comm:
            comm.wait_until_ready(timeout=15)
            assert up.is_set()
            assert comm.run("true").exit_code == 0
    finally:
        done.set()
        thread.join()


def test_waits_for_cloud_init_when_present(shared_tmp, caplog):
    bin_dir = shared_tmp / "bin"
    bin_dir.mkdir()
    calls = shared_tmp / "calls"
    fake = bin_dir / "cloud-init"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "status: degraded done"\nexit 2\n')
    fake.chmod(0o755)
    with running_sshd(env={"PATH": f"{bin_dir}:/usr/bin:/bin"}) as server:
        with server.communicator() as comm:
            comm.wait_until_ready(timeout=10)
    assert calls.read_text() == "status --wait\n"
    assert "cloud-init finished with exit code 2: status: degraded done" in caplog.text
    with running_sshd(env={"PATH": f"{bin_dir}:/usr/bin:/bin"}) as server:
        with server.communicator() as comm:
            comm.wait_until_ready(timeout=10, cloud_init=False)  # a later step of the same boot
            assert comm.run("true").exit_code == 0
    assert calls.read_text() == "status --wait\n"


def test_unreadable_key_is_a_clear_error(tmp_path):
    comm = SSHCommunicator("127.0.0.1", 22, "root", tmp_path / "nope")
    with pytest.raises(CommunicatorError, match=f"{tmp_path / 'nope'}: cannot be loaded"):
        comm.wait_until_ready(timeout=1)


def test_the_sshd_fixture_leaves_no_process_or_directory_behind():
    with running_sshd() as server:
        with server.communicator() as comm:
            comm.wait_until_ready(timeout=10)
            comm.run("true")
            processes = [server.pid, *_descendants(server.pid)]
            assert len(processes) > 1  # the session is alive while we are connected
    assert not server.dir.exists()
    assert not [pid for pid in processes if is_running(pid)]
