"""Validating 1,000 varied image templates: in one process through the loader, and in one `goldsmith validate` call.

The goal (issue 2) is under 2 s for the 1,000 in one process on a 2-core machine. The templates mix the three
input shapes, every source and distributor type, optional blocks, and one in ten has a mistake, so both the
success path and the error translation are measured. Figures go to stdout and bench/results/validate-<time>.json.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from goldsmith.template.loader import TemplateError, load_template
from goldsmith.template.plan import backend_problems

COUNT = 1000
RESULTS = Path(__file__).parent / "results"
GOLDSMITH = Path(sys.executable).parent / "goldsmith"


def _source(rng: random.Random) -> dict[str, Any]:
    return rng.choice([
        {"type": "PlatformImage", "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server",
         "version": rng.choice(["latest", "24.04.202501010"])},
        {"type": "ManagedImage", "imageId": f"/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/images/i{rng.randrange(99)}"},
        {"type": "SharedImageVersion", "imageVersionId": "/subscriptions/0/galleries/g/images/base/versions/latest"},
    ])


def _customizer(rng: random.Random, i: int) -> dict[str, Any]:
    return rng.choice([
        {"type": "Shell", "name": f"step {i}", "inline": [f"echo {j}" for j in range(rng.randrange(1, 6))]},
        {"type": "Shell", "name": f"script{i}", "scriptUri": f"https://example.com/s{i}.sh", "sha256Checksum": "ab" * 32},
        {"type": "File", "name": f"file{i}", "sourceUri": f"https://example.com/f{i}", "destination": f"/tmp/f{i}"},
    ])


def _distributor(rng: random.Random, name: str) -> dict[str, Any]:
    tags = {"source": "bench", "n": name}
    return rng.choice([
        {"type": "ManagedImage", "runOutputName": name, "imageId": f"/subscriptions/0/images/{name}",
         "location": "westeurope", "artifactTags": tags},
        {"type": "SharedImage", "runOutputName": name, "galleryImageId": "/subscriptions/0/galleries/g/images/app",
         "targetRegions": [{"name": r, "replicaCount": 2} for r in rng.sample(["westeurope", "northeurope", "eastus"], 2)],
         "versioning": {"scheme": "Latest", "major": 1}, "artifactTags": tags},
        {"type": "VHD", "runOutputName": name},
    ])


def _mistake(rng: random.Random, props: dict[str, Any]) -> None:
    """The mistakes users make: a typo, a bound, a removed type, a missing field."""
    rng.choice([
        lambda: props["distribute"][0].update(aritfactTags={}),
        lambda: props.update(buildTimeoutInMinutes=961),
        lambda: props.update(source={"type": "ISO", "sourceUri": "https://x/rhel.iso"}),
        lambda: props["distribute"][0].pop("runOutputName"),
        lambda: props.update(customize=[{"type": "shell", "inline": ["true"]}]),
    ])()


def template(rng: random.Random, index: int) -> dict[str, Any]:
    props: dict[str, Any] = {
        "source": _source(rng),
        "customize": [_customizer(rng, i) for i in range(rng.randrange(0, 8))],
        "distribute": [_distributor(rng, f"out{index}-{i}") for i in range(rng.randrange(1, 4))],
    }
    if rng.random() < 0.5:
        props["vmProfile"] = {"vmSize": "Standard_D2s_v3", "osDiskSizeGB": 64,
                              "vnetConfig": {"subnetId": "/subscriptions/0/virtualNetworks/v/subnets/s"}}
    if rng.random() < 0.5:
        props["validate"] = {"inVMValidations": [{"type": "Shell", "name": "smoke", "inline": ["systemctl is-system-running"]}]}
    if rng.random() < 0.5:
        props.update(buildTimeoutInMinutes=rng.randrange(0, 961), errorHandling={"onCustomizerError": "abort"})
    if index % 10 == 9:
        _mistake(rng, props)
    body = {"location": "westeurope", "tags": {"team": "platform"}, "properties": props}
    shape = index % 3
    if shape == 1:
        return props  # the bare properties object
    if shape == 2:  # an ARM deployment template
        body["location"] = "[parameters('location')]"
        body["properties"]["stagingResourceGroup"] = "[concat('/subscriptions/0/resourceGroups/', variables('rg'))]"
        return {
            "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "parameters": {"location": {"type": "string", "defaultValue": "westeurope"}},
            "variables": {"rg": f"staging-{index}"},
            "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "apiVersion": "2025-10-01",
                           "name": f"img{index}", **body}],
        }
    return {**body, "goldsmith": {"schedule": "@weekly", "owner": "platform"}}


def generate(directory: Path, count: int = COUNT, seed: int = 2) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        path = directory / f"t{i:04d}.json"
        path.write_text(json.dumps(template(rng, i), indent=2))
        paths.append(path)
    return paths


def validate_in_process(paths: list[Path]) -> tuple[float, int]:
    """Seconds to validate every path as `goldsmith validate` does, and how many were valid."""
    valid = 0
    start = time.perf_counter()
    for path in paths:
        try:
            valid += not backend_problems(load_template(path))
        except TemplateError:
            pass
    return time.perf_counter() - start, valid


def validate_cli(directory: Path, paths: list[Path]) -> tuple[float, int]:
    """Seconds for one `goldsmith validate` call on every path (process start and imports included)."""
    start = time.perf_counter()
    result = subprocess.run([str(GOLDSMITH), "validate", *(p.name for p in paths)], cwd=directory,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 1) or result.stderr:
        raise SystemExit(f"goldsmith validate failed ({result.returncode}): {result.stderr}")
    return elapsed, result.stdout.count(": valid\n")


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="goldsmith-bench-") as tmp:
        paths = generate(Path(tmp))
        validate_in_process(paths[:20])  # warm-up: first-use costs (pydantic validators, regexes) are not per template
        seconds, valid = validate_in_process(paths)
        cli_seconds, cli_valid = validate_cli(Path(tmp), paths)
    if cli_valid != valid:
        raise SystemExit(f"the CLI found {cli_valid} valid templates, the loader {valid}")
    result = {
        "benchmark": "validate_templates",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "templates": len(paths),
        "valid": valid,
        "in_process_seconds": round(seconds, 4),
        "in_process_ms_per_template": round(seconds / len(paths) * 1000, 4),
        "cli_seconds": round(cli_seconds, 4),
        "cli_ms_per_template": round(cli_seconds / len(paths) * 1000, 4),
        "goal_seconds": 2.0,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(f"validate {len(paths)} templates ({valid} valid, {len(paths) - valid} invalid):")
    print(f"  in one process      {seconds:7.3f} s  {result['in_process_ms_per_template']:.3f} ms/template"
          f"  (goal < 2 s: {'met' if seconds < 2 else 'MISSED'})")
    print(f"  goldsmith validate  {cli_seconds:7.3f} s  {result['cli_ms_per_template']:.3f} ms/template"
          " (one call, start-up included)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"validate-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  written to {out}")
    return result


if __name__ == "__main__":
    main()
