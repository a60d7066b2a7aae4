"""Reads an image template file into a validated `ImageTemplate`, or a list of precise problems.

Three input shapes are accepted, as AIB users write them:
- the resource body (`az resource create --is-full-object`): `{"location", "identity", "properties", ...}`;
- an ARM deployment template whose `resources[]` holds one `Microsoft.VirtualMachineImages/imageTemplates`;
- the bare `properties` object: `{"source", "customize", "distribute", ...}`.
Beside the AIB document, an optional top-level `goldsmith` block holds what AIB has no field for.

Every problem names its place as a JSON path in the file as written (`properties.distribute[0].aritfactTags`),
says what is wrong and, where it can, the fix. Nothing here raises anything but `TemplateError`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from goldsmith.template import model as m
from goldsmith.template.arm import ArmError, Evaluator

PLACEHOLDER = re.compile(r"<([A-Za-z_][A-Za-z0-9_.-]*)>")
OPTIONS_KEY = "goldsmith"
# Line breaks, other control characters and lone surrogates (valid in JSON strings, unprintable as UTF-8).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Templates are small (AIB's samples are under 10 KB); a bound keeps a huge file from stalling the DAG file.
MAX_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    severity: str = "error"  # or "note": reported, but the template is still valid

    def format(self, file: str | Path) -> str:
        """One line, whatever keys and values the file holds: unprintable characters are escaped."""
        where = f"{file}:{self.path}" if self.path else str(file)
        line = f"{where}: {'note: ' if self.severity == 'note' else ''}{self.message}"
        return _UNPRINTABLE.sub(lambda c: c.group().encode("unicode_escape").decode(), line)


class TemplateError(Exception):
    def __init__(self, file: str | Path, problems: list[Problem]):
        self.file = str(file)
        self.problems = problems
        super().__init__("\n".join(p.format(file) for p in problems))


@dataclass(frozen=True)
class LoadedTemplate:
    path: Path
    template: m.ImageTemplate
    options: m.GoldsmithOptions
    notes: list[Problem] = field(default_factory=list)
    unresolved: tuple[str, ...] = ()  # placeholders left in place (only with allow_placeholders)
    prefix: str = ""  # where the resource body sits in the file: "", "resources[0]." or "properties." (bare)

    @property
    def name(self) -> str:
        return self.path.stem

    def where(self, body_path: str) -> str:
        """A JSON path in the resource body, as it reads in the file."""
        if self.prefix == "properties.":
            return body_path.removeprefix("properties.")
        return self.prefix + body_path


def read_parameters_file(path: str | Path) -> dict[str, Any]:
    """An ARM parameters file: `{"parameters": {"x": {"value": ...}}}` (a bare `{"x": value}` map also works)."""
    data = _read_json(Path(path))
    params = data.get("parameters", data)
    if not isinstance(params, dict):
        raise TemplateError(path, [Problem("parameters", "must be an object of name -> {\"value\": ...}")])
    return {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in params.items()}


def load_template(
    path: str | Path,
    *,
    values: dict[str, Any] | None = None,
    allow_placeholders: bool = False,
) -> LoadedTemplate:
    """`values` fill ARM parameters and `<token>` placeholders (from `--set` and a parameters file).

    The built-in value `templateDir` is the directory holding the template, so a template can name its
    scripts as `file://<templateDir>/scripts/x.sh` wherever the checkout lives.
    """
    path = Path(path)
    values = {"templateDir": os.path.dirname(os.path.realpath(path)), **(values or {})}  # realpath: no error on a loop
    try:
        return _load(path, _read_json(path), values, allow_placeholders)
    except RecursionError:  # JSON that parses but is nested deeper than the checks below can walk
        raise TemplateError(path, [Problem("", "invalid template: JSON nested too deeply")]) from None


def _load(path: Path, data: dict[str, Any], values: dict[str, Any], allow_placeholders: bool) -> LoadedTemplate:
    problems: list[Problem] = []

    options_raw = data.pop(OPTIONS_KEY, None)
    options = _validate_options(options_raw, problems)

    try:
        document, prefix, used, unresolved_params = _extract_document(data, values)
    except ArmError as e:
        raise TemplateError(path, problems + [Problem(e.path, str(e))]) from None
    except _ShapeError as e:
        raise TemplateError(path, problems + [Problem(e.path, str(e))]) from None

    document, unresolved, used_tokens = _substitute(document, values, prefix)
    for name, paths in unresolved_params.items():
        unresolved[name] = list(dict.fromkeys(paths + unresolved.get(name, [])))
    if not allow_placeholders:
        for token, paths in unresolved.items():
            more = f" (and {len(paths) - 1} more place{'s' if len(paths) > 2 else ''})" if len(paths) > 1 else ""
            kind = "ARM parameter" if token in unresolved_params else "placeholder"
            problems.append(Problem(paths[0], f"unresolved {kind} <{token}>{more}: pass --set {token}=VALUE"))

    if prefix != "properties." and "location" not in document:
        problems.append(Problem(_join(prefix, "location"), "required field 'location' is missing (an Azure region)"))

    if unresolved:  # reported above; masked so they don't also fail patterns below
        document = _mask(document, set(unresolved))
    template = None
    try:
        template = m.ImageTemplate.model_validate(document)
    except ValidationError as e:
        problems.extend(_translate(err, prefix) for err in e.errors())

    errors = [p for p in problems if p.severity == "error"]
    if errors or template is None:
        raise TemplateError(path, problems)
    notes = [p for p in problems if p.severity == "note"] + list(_read_only_notes(template, prefix))
    unknown = sorted(set(values) - used - used_tokens - {"templateDir"})
    notes += [Problem("", f"--set {k} matches no parameter or placeholder in this template", "note") for k in unknown]
    return LoadedTemplate(path, template, options, notes, tuple(sorted(unresolved)), prefix)


# --- reading ---------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key '{k}'")
            out[k] = v
        return out

    def not_json(name: str) -> Any:  # Python's json reads NaN and Infinity; JSON (and AIB) has no such values
        raise ValueError(f"'{name}' is not a JSON value")

    try:
        text = read_regular_file(path, MAX_FILE_BYTES).decode("utf-8-sig")  # tolerate a BOM, as Azure tooling does
    except UnicodeDecodeError as e:
        raise TemplateError(path, [Problem("", f"not UTF-8 text (byte {e.start}): save the file as UTF-8")]) from None
    except UnreadableFile as e:
        raise TemplateError(path, [Problem("", str(e))]) from None
    try:
        data = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=not_json)
    except json.JSONDecodeError as e:
        raise TemplateError(f"{path}:{e.lineno}:{e.colno}", [Problem("", f"invalid JSON: {e.msg}")]) from None
    except ValueError as e:  # duplicate key, NaN
        raise TemplateError(path, [Problem("", f"invalid template: {e}")]) from None
    except RecursionError:
        raise TemplateError(path, [Problem("", "invalid template: JSON nested too deeply")]) from None
    if not isinstance(data, dict):
        raise TemplateError(path, [Problem("", f"a template is a JSON object, not {_json_type(data)}")])
    surrogate = find_surrogate(data, "")
    if surrogate is not None:  # valid JSON, but no UTF-8 for the logs, the UI or the metadata database
        raise TemplateError(path, [Problem(surrogate, "contains a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                                      "which is not text: remove it")])
    return data


def find_surrogate(value: Any, path: str) -> str | None:
    """The JSON path of the first key or string holding a lone surrogate (iterative: any depth)."""
    stack = [(value, path)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return where
        elif isinstance(v, dict):
            for k, x in v.items():
                if _SURROGATE.search(k):
                    return _join(where, k)
                stack.append((x, _join(where, k)))
        elif isinstance(v, list):
            stack.extend((x, f"{where}[{i}]") for i, x in enumerate(v))
    return None


class UnreadableFile(Exception):
    """A path that is not a regular file one can read whole: the message says why."""


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. FIFOs, devices, sockets and symlink loops are
    refused before anything is read, so a `x.json` linked to /dev/zero or a FIFO can't hang or exhaust a reader.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise UnreadableFile("no such file") from None
    except IsADirectoryError:
        raise UnreadableFile("is a directory, not a template file") from None
    except OSError as e:  # ELOOP, EACCES, ENXIO (a FIFO or socket nobody serves)
        raise UnreadableFile(f"can't read: {e.strerror}") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise UnreadableFile("is a directory, not a template file")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile("is not a regular file (a device, FIFO or socket): use a plain file")
        if st.st_size > limit:
            raise UnreadableFile(f"is {st.st_size} bytes, over the limit of {limit}: split it or shrink it")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while we read
        raise UnreadableFile(f"is over the limit of {limit} bytes")
    return data


def _validate_options(raw: Any, problems: list[Problem]) -> m.GoldsmithOptions:
    if raw is None:
        return m.GoldsmithOptions()
    try:
        return m.GoldsmithOptions.model_validate(raw)
    except ValidationError as e:
        problems.extend(_translate(err, f"{OPTIONS_KEY}.", root=m.GoldsmithOptions) for err in e.errors())
        return m.GoldsmithOptions()


class _ShapeError(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def _extract_document(data: dict, values: dict[str, Any]) -> tuple[dict, str, set[str], dict[str, list[str]]]:
    """The resource body, the JSON-path prefix of its place in the file, the values used, unresolved parameters."""
    schema = str(data.get("$schema", ""))
    if "deploymentParameters" in schema or (isinstance(data.get("parameters"), dict) and "resources" not in data
                                           and "properties" not in data and "source" not in data):
        raise _ShapeError("", "this is an ARM parameters file, not an image template: pass it to "
                              "`goldsmith validate --parameters FILE TEMPLATE` beside the template it fills")
    trigger = data.get("properties") if isinstance(data.get("properties"), dict) else {}
    if str(data.get("type", "")).lower().endswith("/triggers") or trigger.get("kind") == "SourceImage":
        raise _ShapeError("", "this is an AIB trigger resource, not an image template: set "
                              '"goldsmith": {"sourceTrigger": true} in the template it triggers')
    if isinstance(data.get("resources"), list) or "$schema" in data:
        resources = data.get("resources")
        if not isinstance(resources, list):
            raise _ShapeError("resources", "an ARM deployment template needs a 'resources' array")
        found = [
            (i, r) for i, r in enumerate(resources) if isinstance(r, dict) and r.get("type") == m.RESOURCE_TYPE
        ]
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise _ShapeError(
                "resources", f"found {what} '{m.RESOURCE_TYPE}' resources; a template file holds exactly one image"
            )
        index, resource = found[0]
        prefix = f"resources[{index}]."
        evaluator = Evaluator(data, values)
        body = evaluator.evaluate(resource, prefix[:-1])
        return body, prefix, evaluator.used, evaluator.unresolved
    if "properties" in data:
        return data, "", set(), {}
    if "source" in data or "distribute" in data:
        return {"properties": data}, "properties.", set(), {}
    raise _ShapeError(
        "",
        "not an image template: expected a resource body with 'properties', an ARM deployment template with "
        "'resources', or a bare properties object with 'source' and 'distribute'",
    )


def _substitute(value: Any, values: dict[str, Any], prefix: str) -> tuple[Any, dict[str, list[str]], set[str]]:
    """Replaces `<token>`s that have a value; reports the rest (except inside `inline` commands, where
    `<word>` is as likely to be shell or HTML as a placeholder)."""
    unresolved: dict[str, list[str]] = {}
    used: set[str] = set()

    def sub(text: str, path: str, report: bool) -> str:
        def one(match: re.Match) -> str:
            token = match.group(1)
            if token in values:
                used.add(token)
                return str(values[token])
            if report:
                unresolved.setdefault(token, []).append(path)
            return match.group(0)

        return PLACEHOLDER.sub(one, text) if "<" in text else text

    def walk(v: Any, path: str, report: bool) -> Any:
        if isinstance(v, dict):
            return {
                sub(k, _join(path, k), report): walk(x, _join(path, k), report and k != "inline")
                for k, x in v.items()
            }
        if isinstance(v, list):
            return [walk(x, f"{path}[{i}]", report) for i, x in enumerate(v)]
        if isinstance(v, str):
            return sub(v, path, report)
        return v

    # Paths are reported as in the file; the bare-properties shape was wrapped in {"properties": ...}.
    if prefix == "properties.":
        inner = walk(value["properties"], "", True)
        return {"properties": inner}, unresolved, used
    return walk(value, prefix[:-1], True), unresolved, used


def _mask(value: Any, tokens: set[str]) -> Any:
    """Stands in a pattern-safe name for each unresolved `<token>` so the structure can still be checked
    (`runOutputName: "<runOutputName>"` would fail its pattern); `unmask` puts the tokens back for display."""
    if isinstance(value, dict):
        return {_mask(k, tokens): _mask(v, tokens) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, tokens) for v in value]
    if isinstance(value, str) and "<" in value:
        return PLACEHOLDER.sub(lambda mt: f"__{mt.group(1)}__" if mt.group(1) in tokens else mt.group(0), value)
    return value


def unmask(text: str, tokens: typing.Iterable[str]) -> str:
    for token in tokens:
        text = text.replace(f"__{token}__", f"<{token}>")
    return text


# --- pydantic errors to problems -------------------------------------------------------------------------------

_UNION_KIND = {
    m.PlatformImageSource: "source",
    m.ShellCustomizer: "customizer",
    m.ShellValidator: "validator",
    m.ManagedImageDistributor: "distributor",
    m.LatestVersioner: "versioning scheme",
}


def _unwrap(annotation: Any) -> Any:
    """Strips Annotated and Optional."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):  # dict[str, Model] is no union
        return []
    return [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]


def _tag_of(member: type[BaseModel]) -> str:
    for key in ("type", "scheme"):
        if key in member.model_fields:
            return typing.get_args(member.model_fields[key].annotation)[0]
    raise AssertionError(member)


def _walk_loc(loc: tuple, root: type[BaseModel]) -> tuple[list[str | int], Any, Any]:
    """Follows a pydantic error location through the model classes.

    Returns the location as the user sees it (discriminator tags removed), the annotation at the parent of the
    last element and the annotation at the last element.
    """
    shown: list[str | int] = []
    current: Any = root
    parent: Any = None
    for item in loc:
        current = _unwrap(current)
        members = _union_members(current)
        if members and isinstance(item, str) and item in {_tag_of(c) for c in members}:
            current = next(c for c in members if _tag_of(c) == item)
            continue
        parent = current
        shown.append(item)
        if isinstance(current, type) and issubclass(current, BaseModel):
            f = current.model_fields.get(item) or next(
                (f for f in current.model_fields.values() if f.alias == item), None
            )
            current = f.annotation if f else None
        elif typing.get_origin(current) in (list, dict):
            current = typing.get_args(current)[-1]
        else:
            current = None
    return shown, parent, current


def _format_path(prefix: str, parts: list[str | int]) -> str:
    if prefix == "properties.":  # the bare shape: the file *is* the properties object
        parts, out = parts[1:], ""
    else:
        out = prefix[:-1]
    for p in parts:
        out = f"{out}[{p}]" if isinstance(p, int) else _join(out, p)
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _did_you_mean(word: str, choices: list[str]) -> str:
    lower = {c.lower(): c for c in choices}
    if word.lower() in lower:
        return f" — did you mean '{lower[word.lower()]}'? (AIB is case-sensitive)"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _translate(err: dict, prefix: str, root: type[BaseModel] = m.ImageTemplate) -> Problem:
    loc = tuple(err["loc"])
    kind = err["type"]
    value = err.get("input")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        shown, _, annotation = _walk_loc(loc, root)
        members = _union_members(_unwrap(annotation))
        tags = [_tag_of(c) for c in members]
        key = "scheme" if "scheme" in members[0].model_fields else "type"
        what = _UNION_KIND.get(members[0], "item")
        path = _format_path(prefix, shown)
        if kind == "union_tag_not_found":
            return Problem(_join(path, key), f"missing '{key}': one of {', '.join(tags)}")
        tag = err["ctx"]["tag"]
        if what == "source" and tag == "ISO":
            return Problem(
                _join(path, key),
                "source type 'ISO' was removed from AIB (it existed only in the 2019 preview APIs): "
                "start from a PlatformImage, ManagedImage or SharedImageVersion",
            )
        return Problem(
            _join(path, key), f"unknown {what} type '{tag}'{_did_you_mean(tag, tags)} (expected one of {', '.join(tags)})"
        )

    shown, parent, _ = _walk_loc(loc, root)
    path = _format_path(prefix, shown)
    if kind == "extra_forbidden":
        name = str(shown[-1])
        choices = _field_names(parent) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        hint = _did_you_mean(name, choices) or (f" (allowed: {', '.join(choices)})" if choices else "")
        return Problem(path, f"unknown field '{name}'{hint}")
    if kind == "missing":
        return Problem(path, f"required field '{shown[-1]}' is missing")
    message = err["msg"]
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    elif kind == "literal_error" and isinstance(value, str):
        expected = list(typing.get_args(_unwrap(_walk_loc(loc, root)[2])))
        message = f"'{value}' is not allowed: expected {' or '.join(repr(e) for e in expected)}"
        message += _did_you_mean(value, [str(e) for e in expected])
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        message = f"{message}, not {_json_type(value)}"
    return Problem(path, message)


def _json_type(value: Any) -> str:
    return {
        dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _read_only_notes(template: BaseModel, prefix: str) -> typing.Iterator[Problem]:
    """Read-only fields (set by the service) that the file carries: accepted, ignored, noted."""

    def walk(obj: Any, path: str) -> typing.Iterator[Problem]:
        if isinstance(obj, BaseModel):
            for name in obj.model_fields_set:
                f = type(obj).model_fields[name]
                key = f.alias or name
                if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("readOnly"):
                    yield Problem(_join(path, key), "read-only field (set by the service): ignored", "note")
                else:
                    yield from walk(getattr(obj, name), _join(path, key))
        elif isinstance(obj, list):
            for i, x in enumerate(obj):
                yield from walk(x, f"{path}[{i}]")
        elif isinstance(obj, dict):
            for k, x in obj.items():
                yield from walk(x, _join(path, k))

    if prefix == "properties.":
        yield from walk(template.properties, "")
    else:
        yield from walk(template, prefix[:-1])
