"""The `goldsmith` command: check, render and describe image templates.

Exit codes: 0 all good, 1 a template is invalid, 2 a usage error (bad options, unreadable parameters file).
Problems print one a line as `FILE:JSON.PATH: message`; bad input never prints a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime, timezone
from typing import Any, Sequence

from goldsmith.template import model as m
from goldsmith.template.loader import TemplateError, load_template, read_parameters_file, unmask
from goldsmith.template.plan import backend_problems


class UsageError(Exception):
    pass


def _values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.parameters:
        try:
            values.update(read_parameters_file(args.parameters))
        except TemplateError as e:
            raise UsageError(str(e)) from None
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--set takes NAME=VALUE, got '{item}'")
        values[name] = value
    return values


def _load(path: str, args: argparse.Namespace):
    loaded = load_template(path, values=_values(args), allow_placeholders=args.allow_placeholders)
    if getattr(args, "backend", None):  # check an AIB file unchanged against the backend that would build it
        loaded = dataclasses.replace(loaded, options=loaded.options.model_copy(update={"backend": args.backend}))
    problems = backend_problems(loaded)
    if problems:
        raise TemplateError(path, problems)
    return loaded


def cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.templates:
        try:
            loaded = _load(path, args)
        except TemplateError as e:
            print(e)
            status = 1
            continue
        for note in loaded.notes:
            print(note.format(path))
        left = f" ({len(loaded.unresolved)} placeholders left unresolved)" if loaded.unresolved else ""
        print(f"{path}: valid{left}")
    return status


def render(loaded) -> dict[str, Any]:
    """The resolved template in the shape it was written (resource body, or the bare properties object: it has
    no `location` to make a body with), defaults filled in, read-only fields left out."""
    body = loaded.template.model_dump(mode="json", by_alias=True, exclude_none=True)
    if loaded.prefix == "properties.":
        body = body["properties"]
    body["goldsmith"] = loaded.options.model_dump(mode="json", exclude_none=True)
    return body


def cmd_render(args: argparse.Namespace) -> int:
    try:
        loaded = _load(args.template, args)
    except TemplateError as e:
        print(e)
        return 1
    text = json.dumps(render(loaded), indent=2)
    print(unmask(text, loaded.unresolved))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    class TemplateFile(m.ImageTemplate):
        goldsmith: m.GoldsmithOptions | None = None

    schema = TemplateFile.model_json_schema(by_alias=True)
    schema["title"] = "Goldsmith image template (AIB imageTemplates, API %s, plus a 'goldsmith' block)" % m.API_VERSION
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    print(json.dumps(schema, indent=2))
    return 0


def _check_state() -> None:
    """Damaged state files are named (exit 1) before a command trips over them."""
    from goldsmith import statecheck
    from goldsmith.settings import goldsmith_home

    statecheck.check(goldsmith_home())


def cmd_run_outputs(args: argparse.Namespace) -> int:
    from goldsmith import runoutputs

    _check_state()
    try:
        run_id, outputs = runoutputs.list_outputs(args.template, args.run_id)
    except runoutputs.RunOutputsError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps({"runId": run_id, "value": outputs}, indent=2))
    elif run_id is None:
        print(f"no runs of {args.template} recorded")
    else:
        print(f"run {run_id}")
        for o in outputs:
            p = o["properties"]
            print(f"  {o['name']}: {p['provisioningState']}  {p.get('artifactId') or p.get('artifactUri')}")
    return 0


def cmd_gallery_list(args: argparse.Namespace) -> int:
    from goldsmith.local.gallery import LocalGallery

    _check_state()
    entries = LocalGallery().list()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        print(e["id"])
        for v in e.get("versions", [e] if "provenance" in e else []):
            prov = v["provenance"]
            src = prov["source"]
            print(f"  {v.get('version', '')} {v['createdTime']}  from {src['id']}"
                  f" ({src.get('exactVersion') or '-'})  template {prov['template']} {prov['templateDigest'][:19]}"
                  f"  run {prov['runId']}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from goldsmith import lineage

    _check_state()
    found = lineage.artifacts()
    try:
        result = lineage.ancestry(lineage.find(args.image, found), found)
    except LookupError as e:
        print(f"goldsmith: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.dot:
        print(lineage.to_dot(result))
    else:
        a = result["artifact"]
        print(f"{a['id']}\n  {a['kind']} built by {a['template']} (run {a['runId']}, template {a['templateDigest']})")
        for title, key in (("built from", "ancestors"), ("built on it", "descendants"), ("same run", "siblings")):
            print(f"  {title}:")
            for n in result[key] or [{"id": "-", "kind": ""}]:
                by = f" by {n['template']} (run {n['runId']})" if n.get("template") else ""
                print(f"    {n['id']}  {n['kind']}{by}")
    return 0


def cmd_outdated(args: argparse.Namespace) -> int:
    from goldsmith import lineage

    _check_state()
    stale = lineage.outdated()
    if args.json:
        print(json.dumps(stale, indent=2))
    elif not stale:
        print("every image is built from the newest version of its source")
    for s in [] if args.json else stale:
        print(f"{s['template']}: built from {s['source']} {s['builtFrom']}, newest is {s['newest']}: "
              f"trigger DAG {s['dagId']}")
        for artifact in s["artifacts"]:
            print(f"    {artifact}")
    return 0


def cmd_sbom(args: argparse.Namespace) -> int:
    from goldsmith import changes, lineage, sbom

    try:
        doc = changes.load_sbom(lineage.find(args.image, lineage.artifacts()))
    except (LookupError, changes.ChangesError) as e:
        print(f"goldsmith: {e}", file=sys.stderr)
        return 1
    print(json.dumps(sbom.spdx(doc) if args.format == "spdx" else doc, indent=2))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from goldsmith import changes, lineage

    found = lineage.artifacts()
    try:
        old, new = lineage.find(args.old, found), lineage.find(args.new, found)
        if args.json:
            from goldsmith import sbom

            print(json.dumps(sbom.diff(changes.load_sbom(old), changes.load_sbom(new)).as_dict(), indent=2))
            return 0
    except (LookupError, changes.ChangesError) as e:
        print(f"goldsmith: {e}", file=sys.stderr)
        return 1
    print("\n".join(changes.describe(old, new)))
    return 0


def _template_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parameters", metavar="FILE", help="ARM parameters file ({\"parameters\": {\"x\": {\"value\": ...}}})")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="value for an ARM parameter or a <NAME> placeholder (repeatable)")
    p.add_argument("--allow-placeholders", action="store_true",
                   help="check the structure, leaving <tokens> and ARM parameters without a value unresolved")


def cmd_cache_list(args: argparse.Namespace) -> int:
    from goldsmith.local.layers import LayerCache

    cache = LayerCache()
    entries = cache.entries() if cache.root.is_dir() else []
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in reversed(entries):  # most recently used first
        used = datetime.fromtimestamp(e["lastUsed"], timezone.utc).strftime("%Y-%m-%d %H:%M")
        print(f"{e['key'][:16]}  {e['size'] / 2**20:8.1f} MiB  used {used}{'  in use' if e['inUse'] else ''}"
              f"  {e.get('template', '-')} {e.get('task', '-')}  run {e.get('run', '-')}")
    print(f"{len(entries)} layer(s), {sum(e['size'] for e in entries) / 2**30:.2f} GiB in {cache.root}")
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from goldsmith.local.layers import LayerCache, LayerError

    try:
        limit = None if args.max_gb is None else int(args.max_gb * 2**30)
        removed = LayerCache().prune(limit) if LayerCache().root.is_dir() else []
    except LayerError as e:
        raise UsageError(str(e)) from None
    print(f"removed {len(removed)} layer(s)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goldsmith", description="Golden VM images as Airflow DAGs, from AIB templates.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check templates; exit 1 if any is invalid")
    _template_options(v)
    v.add_argument("--backend", choices=("local", "azure"),
                   help="check as if the template's goldsmith.backend said this (e.g. a Windows AIB file: azure)")
    v.add_argument("templates", nargs="+", metavar="TEMPLATE")
    v.set_defaults(func=cmd_validate)
    r = sub.add_parser("render", help="print the resolved, normalized template as JSON")
    _template_options(r)
    r.add_argument("template", metavar="TEMPLATE")
    r.set_defaults(func=cmd_render)
    s = sub.add_parser("schema", help="print the JSON Schema of the template format")
    s.set_defaults(func=cmd_schema)
    o = sub.add_parser("run-outputs", help="AIB's run outputs of a template's build (default: the latest run)")
    o.add_argument("template", metavar="TEMPLATE", help="the template name (its file name without .json)")
    o.add_argument("--run-id", help="an Airflow run id")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_run_outputs)
    li = sub.add_parser("lineage", help="ancestors and descendants of an image version or target")
    li.add_argument("image", metavar="IMAGE[@VERSION]", help="a template name (optionally @version) or an artifact id")
    fmt = li.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--dot", action="store_true", help="a Graphviz graph (dot -Tsvg)")
    li.set_defaults(func=cmd_lineage)
    od = sub.add_parser("outdated", help="images whose source has a newer version, with the DAG to trigger")
    od.add_argument("--json", action="store_true")
    od.set_defaults(func=cmd_outdated)
    sb = sub.add_parser("sbom", help="the SBOM of an image version (CycloneDX 1.5 JSON, or SPDX 2.3)")
    sb.add_argument("image", metavar="IMAGE[@VERSION]", help="a template name (optionally @version) or an artifact id")
    sb.add_argument("--format", choices=("cyclonedx", "spdx"), default="cyclonedx")
    sb.set_defaults(func=cmd_sbom)
    df = sub.add_parser("diff", help="packages added, removed and upgraded between two image versions, and what "
                                     "else changed (source version, template and scripts)")
    df.add_argument("old", metavar="IMAGE@A")
    df.add_argument("new", metavar="IMAGE@B")
    df.add_argument("--json", action="store_true", help="only the package changes, as JSON")
    df.set_defaults(func=cmd_diff)
    g = sub.add_parser("gallery", help="the local gallery")
    gs = g.add_subparsers(dest="gallery_command", required=True)
    gl = gs.add_parser("list", help="image definitions, versions and managed images, with their provenance")
    gl.add_argument("--json", action="store_true")
    gl.set_defaults(func=cmd_gallery_list)
    c = sub.add_parser("cache", help="the step layers of local builds ($GOLDSMITH_LAYERS)")
    cs = c.add_subparsers(dest="cache_command", required=True)
    cl = cs.add_parser("list", help="layers, most recently used first, with their step, run and size")
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(func=cmd_cache_list)
    cp = cs.add_parser("prune", help="evict least recently used layers not in use down to a size")
    cp.add_argument("--max-gb", type=float, help="the size to keep (default $GOLDSMITH_LAYERS_MAX_GB or 20; 0: "
                    "every layer not in use)")
    cp.set_defaults(func=cmd_cache_prune)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from goldsmith.statecheck import StateError

    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"goldsmith: {e}", file=sys.stderr)
        return 2
    except StateError as e:
        print(f"goldsmith: damaged state files:\n{e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `goldsmith render x | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
