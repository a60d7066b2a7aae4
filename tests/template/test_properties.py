"""Property tests: any valid template survives render -> validate; any malformed input gives clean problems."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goldsmith.cli import render
from goldsmith.template import model as m
from goldsmith.template.loader import LoadedTemplate, Problem, TemplateError, load_template

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Plain strings: no `<token>` placeholders and no leading `[` (an ARM expression in the ARM shape).
text = st.text(st.characters(blacklist_characters="<[", blacklist_categories=("Cs",)), min_size=1, max_size=20)
ids = st.builds(lambda *parts: "/" + "/".join(parts), text, text)
uris = st.sampled_from(["https://example.com/a.sh", "https://example.com/b", "file:///tmp/c.sh"])
sha256 = st.one_of(st.just(""), st.text("0123456789abcdef", min_size=64, max_size=64))
tags = st.dictionaries(text, text, max_size=3)
run_output_names = st.from_regex(m.NAME_PATTERN, fullmatch=True).filter(lambda n: not n.startswith("."))


def optional(**fields: st.SearchStrategy) -> st.SearchStrategy[dict[str, Any]]:
    """A dict holding any subset of `fields`."""
    return st.fixed_dictionaries({}, optional=fields)


def typed(type_: str, required: dict | None = None, **optional_fields: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({"type": st.just(type_), **(required or {})}, optional=optional_fields)


sources = st.one_of(
    typed("PlatformImage", publisher=text, offer=text, sku=text, version=st.sampled_from(["latest", "1.2.3"]),
          planInfo=st.fixed_dictionaries({"planName": text, "planProduct": text, "planPublisher": text})),
    typed("ManagedImage", {"imageId": ids}),
    typed("SharedImageVersion", {"imageVersionId": ids}),
)
script = st.one_of(st.fixed_dictionaries({"scriptUri": uris}, optional={"sha256Checksum": sha256}),
                   st.fixed_dictionaries({"inline": st.lists(text)}))  # a checksum checks a download only
shell = st.builds(lambda base, s: {**base, **s}, typed("Shell", name=text), script)
file_customizer = typed("File", {"sourceUri": uris, "destination": st.just("/tmp/f")}, name=text, sha256Checksum=sha256)
customizers = st.lists(st.one_of(shell, file_customizer), max_size=4)

target_regions = st.lists(
    st.fixed_dictionaries({"name": text}, optional={
        "replicaCount": st.integers(1, 10), "storageAccountType": st.sampled_from(["Standard_LRS", "Premium_LRS"])}),
    max_size=3,
)
regions = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"targetRegions": target_regions}),
    st.fixed_dictionaries({"replicationRegions": st.lists(text, max_size=3)},
                          optional={"storageAccountType": st.just("Standard_ZRS")}),
)
versioning = st.one_of(st.fixed_dictionaries({"scheme": st.just("Latest")}, optional={"major": st.integers(-1, 9)}),
                       st.just({"scheme": "Source"}))
shared_image = st.builds(
    lambda base, r: {**base, **r},
    typed("SharedImage", {"galleryImageId": ids}, artifactTags=tags, excludeFromLatest=st.booleans(),
          versioning=versioning, replicationMode=st.sampled_from(["Full", "Shallow"])),
    regions,
)
distributor_bodies = st.one_of(
    typed("ManagedImage", {"imageId": ids, "location": text}, artifactTags=tags),
    shared_image,
    typed("VHD", artifactTags=tags, uri=uris),
)
distributors = st.lists(st.tuples(run_output_names, distributor_bodies), min_size=1, max_size=3,
                        unique_by=lambda d: d[0]).map(lambda ds: [{**d, "runOutputName": n} for n, d in ds])

on_error = st.sampled_from(["cleanup", "abort"])
vnet = st.one_of(
    st.fixed_dictionaries({"subnetId": ids}),
    st.fixed_dictionaries({"subnetId": ids, "containerInstanceSubnetId": ids}),
    st.fixed_dictionaries({"subnetId": ids, "proxyVmSize": text}),
)
properties = st.builds(
    lambda required, rest: {**required, **rest},
    st.fixed_dictionaries({"source": sources, "distribute": distributors}),
    optional(
        customize=customizers,
        buildTimeoutInMinutes=st.integers(0, 960),
        errorHandling=optional(onCustomizerError=on_error, onValidationError=on_error),
        vmProfile=optional(vmSize=text, osDiskSizeGB=st.integers(0, 4096), vnetConfig=vnet,
                           userAssignedIdentities=st.lists(ids, max_size=2)),
        validate=optional(continueDistributeOnFailure=st.booleans(), sourceValidationOnly=st.booleans(),
                          inVMValidations=st.lists(shell, max_size=2)),
        optimize=optional(vmBoot=optional(state=st.sampled_from(["Enabled", "Disabled"]))),
        additionalDataDisks=st.lists(optional(sizeGB=st.integers(0, 1024)), max_size=2),
        stagingResourceGroup=ids,
        autoRun=optional(state=st.sampled_from(["Enabled", "Disabled"])),
        managedResourceTags=tags,
    ),
)
options = optional(schedule=st.sampled_from(["@daily", "0 3 * * 1"]), retries=st.integers(0, 10),
                   rebuild=st.sampled_from(["onChange", "always"]), owner=text, tags=st.lists(text, max_size=2))


def in_shape(props: dict, shape: str, location: str) -> dict:
    body = {"location": location, "properties": props}
    if shape == "bare":
        return props
    if shape == "arm":
        return {"$schema": "x", "resources": [{"type": m.RESOURCE_TYPE, "name": "img", **body}]}
    return body


templates = st.builds(
    lambda props, shape, location, opts: {**in_shape(props, shape, location), **({"goldsmith": opts} if opts else {})},
    properties, st.sampled_from(["body", "bare", "arm"]), text, st.one_of(st.none(), options),
)


def load_document(document: Any, name: str = "t.json", **kwargs) -> LoadedTemplate:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(document if isinstance(document, str) else json.dumps(document))
        return load_template(path, **kwargs)


@SETTINGS
@given(templates)
def test_valid_templates_survive_render_and_validate(document):
    loaded = load_document(document)
    rendered = load_document(render(loaded))
    assert rendered.template == loaded.template
    assert rendered.options == loaded.options
    assert rendered.notes == [] and rendered.unresolved == ()


# --- malformed input ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
# Keys of the template format, so random documents reach past the first check now and then.
known_keys = st.sampled_from(sorted({"source", "distribute", "customize", "properties", "resources", "$schema",
                                     "parameters", "variables", "goldsmith", "type", "location", "validate"}))
documents = st.recursive(
    json_values,
    lambda children: st.dictionaries(known_keys | st.text(max_size=8), children, max_size=5),
    max_leaves=40,
)
SEVERITIES = {"error", "note"}


def assert_clean(document: Any, **kwargs) -> None:
    """Loads, or fails with `TemplateError` whose problems are well-formed one-line reports."""
    try:
        load_document(document, **kwargs)
    except TemplateError as e:
        assert e.problems
        for problem in e.problems:
            assert isinstance(problem, Problem) and problem.severity in SEVERITIES
            assert isinstance(problem.path, str) and isinstance(problem.message, str) and problem.message
            line = problem.format("t.json")
            assert len(line.splitlines()) == 1 and line.startswith("t.json")
            line.encode("utf-8")
            assert not re.search(r"Traceback|object at 0x", line)


@SETTINGS
@given(documents, st.booleans())
def test_random_json_gives_clean_errors(document, allow_placeholders):
    assert_clean(document, allow_placeholders=allow_placeholders)


@SETTINGS
@given(templates, st.data())
def test_truncated_templates_give_clean_errors(document, data):
    text = json.dumps(document, indent=1)
    cut = data.draw(st.integers(0, len(text) - 1))
    assert_clean(text[:cut])


wrong_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 2000), st.just(1.5), st.text(max_size=5),
                         st.just([]), st.just({}), st.just([1, "a"]), st.just({"x": 1}), st.just("<tok>"),
                         st.just("[concat(1)]"), st.just("[parameters('nope')]"))


def paths_of(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON value: dict keys and list indexes."""
    found = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths_of(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += paths_of(v, (*path, i))
    return found


@SETTINGS
@given(templates, st.data())
def test_wrong_types_at_random_places_give_clean_errors(document, data):
    path = data.draw(st.sampled_from(paths_of(document)[1:]))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = data.draw(wrong_values)
    assert_clean(document)
