"""AIB's run outputs: one record per distribution target per template run, saying what it produced.

Layout under `$GOLDSMITH_HOME/runs`:

    <template>/<run-dir>/run.json                       {"runId", "template", "recordedTime"} (first record)
    <template>/<run-dir>/outputs/<runOutputName>.json   a RunOutput, as below
    <template>/<run-dir>/result.json                    how the build ended: succeeded, digest, source
    <template>/<run-dir>/sbom.cdx.json                  the build's SBOM (goldsmith.sbom), once it made one

`<run-dir>` is the Airflow run id made filesystem-safe (`manual__2025-01-01T00:00:00+00:00` ->
`manual__2025-01-01T00_00_00_00_00-<8 hex of its sha256>`; the hash keeps distinct ids distinct), so the raw
run id is kept in the JSON. Runs are ordered by when they were first recorded, not by directory name.

An output follows AIB's RunOutput (`Microsoft.VirtualMachineImages/imageTemplates/runOutputs`):
`{"name": runOutputName, "type": ..., "properties": {"artifactId", "artifactUri", "provisioningState"},
"goldsmith": {"runId", "recordedTime", ...extra (times, digest)}}`. Recording the same name again in a run
(a retried task) replaces it. Files are written to a temp file and renamed, so readers see whole files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from goldsmith.secrets import strip_secrets_json
from goldsmith.settings import goldsmith_home

RUN_OUTPUT_TYPE = "Microsoft.VirtualMachineImages/imageTemplates/runOutputs"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # AIB's runOutputName pattern, minus a leading '.'


class RunOutputsError(Exception):
    """A bad template or run output name, or a run that was never recorded."""


def run_dir_name(run_id: str) -> str:
    """A filesystem-safe, readable and distinct directory name for an Airflow run id."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:100].lstrip(".")
    return f"{readable}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def record(
    template: str,
    run_id: str,
    runOutputName: str,
    artifactId: str | None,
    artifactUri: str | None,
    provisioningState: str,
    extra: Mapping[str, Any] | None = None,
    *,
    home: Path | None = None,
) -> dict[str, Any]:
    """Write (or replace) one run output of a template run; returns it."""
    if not _NAME.fullmatch(runOutputName):
        raise RunOutputsError(f"runOutputName '{runOutputName}' must match ^[A-Za-z0-9-_.]{{1,64}}$ (not starting with '.')")
    if not run_id:
        raise RunOutputsError("run_id is empty; pass the Airflow run id")
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    run_dir = _template_dir(template, home) / run_dir_name(run_id)
    if not (run_dir / "run.json").exists():
        _write_json(run_dir / "run.json", {"runId": run_id, "template": template, "recordedTime": now})
    output = strip_secrets_json({  # a VHD uri's SAS token is no output
        "name": runOutputName,
        "type": RUN_OUTPUT_TYPE,
        "properties": {"artifactId": artifactId, "artifactUri": artifactUri, "provisioningState": provisioningState},
        "goldsmith": {**(extra or {}), "runId": run_id, "recordedTime": now},
    })
    _write_json(run_dir / "outputs" / f"{runOutputName}.json", output)
    return output


def record_result(
    template: str, run_id: str, *, succeeded: bool, digest: str, source: Mapping[str, Any] | None,
    home: Path | None = None,
) -> dict[str, Any]:
    """How a build ended. Skipping unchanged rebuilds and pausing source triggers after failures read it."""
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    run_dir = _template_dir(template, home) / run_dir_name(run_id)
    if not (run_dir / "run.json").exists():
        _write_json(run_dir / "run.json", {"runId": run_id, "template": template, "recordedTime": now})
    result = {"runId": run_id, "succeeded": succeeded, "digest": digest, "source": dict(source or {}),
              "finishedTime": now}
    _write_json(run_dir / "result.json", result)
    return result


def document_path(template: str, run_id: str, name: str, *, home: Path | None = None) -> Path:
    """Where a document of the run (its SBOM) is kept, beside its outputs."""
    return _template_dir(template, home) / run_dir_name(run_id) / name


def write_document(template: str, run_id: str, name: str, data: bytes, *, home: Path | None = None) -> Path:
    """Store a document of the run whole (temp file, then rename); returns its path."""
    path = document_path(template, run_id, name, home=home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def list_results(template: str, *, home: Path | None = None) -> list[dict[str, Any]]:
    """The ended builds of a template, oldest first."""
    return [_read_json(d / "result.json") for _, d in _runs(template, home) if (d / "result.json").exists()]


def list_runs(template: str, *, home: Path | None = None) -> list[str]:
    """The template's run ids, oldest first (by when each was first recorded)."""
    return [run["runId"] for run, _ in _runs(template, home)]


def list_outputs(
    template: str, run_id: str | None = None, *, home: Path | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """(run id, its outputs sorted by name) for `run_id`, or the latest run; (None, []) if none was recorded."""
    runs = _runs(template, home)
    if run_id is None:
        if not runs:
            return None, []
        run, run_dir = runs[-1]
        run_id = run["runId"]
    else:
        run_dir = _template_dir(template, home) / run_dir_name(run_id)
        if not (run_dir / "run.json").exists():
            known = ", ".join(run["runId"] for run, _ in runs) or "none"
            raise RunOutputsError(f"template '{template}' has no recorded run '{run_id}'; recorded runs: {known}")
    # "[!.]*": skip the temp files of writes in progress.
    outputs = [_read_json(path) for path in sorted((run_dir / "outputs").glob("[!.]*.json"))]
    return run_id, outputs


def _template_dir(template: str, home: Path | None) -> Path:
    if not _NAME.fullmatch(template):
        raise RunOutputsError(f"template name '{template}' must match ^[A-Za-z0-9-_.]{{1,64}}$ (not starting with '.')")
    return (home or goldsmith_home()) / "runs" / template


def _runs(template: str, home: Path | None) -> list[tuple[dict[str, Any], Path]]:
    runs = [(_read_json(path), path.parent) for path in _template_dir(template, home).glob("*/run.json")]
    return sorted(runs, key=lambda item: (item[0]["recordedTime"], item[0]["runId"]))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunOutputsError(f"{path} is unreadable ({e}); fix or delete it") from None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
