"""A real Airflow for tests: a throwaway PostgreSQL cluster, the four Airflow components as separate processes,
and a small client for Airflow's public REST API.

Every process started here, and every process they start (task processes, build VMs), carries the environment
variable LIVE_MARKER, so a test can prove that nothing outlived it — whatever process group a child moved to.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
from cryptography.fernet import Fernet

from goldsmith.airflow_env import AIRFLOW, prepare

LIVE_MARKER = "GOLDSMITH_LIVE_AIRFLOW"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
TERMINAL_RUN_STATES = {"success", "failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment has LIVE_MARKER=marker."""
    wanted = f"{LIVE_MARKER}={marker}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if wanted in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return found


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls check() until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(3)
    return result


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def postgres(marker: str) -> Iterator[str]:
    """A PostgreSQL cluster of Debian's package in a temp dir; yields the SQLAlchemy URL of an empty database.

    The cluster runs as the `postgres` user (initdb refuses root); its directory is outside pytest's tmp_path,
    whose parents only root may enter.
    """
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    assert versions, "PostgreSQL is not installed: apt-get install postgresql (make setup does)"
    bin_dir = versions[-1].parent
    root = Path(tempfile.mkdtemp(prefix="goldsmith-pg-"))
    shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    env = {**os.environ, LIVE_MARKER: marker}

    def as_postgres(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], env=env, check=True, cwd=root,
                       stdout=subprocess.DEVNULL)

    try:
        as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
        # fsync off: a throwaway cluster need not survive a power cut, and builds compete for the disk.
        as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-w", "start",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off")
        as_postgres(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "airflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/airflow"
    finally:
        if (data / "postmaster.pid").exists():
            as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root)


def airflow_settings(db_url: str, api_port: int) -> dict[str, str]:
    """What the components must agree on: the DB, the executor, the Execution API's address and the secrets."""
    return {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        # The scheduler's and triggerer's log servers have fixed default ports: another Airflow may hold them.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
    }


@contextmanager
def airflow_components(env: dict[str, str], logs: Path, api_port: int) -> Iterator[AirflowApi]:
    """Migrates the DB, starts api-server, scheduler, dag-processor and triggerer, and yields an authenticated
    REST client. Each component is its own process group, logging to logs/<component>.log."""
    prepare(env)
    logs.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        for component in COMPONENTS:
            args = [AIRFLOW, component]
            if component == "api-server":
                args += ["--host", "127.0.0.1", "--port", str(api_port)]
            log = stack.enter_context(open(logs / f"{component}.log", "w"))
            process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            stack.callback(stop_group, process)
        yield AirflowApi.connect(f"http://127.0.0.1:{api_port}", Path(env["AIRFLOW_HOME"]), logs)


def stop_group(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the process's group (Airflow shuts its workers down on it), then SIGKILL to what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break  # the whole group is gone
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    process.wait()


class AirflowApi:
    """The public REST API (/api/v2), with a JWT from POST /auth/token."""

    def __init__(self, client: httpx.Client):
        self.client = client

    @classmethod
    def connect(cls, base_url: str, airflow_home: Path, logs: Path, timeout: float = 180) -> AirflowApi:
        passwords = airflow_home / "simple_auth_manager_passwords.json.generated"
        client = httpx.Client(base_url=base_url, timeout=120)  # slow answers while VMs emulate on every core
        deadline = time.monotonic() + timeout
        while True:
            try:
                if passwords.exists() and client.get("/api/v2/monitor/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"the API server did not answer in {timeout} s:\n" + tail(
                logs / "api-server.log")
            time.sleep(2)
        password = json.loads(passwords.read_text())["admin"]
        response = client.post("/auth/token", json={"username": "admin", "password": password})
        assert response.status_code in (200, 201), response.text
        client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        return cls(client)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, "/api/v2" + path, **kwargs)
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: dict[str, Any], **params: Any) -> Any:
        return self.request("PATCH", path, json=body, params=params)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        """Until the dag-processor has parsed the DAG and the API knows it."""
        deadline = time.monotonic() + timeout
        while self.client.get(f"/api/v2/dags/{dag_id}").status_code != 200:
            assert time.monotonic() < deadline, f"DAG {dag_id} did not appear in {timeout} s"
            time.sleep(3)

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.get(f"/dags/{dag_id}/dagRuns", order_by="run_after")["dag_runs"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict[str, Any]:
        """Polls the run until it ends; a failed run's assertion carries its failed tasks' logs."""
        deadline = time.monotonic() + timeout
        while (run := self.get(f"/dags/{dag_id}/dagRuns/{run_id}"))["state"] not in TERMINAL_RUN_STATES:
            assert time.monotonic() < deadline, f"{dag_id} {run_id} still {run['state']} after {timeout} s:\n" + (
                self.task_states(dag_id, run_id))
            time.sleep(5)
        assert run["state"] == "success", f"{dag_id} {run_id} {run['state']}:\n" + self.failed_task_logs(dag_id, run_id)
        return run

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> str:
        return "\n".join(f"  {ti['task_id']}: {ti['state']}" for ti in self.task_instances(dag_id, run_id))

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        body = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                        full_content=True)
        return "\n".join(line.get("event", "") if isinstance(line, dict) else line for line in body["content"])

    def failed_task_logs(self, dag_id: str, run_id: str, lines: int = 80) -> str:
        out = [self.task_states(dag_id, run_id)]
        for ti in self.task_instances(dag_id, run_id):
            if ti["state"] in ("failed", "upstream_failed") and ti["try_number"]:
                log = self.task_log(dag_id, run_id, ti["task_id"], ti["try_number"]).splitlines()
                out.append(f"--- {ti['task_id']} (try {ti['try_number']}) ---\n" + "\n".join(log[-lines:]))
        return "\n".join(out)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        value = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}")["value"]
        return json.loads(value) if isinstance(value, str) else value


@contextmanager
def live_airflow(root: Path, templates: Path, request: Any, **extra_env: str) -> Iterator[tuple[AirflowApi, dict[str, str]]]:
    """Airflow on its own PostgreSQL over `templates`, GOLDSMITH_HOME in root/home (and `extra_env`); yields the
    REST client and the components' environment. On a failed test it prints the ends of the components' logs; afterwards it asserts
    that no process it started (build VMs included) outlived it."""
    from goldsmith.airflow_env import airflow_environ

    marker, api_port, failed_before = secrets.token_hex(8), free_port(), request.session.testsfailed
    logs = root / "logs"
    with postgres(marker) as db_url:
        env = {**airflow_environ(root / "airflow", templates, root / "home"), **airflow_settings(db_url, api_port),
               **extra_env, LIVE_MARKER: marker}
        with airflow_components(env, logs, api_port) as api:
            yield api, env
            if request.session.testsfailed > failed_before:
                for component in COMPONENTS:
                    print(f"\n--- {logs / component}.log (end) ---\n{tail(logs / f'{component}.log')}")
    leftovers = marked_processes(marker)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes outlived Airflow and PostgreSQL: {leftovers}"
