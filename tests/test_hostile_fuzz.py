"""Property-based fuzz of templates and state files (issue #10). The invariant: the CLI exits 0, 1 or 2 with no
traceback and no hang, and in the DAG folder every file gets a DAG of its own while the good template keeps its
build DAG. ~1,000 inputs in all: mutations of a valid template and of real state files, wrong types, surrogates,
deep nesting, huge numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goldsmith import runoutputs
from goldsmith.cli import main
from goldsmith.dag_factory import build_dags, dag_id_for

pytestmark = pytest.mark.timeout(900)

def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                    database=None)

GOOD = {
    "location": "westeurope",
    "properties": {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": [{"type": "Shell", "name": "s", "inline": ["true"]},
                      {"type": "File", "sourceUri": "https://example.com/f", "destination": "/tmp/f"}],
        "distribute": [{"type": "VHD", "runOutputName": "vhd"},
                       {"type": "SharedImage", "runOutputName": "sig",
                        "galleryImageId": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/"
                                          "galleries/g/images/i"}],
        "identity": None,
    },
    "goldsmith": {"schedule": "@daily", "tags": ["a"], "owner": "team", "secrets": {"T": {"variable": "t"}}},
}
del GOOD["properties"]["identity"]

nasty_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\ud800", "x" * 300, "[concat(variables('a'),variables('a'))]", "<token>", "file:///etc/shadow",
                     "ftp://h/x", "..", "", " ", "@never", "* * * * * *", "[parameters('p')]"]),
)
leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), nasty_text)
json_values = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(nasty_text, inner, max_size=4)),
                           max_leaves=12)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document (to a depth of 20: a nested mutation goes deeper)."""
    found = [prefix]
    if len(prefix) > 20:
        return found
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += paths(v, (*prefix, i))
    return found


@st.composite
def mutated(draw, document: Any) -> Any:
    """`document` with 1-3 places replaced, deleted or deeply nested."""
    doc = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(doc)))
        if not where:
            doc = draw(json_values)
            continue
        parent = doc
        try:
            for key in where[:-1]:
                parent = parent[key]
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "delete", "nest"]))
        if not isinstance(parent, (dict, list)):
            continue
        try:
            if action == "delete":
                del parent[where[-1]]
            elif action == "nest":
                value: Any = parent[where[-1]]
                for _ in range(draw(st.integers(1, 3)) * 400):
                    value = [value]
                parent[where[-1]] = value
            else:
                parent[where[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    return doc


def run_cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse
            code = e.code
    text = out.getvalue() + err.getvalue()
    text.encode("utf-8")  # printable: a lone surrogate would fail on a real terminal
    return code, text


def dump(document: Any) -> str:
    try:
        return json.dumps(document)
    except RecursionError:
        return "[" * 100_000


@fuzz(600)
@given(st.lists(mutated(GOOD), min_size=1, max_size=1))
def test_validate_never_raises(documents):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.json"
        path.write_text(dump(documents[0]), encoding="utf-8", errors="surrogatepass")
        code, text = run_cli("validate", str(path))
        assert code in (0, 1) and "Traceback" not in text
        assert text.startswith(str(path)), text


@fuzz(2)
@given(st.lists(mutated(GOOD), min_size=150, max_size=150))
def test_no_file_hides_another_templates_dag(documents):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "good.json").write_text(json.dumps(GOOD))
        names = []
        for i, document in enumerate(documents):
            name = f"f{i}.json"
            (root / name).write_text(dump(document), encoding="utf-8", errors="surrogatepass")
            names.append(name)
        dags = build_dags(root)
        assert "plan" in dags["good"].task_dict
        assert {dag_id_for(root / n) for n in names} <= set(dags)
        for name in names:
            dag = dags[dag_id_for(root / name)]
            assert "plan" in dag.task_dict or list(dag.task_dict) == ["invalid_template"]


# --- state files ------------------------------------------------------------------------------------------------

def make_state(home: Path) -> list[Path]:
    """A run with outputs and a result, written by the real recorder; the state files it made."""
    source = {"type": "PlatformImage", "id": "debian:debian-12:12:latest", "exactVersion": "1"}
    runoutputs.record("t", "manual__1", "vhd", None, "file:///srv/t.vhd", "Succeeded",
                      {"digest": "sha256:x", "source": source, "parents": []}, home=home)
    runoutputs.record("t", "manual__1", "sig", "/subscriptions/s/x", None, "Succeeded", home=home)
    runoutputs.record_result("t", "manual__1", succeeded=True, digest="sha256:x", source=source, home=home)
    meta = home / "gallery/s/rg/galleries/g/images/i/versions/1.0.0/metadata.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/"
                                      "images/i/versions/1.0.0", "type": "x", "version": "1.0.0",
                                "createdTime": "2025-01-01T00:00:00+00:00",
                                "provenance": {"source": source, "template": "t", "templateDigest": "sha256:x",
                                               "dagId": "t", "runId": "manual__1", "parents": []}}))
    return sorted(p for p in home.rglob("*.json"))


@fuzz(250)
@given(data=st.data())
def test_state_commands_never_raise_on_damaged_state(data, monkeypatch):
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        monkeypatch.setenv("GOLDSMITH_HOME", str(home))
        files = make_state(home)
        target = data.draw(st.sampled_from(files))
        how = data.draw(st.sampled_from(["mutate", "garbage", "fifo", "truncate"]))
        if how == "mutate":
            target.write_text(dump(data.draw(mutated(json.loads(target.read_text())))), encoding="utf-8",
                              errors="surrogatepass")
        elif how == "garbage":
            target.write_bytes(data.draw(st.binary(max_size=64)))
        elif how == "fifo":
            target.unlink()
            os.mkfifo(target)
        else:
            target.write_text(target.read_text()[: data.draw(st.integers(0, 20))])
        for argv in (["gallery", "list"], ["lineage", "t"], ["outdated"], ["run-outputs", "t"],
                     ["run-outputs", "t", "--json"], ["lineage", "t", "--dot"]):
            code, text = run_cli(*argv)
            assert code in (0, 1, 2) and "Traceback" not in text, (argv, text)
            if code == 1 and "damaged" in text:
                assert str(home) in text


def test_lineage_walks_any_number_of_generations(tmp_path, monkeypatch):
    """A chain of 3,000 images, each built from the one before: no recursion limit."""
    from goldsmith import lineage

    found = {f"a{i}": {"id": f"a{i}", "kind": "vhd", "parents": [f"a{i - 1}"] if i else [], "runId": str(i),
                       "template": f"t{i}", "source": {}} for i in range(3000)}
    result = lineage.ancestry(found["a2999"], found)
    assert len(result["ancestors"]) == 2999
    assert len(lineage.ancestry(found["a0"], found)["descendants"]) == 2999


def test_a_damaged_state_file_is_named_with_exit_1(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path))
    files = make_state(tmp_path)
    result = next(f for f in files if f.name == "result.json")
    result.write_text('{"runId": "manual__1", "succeeded": "yes"}')
    code, text = run_cli("outdated")
    assert code == 1
    assert f"{result}: damaged RunResult (succeeded: Input should be a valid boolean): restore it" in text
