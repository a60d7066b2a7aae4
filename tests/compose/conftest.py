"""One compose deployment (docker-compose.yaml with the local stand-ins of the upstream images) shared by every
scenario of tests/compose: started once, taken down at the end, with nothing of it left behind.

The project's own script does the set-up (deploy/compose.sh: dockerd if none answers, the wheelhouse, the
images, the base-image cache volume); the first run builds the images (minutes), later runs reuse them.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import airflow_client.client as ac
import httpx
import pytest
from cryptography.fernet import Fernet

from live_airflow import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "compose.sh"
PROJECT = "goldsmith-test"
ADMIN = ("airflow", secrets.token_hex(8))
# Base and golden on different hosts: the asset event crosses workers, each build stays on its own.
TEMPLATE_HOSTS = '{"debian12-base": "build1", "debian12-golden": "build2"}'


@dataclass
class Deployment:
    env: dict[str, str]
    api_url: str
    flower_url: str
    client: ac.ApiClient

    def compose(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), "compose", *args], env=self.env, cwd=ROOT, text=True,
                              capture_output=True, **kwargs)

    def on_worker(self, host: str, command: str) -> str:
        out = self.compose("exec", "-T", f"airflow-worker-{host}", "bash", "-c", command)
        assert out.returncode == 0, out.stderr
        return out.stdout


def script(env: dict[str, str], *args: str, timeout: float = 1800) -> str:
    out = subprocess.run([str(SCRIPT), *args], env=env, cwd=ROOT, text=True, capture_output=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"deploy/compose.sh {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                           f"{out.stderr[-3000:]}")
    return out.stdout


def project_objects() -> str:
    label = f"label=com.docker.compose.project={PROJECT}"
    containers = subprocess.run(["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True).stdout
    volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", label], capture_output=True, text=True).stdout
    return (containers + volumes).strip()


@pytest.fixture(scope="session")
def deployment() -> Iterator[Deployment]:
    if os.geteuid() != 0:
        pytest.skip("the compose tests start dockerd and bootstrap images: they run as root")
    env = {
        **os.environ, "STAND_INS": "1", "COMPOSE_PROJECT_NAME": PROJECT, "PROFILES": "flower",
        "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode(), "AIRFLOW_JWT_SECRET": secrets.token_hex(32),
        "_AIRFLOW_WWW_USER_USERNAME": ADMIN[0], "_AIRFLOW_WWW_USER_PASSWORD": ADMIN[1],
        "AIRFLOW_API_PORT": str(free_port()), "FLOWER_PORT": str(free_port()),
        "GOLDSMITH_TEMPLATE_HOSTS": TEMPLATE_HOSTS, "GOLDSMITH_VM_SLOTS": "1",
        "PY": str(ROOT / ".venv" / "bin" / "python"), "DOCKERD_LOG": "/tmp/goldsmith-test-dockerd.log",
    }
    try:
        started = script(env, "dockerd", timeout=120).strip()
    except RuntimeError as e:
        pytest.skip(f"no Docker daemon and none could be started: {e}")
    script(env, "down", timeout=300)  # a deployment an interrupted run left behind
    try:
        script(env, "images")
        script(env, "seed")
        script(env, "up", timeout=900)
        api_url = f"http://127.0.0.1:{env['AIRFLOW_API_PORT']}"
        token = httpx.post(f"{api_url}/auth/token", json=dict(zip(("username", "password"), ADMIN)),
                           timeout=30).raise_for_status().json()["access_token"]
        with ac.ApiClient(ac.Configuration(host=api_url, access_token=token)) as client:
            yield Deployment(env, api_url, f"http://127.0.0.1:{env['FLOWER_PORT']}", client)
    finally:
        logs = subprocess.run([str(SCRIPT), "compose", "logs", "--no-color", "--tail", "200"], env=env, cwd=ROOT,
                              capture_output=True, text=True).stdout
        Path("/tmp/goldsmith-test-compose.log").write_text(logs)
        script(env, "down", timeout=300)
        left = project_objects()
        if started:
            subprocess.run(["kill", started], check=False)
            wait_gone(int(started))
        assert not left, f"left behind after down: {left}"


def wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.5)
