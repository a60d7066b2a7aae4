"""Results: one JSON file per benchmark run in bench/results/, and the Markdown table of the latest of each
(bench/results/latest.md, copied into the README's Benchmarks section between its markers)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PHYS_PAGES")
                    * os.sysconf("SC_PAGE_SIZE") / 2**30), "kernel": platform.release(),
                    "python": platform.python_version(), "qemu": qemu.removeprefix("QEMU emulator version ")},
    }


def save(result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{result['benchmark']}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  written to {out}")
    return out


def latest(benchmark: str) -> dict[str, Any] | None:
    runs = sorted(RESULTS.glob(f"{benchmark}-*.json"))
    return json.loads(runs[-1].read_text()) if runs else None


def _p1(r: dict[str, Any]) -> list[str]:
    m = r["median_seconds"]
    rows = [f"| P1 | local build, median of {r['rounds']} (alternating) | Goldsmith {m.get('goldsmith', '–')} s · "
            f"Packer 1.6.6 {m.get('packer', '–')} s · **ratio {r['ratio']}** (goal ≤ {r['goal_ratio']}) |"]
    steps = " · ".join(f"{task} {s}" for task, s in r["goldsmith_step_median_seconds"].items())
    rows.append(f"| P1 | Goldsmith per task (s, median) | {steps} |")
    return rows


def _p2(r: dict[str, Any]) -> list[str]:
    return [f"| P2 | validate {r['templates']} templates | {r['in_process_seconds']:.2f} s in one process · "
            f"{r['cli_seconds']:.2f} s as one `goldsmith validate` call |"]


def _p3(r: dict[str, Any]) -> list[str]:
    rows = []
    for n, row in r["parse"].items():
        rows.append(f"| P3 | parse the DAG file, {n} templates | Goldsmith {row['goldsmith_seconds']:.2f} s · "
                    f"dag-factory {r['dag_factory_version']} (YAML) {row['dag_factory_seconds']:.2f} s |")
    t = r["task_process"]
    rows.append(f"| P3 | a task process builds its own DAG, of {t['templates']} | Goldsmith "
                f"{t['goldsmith_seconds']:.3f} s · dag-factory {t['dag_factory_seconds']:.3f} s |")
    return rows


def _p6(r: dict[str, Any]) -> list[str]:
    c = r["seconds"]
    return [f"| P6 | {r['image_gib']} GiB image ({r['data_gib']} GiB data) | plain copy {c['copy']:.1f} s · "
            f"fixed VHD {c['vhd']:.1f} s · qcow2 {c['qcow2']:.1f} s · compressed qcow2 (zstd) "
            f"{c['qcow2_zstd']:.1f} s · (zlib) {c['qcow2_zlib']:.1f} s |"]


FORMATS = {"local_build": _p1, "validate": _p2, "dag_parsing": _p3, "distribution": _p6}


def table() -> str:
    rows, machines = [], set()
    for benchmark, fmt in FORMATS.items():
        if r := latest(benchmark):
            rows += fmt(r)
            m = r.get("machine") or {"cpus": r.get("cpus"), "python": r.get("python")}
            machines.add(", ".join(f"{k} {v}" for k, v in m.items()))
    return "\n".join([
        "| | what | result |", "|---|---|---|", *rows, "",
        *(f"Machine: {m}." for m in sorted(machines)),
    ]) + "\n"


def write_table() -> None:
    text = table()
    (RESULTS / "latest.md").write_text(text)
    readme = README.read_text()
    if BEGIN in readme:
        readme = re.sub(f"{re.escape(BEGIN)}.*{re.escape(END)}", lambda _: f"{BEGIN}\n{text}{END}", readme,
                        flags=re.S)
        README.write_text(readme)
    print(text)
