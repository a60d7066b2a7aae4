"""P1: one local build, Goldsmith (`airflow dags test`) side by side with Packer 1.6.6's qemu builder.

The workload (bench/p1/bench-p1.json for Goldsmith, bench/p1/packer.json for Packer, the same commands):
boot the cached Debian base of the platform catalog, three Shell steps (write a file; write 2,000 files and
touch every file under /usr/share and /usr/lib; reboot), one File upload (1 MiB), one validation command,
deprovision (Goldsmith's built-in script, uploaded to Packer too), shutdown, then a compressed qcow2 and a
fixed VHD. Both get 2 vCPUs, 8 GiB, virtio disk and network, cache=unsafe, the same cloud-init seed.

The two tools run alternately (G P G P ...) and the medians are compared within one run, as the host is
shared. `BENCH_P1_ROUNDS` (default 3) sets the rounds; `BENCH_P1_TOOLS=goldsmith` runs one tool only.
Goldsmith's per-step times come from its task instances (start and end in Airflow's metadata DB).
Logs of every build stay in $BENCH_P1_WORK (default /tmp/goldsmith-bench-p1).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import _report
from goldsmith.airflow_env import AIRFLOW, airflow_environ, prepare
from goldsmith.customizers import DEPROVISION_SCRIPT
from goldsmith.local import baseimage, catalog, disk

HERE = Path(__file__).parent / "p1"
TEMPLATE = HERE / "bench-p1.json"
PACKER_TEMPLATE = HERE / "packer.json"
DAG_ID = TEMPLATE.stem
USER = "goldsmith"
PAYLOAD_BYTES = 1 << 20
TIMEOUT = 3600


def _same_workload() -> None:
    """The two templates must run the same commands: compare their Shell steps."""
    props = json.loads(TEMPLATE.read_text())["properties"]
    ours = [c["inline"] for c in props["customize"] if c["type"] == "Shell"]
    ours += [v["inline"] for v in props["validate"]["inVMValidations"]]
    packer = [p["inline"] for p in json.loads(PACKER_TEMPLATE.read_text())["provisioners"] if p["type"] == "shell"]
    if ours != packer:
        raise SystemExit(f"{TEMPLATE} and {PACKER_TEMPLATE} run different commands: keep them in step")


class Goldsmith:
    name = "goldsmith"

    def __init__(self, work: Path):
        self.work = work
        templates = work / "templates"
        templates.mkdir(parents=True)
        shutil.copy(TEMPLATE, templates)
        (templates / "payload.bin").write_bytes(os.urandom(PAYLOAD_BYTES))
        self.env = airflow_environ(work / "airflow", templates, work / "home")
        prepare(self.env)

    def run(self, index: int) -> dict[str, Any]:
        log = self.work / f"goldsmith-{index}.log"
        started = time.monotonic()
        with log.open("w") as out:
            done = subprocess.run([AIRFLOW, "dags", "test", DAG_ID], env=self.env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=TIMEOUT)
        seconds = time.monotonic() - started
        steps = self._steps()
        if done.returncode != 0 or any(s["state"] != "success" for s in steps.values()):
            raise SystemExit(f"goldsmith build {index} failed; see {log}")
        return {"tool": self.name, "seconds": round(seconds, 1), "steps": steps, "log": str(log)}

    def _steps(self) -> dict[str, dict[str, Any]]:
        """Each task of the latest run: state and seconds between its start and end."""
        with sqlite3.connect(Path(self.env["AIRFLOW_HOME"]) / "airflow.db") as db:
            run_id = db.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                                (DAG_ID,)).fetchone()[0]
            rows = db.execute("SELECT task_id, state, start_date, end_date, duration FROM task_instance "
                              "WHERE dag_id = ? AND run_id = ? ORDER BY start_date", (DAG_ID, run_id)).fetchall()
        return {task: {"state": state, "seconds": round(duration or 0, 1), "start": start, "end": end}
                for task, state, start, end, duration in rows}


class Packer:
    name = "packer"

    def __init__(self, work: Path, base: Path):
        self.work, self.base = work, base
        seed = work / "seed"
        seed.mkdir(parents=True)
        self.key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key], check=True)
        # The documents goldsmith.local.qemu writes into its seed, with Packer's key.
        user_data = {
            "users": [{"name": USER, "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash", "lock_passwd": True,
                       "ssh_authorized_keys": [self.key.with_suffix(".pub").read_text().strip()]}],
            "ssh_genkeytypes": ["ed25519"], "ssh_pwauth": False, "disable_root": True,
        }
        (seed / "user-data").write_text("#cloud-config\n" + json.dumps(user_data, indent=2) + "\n")
        (seed / "meta-data").write_text(json.dumps({"instance-id": "packer-bench", "local-hostname": "bench-p1"}))
        (work / "payload.bin").write_bytes(os.urandom(PAYLOAD_BYTES))
        (work / "deprovision.sh").write_text(DEPROVISION_SCRIPT)
        self.vars = {"base": str(base), "seed_dir": str(seed), "key": str(self.key),
                     "payload": str(work / "payload.bin"), "deprovision": str(work / "deprovision.sh")}

    def run(self, index: int) -> dict[str, Any]:
        output = self.work / f"output-{index}"
        log = self.work / f"packer-{index}.log"
        argv = ["packer", "build", "-force", "-color=false", "-timestamp-ui",
                *(f"-var={k}={v}" for k, v in {**self.vars, "output": str(output)}.items()), str(PACKER_TEMPLATE)]
        env = {**os.environ, "CHECKPOINT_DISABLE": "1", "PACKER_CACHE_DIR": str(self.work / "packer_cache")}
        started = time.monotonic()
        with log.open("w") as out:
            done = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT,
                                  cwd=self.work)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"packer build {index} failed; see {log}")
        footer = disk.read_vhd_footer(output / "p1.vhd")
        if footer["disk_type_name"] != "fixed":
            raise SystemExit(f"packer made a {footer['disk_type_name']} VHD")
        shutil.rmtree(output)
        return {"tool": self.name, "seconds": round(seconds, 1), "log": str(log)}


def _load() -> dict[str, Any]:
    """What else runs on the host: load average and other QEMU processes."""
    qemus = subprocess.run(["pgrep", "-c", "qemu-system"], capture_output=True, text=True).stdout.strip()
    return {"loadavg": os.getloadavg()[0], "other_qemu": int(qemus or 0)}


def main() -> dict[str, Any]:
    _same_workload()
    if not shutil.which("packer"):
        raise SystemExit("packer is not installed: run `make bench` (it installs Debian's packer package)")
    entry = catalog.resolve("Debian", "debian-12", "12", "latest")
    base = baseimage.ensure_base_image(entry)
    rounds = int(os.environ.get("BENCH_P1_ROUNDS", "3"))
    work = Path(os.environ.get("BENCH_P1_WORK", "/tmp/goldsmith-bench-p1"))
    shutil.rmtree(work, ignore_errors=True)
    wanted = os.environ.get("BENCH_P1_TOOLS", "goldsmith,packer").split(",")
    tools = [t for t in (Goldsmith(work / "goldsmith") if "goldsmith" in wanted else None,
                         Packer(work / "packer", base) if "packer" in wanted else None) if t]
    runs: list[dict[str, Any]] = []
    for index in range(rounds):
        for tool in tools:
            before = _load()
            run = tool.run(index)
            run["host_before"] = before
            runs.append(run)
            print(f"  round {index + 1}: {tool.name:9} {run['seconds']:6.1f} s  (load before {before['loadavg']:.1f}, "
                  f"other QEMUs {before['other_qemu']})", flush=True)
    medians = {t.name: statistics.median(r["seconds"] for r in runs if r["tool"] == t.name) for t in tools}
    ours = [r for r in runs if r["tool"] == "goldsmith"]
    step_medians = {task: round(statistics.median(r["steps"][task]["seconds"] for r in ours), 1)
                    for task in ours[0]["steps"]} if ours else {}
    result = {
        "benchmark": "local_build",
        "base_image": {"urn": entry.urn, "digest": entry.digest},
        "rounds": rounds,
        "median_seconds": medians,
        "ratio": round(medians["goldsmith"] / medians["packer"], 3) if len(medians) == 2 else None,
        "goal_ratio": 0.8,
        "goldsmith_step_median_seconds": step_medians,
        "runs": runs,
        **_report.machine(),
    }
    for name, seconds in medians.items():
        print(f"  {name:9} median {seconds:6.1f} s")
    if result["ratio"] is not None:
        print(f"  goldsmith / packer = {result['ratio']:.2f} (goal <= 0.8: {'met' if result['ratio'] <= 0.8 else 'MISSED'})")
    for task, seconds in step_medians.items():
        print(f"    {task:28} {seconds:6.1f} s")
    _report.save(result)
    return result


if __name__ == "__main__":
    main()
