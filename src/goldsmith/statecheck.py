"""Checks the state files under `$GOLDSMITH_HOME` before a command reads them: a damaged one gets a clear
`FILE: what is wrong` and exit 1, not a traceback from deep inside `gallery list`, `lineage`, `outdated` or
`run-outputs`.

The models hold only what readers use (more fields are allowed: records grow). Files are written atomically
(temp file + rename), so damage means a disk fault, a hand edit or a hostile writer: the fix is to restore
or delete the file, and the message says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from goldsmith.template.loader import MAX_FILE_BYTES, UnreadableFile, find_surrogate, read_regular_file


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Source(_Record):
    type: str
    id: str


class _Provenance(_Record):
    source: _Source
    template: str
    templateDigest: str
    dagId: str | None  # None: a version published outside Goldsmith (an import, a vendor drop)
    runId: str
    parents: list[str]


class GalleryMetadata(_Record):
    id: str
    createdTime: str
    provenance: _Provenance
    version: str | None = None


class RunRecord(_Record):
    runId: str
    template: str
    recordedTime: str


class _OutputProperties(_Record):
    artifactId: str | None
    artifactUri: str | None
    provisioningState: str


class _OutputExtra(_Record):
    runId: str
    recordedTime: str


class RunOutput(_Record):
    name: str
    properties: _OutputProperties
    goldsmith: _OutputExtra


class RunResult(_Record):
    runId: str
    succeeded: bool
    digest: str
    source: dict[str, Any]


# (glob under the home, model): every state file the commands read.
STATE_FILES = (
    ("gallery/*/*/galleries/*/images/*/versions/*/metadata.json", GalleryMetadata),
    ("gallery/*/*/images/*/metadata.json", GalleryMetadata),
    ("runs/*/*/run.json", RunRecord),
    ("runs/*/*/outputs/[!.]*.json", RunOutput),
    ("runs/*/*/result.json", RunResult),
)


class StateError(Exception):
    """Damaged state files; the message has one `FILE: problem` line each."""


def problems(home: Path) -> list[str]:
    """`FILE: what is wrong — fix` for every damaged state file under `home`."""
    found = []
    for pattern, model in STATE_FILES:
        for path in sorted(home.glob(pattern)):
            try:
                data = json.loads(read_regular_file(path, MAX_FILE_BYTES).decode("utf-8"))
                model.model_validate(data)
                surrogate = find_surrogate(data, "")
                if surrogate is None:
                    continue
                why = f"{surrogate or 'the top level'}: a lone UTF-16 surrogate, which is not text"
            except UnreadableFile as e:
                why = str(e)
            except UnicodeDecodeError:
                why = "not UTF-8 text"
            except (json.JSONDecodeError, RecursionError) as e:
                why = f"invalid JSON ({getattr(e, 'msg', 'nested too deeply')})"
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(part) for part in first["loc"]) or "the top level"
                why = f"{where}: {first['msg']}"
            found.append(f"{path}: damaged {model.__name__} ({why}): restore it from a backup or delete it")
    return found


def check(home: Path) -> None:
    """Raises StateError naming every damaged state file under `home`."""
    found = problems(home)
    if found:
        raise StateError("\n".join(found))
