"""The loader's rules, one at a time: each problem names its JSON path as written and says what to do."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from goldsmith.cli import main
from goldsmith.template import model as m
from goldsmith.template.loader import TemplateError, load_template, read_parameters_file

RESOURCE = m.RESOURCE_TYPE


def problems(path, **kwargs) -> list[str]:
    """`path: message` for every problem of the template, or [] if it loads."""
    try:
        load_template(path, **kwargs)
    except TemplateError as e:
        assert e.file == str(path)
        return [f"{p.path}: {p.message}" for p in e.problems]
    return []


def arm(resource: dict, parameters: dict | None = None, variables: dict | None = None) -> dict:
    """An ARM deployment template holding `resource` as its image template."""
    return {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": parameters or {},
        "variables": variables or {},
        "resources": [{"type": RESOURCE, "apiVersion": "2025-10-01", "name": "img", **resource}],
    }


# --- the strict model -------------------------------------------------------------------------------------------

def test_minimal_template_loads_with_defaults(write, body):
    loaded = load_template(write(body))
    props = loaded.template.properties
    assert props.customize == [] and props.buildTimeoutInMinutes == 0
    assert props.distribute[0].artifactTags == {}
    assert loaded.options == m.GoldsmithOptions() and loaded.options.backend == "local"
    assert (loaded.name, loaded.notes, loaded.unresolved) == ("t", [], ())


def test_unknown_field_suggests_the_close_name(write, body):
    body["properties"]["distribute"][0]["aritfactTags"] = {"a": "b"}
    assert problems(write(body)) == [
        "properties.distribute[0].aritfactTags: unknown field 'aritfactTags' — did you mean 'artifactTags'?"
    ]


def test_unknown_field_in_other_case_says_aib_is_case_sensitive(write, body):
    body["properties"]["vmProfile"] = {"VmSize": "Standard_D2s_v3"}
    assert problems(write(body)) == [
        "properties.vmProfile.VmSize: unknown field 'VmSize' — did you mean 'vmSize'? (AIB is case-sensitive)"
    ]


def test_unknown_field_without_a_close_name_lists_the_allowed_ones(write, body):
    body["properties"]["errorHandling"] = {"zzz": 1}
    assert problems(write(body)) == [
        "properties.errorHandling.zzz: unknown field 'zzz' (allowed: onCustomizerError, onValidationError)"
    ]


def test_union_type_in_other_case_is_named(write, body):
    body["properties"]["customize"] = [{"type": "shell", "inline": ["true"]}]
    assert problems(write(body)) == [
        "properties.customize[0].type: unknown customizer type 'shell' — did you mean 'Shell'? (AIB is "
        "case-sensitive) (expected one of Shell, PowerShell, File, WindowsRestart, WindowsUpdate)"
    ]


def test_missing_union_type(write, body):
    body["properties"]["distribute"] = [{"runOutputName": "x"}]
    assert problems(write(body)) == ["properties.distribute[0].type: missing 'type': one of ManagedImage, SharedImage, VHD"]


def test_iso_source_says_it_was_removed(write, body):
    body["properties"]["source"] = {"type": "ISO", "sourceUri": "https://x/rhel.iso", "sha256Checksum": "ab"}
    assert problems(write(body)) == [
        "properties.source.type: source type 'ISO' was removed from AIB (it existed only in the 2019 preview "
        "APIs): start from a PlatformImage, ManagedImage or SharedImageVersion"
    ]


def test_enum_value_in_other_case(write, body):
    body["properties"]["errorHandling"] = {"onCustomizerError": "Abort"}
    assert problems(write(body)) == [
        "properties.errorHandling.onCustomizerError: 'Abort' is not allowed: expected 'cleanup' or 'abort' — "
        "did you mean 'abort'? (AIB is case-sensitive)"
    ]


def test_wrong_json_types_are_errors_not_conversions(write, body):
    body["properties"]["buildTimeoutInMinutes"] = "80"
    body["tags"] = {"team": 7}
    body["properties"]["validate"] = {"continueDistributeOnFailure": "yes"}
    assert problems(write(body)) == [
        "tags.team: Input should be a valid string, not a number",
        "properties.validate.continueDistributeOnFailure: Input should be a valid boolean, not a string",
        "properties.buildTimeoutInMinutes: Input should be a valid integer, not a string",
    ]


def test_required_fields(write, body):
    del body["location"]
    del body["properties"]["distribute"]
    body["properties"]["source"] = {"type": "ManagedImage"}
    assert problems(write(body)) == [
        "location: required field 'location' is missing (an Azure region)",
        "properties.source.imageId: required field 'imageId' is missing",
        "properties.distribute: required field 'distribute' is missing",
    ]


@pytest.mark.parametrize(("customizer", "message"), [
    ({"type": "Shell", "scriptUri": "https://x/a.sh", "inline": ["true"]},
     "Shell: set either 'scriptUri' or 'inline', not both"),
    ({"type": "Shell"}, "Shell: needs 'scriptUri' (a script to download) or 'inline' (commands to run)"),
    ({"type": "PowerShell", "inline": ["x"], "runAsSystem": True}, "PowerShell: 'runAsSystem' needs 'runElevated': true"),
])
def test_customizer_script_rules(write, body, customizer, message):
    body["properties"]["customize"] = [{"type": "File", "sourceUri": "https://x/f", "destination": "/tmp/f"}, customizer]
    assert problems(write(body)) == [f"properties.customize[1]: {message}"]


@pytest.mark.parametrize(("distributor", "message"), [
    ({"targetRegions": [{"name": "westus"}], "replicationRegions": ["westus"]},
     "SharedImage: set either 'targetRegions' or the deprecated 'replicationRegions', not both"),
    ({"targetRegions": [{"name": "westus"}], "storageAccountType": "Standard_LRS"},
     "SharedImage: 'storageAccountType' only goes with 'replicationRegions'; with 'targetRegions' set it per region"),
])
def test_shared_image_region_rules(write, body, distributor, message):
    body["properties"]["distribute"] = [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": "/g/i",
                                         **distributor}]
    assert problems(write(body)) == [f"properties.distribute[0]: {message}"]


@pytest.mark.parametrize(("vnet", "message"), [
    ({"subnetId": "/s/a", "containerInstanceSubnetId": "/s/b", "proxyVmSize": "Standard_A1_v2"},
     "vnetConfig: set either 'containerInstanceSubnetId' or 'proxyVmSize', not both"),
    ({"containerInstanceSubnetId": "/s/b"},
     "vnetConfig: 'containerInstanceSubnetId' needs 'subnetId' (a subnet of the same VNet)"),
])
def test_vnet_rules(write, body, vnet, message):
    body["properties"]["vmProfile"] = {"vnetConfig": vnet}
    assert problems(write(body)) == [f"properties.vmProfile.vnetConfig: {message}"]


@pytest.mark.parametrize(("minutes", "expected"), [
    (960, []),
    (961, ["properties.buildTimeoutInMinutes: Input should be less than or equal to 960"]),
    (-1, ["properties.buildTimeoutInMinutes: Input should be greater than or equal to 0"]),
])
def test_build_timeout_bounds(write, body, minutes, expected):
    body["properties"]["buildTimeoutInMinutes"] = minutes
    assert problems(write(body)) == expected


@pytest.mark.parametrize(("name", "valid"), [
    ("vhd-1_a.b", True), ("x" * 64, True), ("x" * 65, False), ("has space", False), ("", False), ("é", False),
])
def test_run_output_name_pattern(write, body, name, valid):
    body["properties"]["distribute"][0]["runOutputName"] = name
    expected = [] if valid else [
        "properties.distribute[0].runOutputName: String should match pattern '^[A-Za-z0-9-_.]{1,64}$'"
    ]
    assert problems(write(body)) == expected


def test_duplicate_run_output_names(write, body):
    vhd = {"type": "VHD", "runOutputName": "out"}
    body["properties"]["distribute"] = [vhd, {"type": "VHD", "runOutputName": "other"}, vhd]
    assert problems(write(body)) == ["properties: runOutputName must be unique per template; repeated: out"]


def test_problem_lines_stay_one_printable_line(write, body):
    """Keys and values are the user's: a newline or a lone surrogate (valid JSON escapes) must not break the line."""
    body["properties"]["distribute"][0]["a\nb"] = 1
    with pytest.raises(TemplateError) as e:
        load_template(write(body))
    assert str(e.value) == (f"{e.value.file}:properties.distribute[0].a\\nb: unknown field 'a\\nb' "
                            "(allowed: type, runOutputName, artifactTags, uri)")
    body["location"] = "[parameters('\ud800')]"
    with pytest.raises(TemplateError) as e:
        load_template(write(arm(body)))
    assert str(e.value) == (f"{e.value.file}:resources[0].location: contains a lone UTF-16 surrogate "
                            "(\\ud800-\\udfff), which is not text: remove it")


def test_all_problems_are_reported_at_once(write, body):
    body["properties"]["distribute"][0]["aritfactTags"] = {}
    body["properties"]["buildTimeoutInMinutes"] = 961
    body["properties"]["customize"] = [{"type": "Shell"}]
    body["goldsmith"] = {"retries": 11}
    assert len(problems(write(body))) == 4


# --- the three shapes ------------------------------------------------------------------------------------------

def test_bare_properties_object_paths_have_no_properties_prefix(write, body):
    bare = body["properties"]
    bare["distribute"][0]["aritfactTags"] = {}
    bare["customize"] = [{"type": "Shell"}]
    assert problems(write(bare)) == [
        "customize[0]: Shell: needs 'scriptUri' (a script to download) or 'inline' (commands to run)",
        "distribute[0].aritfactTags: unknown field 'aritfactTags' — did you mean 'artifactTags'?",
    ]


def test_bare_properties_object_needs_no_location(write, body):
    loaded = load_template(write(body["properties"]))
    assert loaded.template.location is None and loaded.prefix == "properties."
    assert loaded.where("properties.customize[0]") == "customize[0]"


def test_arm_template_parameters_variables_concat(write, body):
    body["location"] = "[parameters('location')]"
    body["properties"]["distribute"][0]["runOutputName"] = "[variables('out')]"
    body["properties"]["stagingResourceGroup"] = "[concat('/subscriptions/', parameters('sub'), '/rg')]"
    template = arm(body, parameters={"location": {"type": "string", "defaultValue": "northeurope"},
                                     "sub": {"type": "string"}},
                   variables={"out": "[concat('vhd-', parameters('location'))]"})
    loaded = load_template(write(template), values={"sub": "0000"})
    assert loaded.template.location == "northeurope"
    assert loaded.template.properties.distribute[0].runOutputName == "vhd-northeurope"
    assert loaded.template.properties.stagingResourceGroup == "/subscriptions/0000/rg"
    assert loaded.prefix == "resources[0]."


def test_arm_problem_paths_point_into_resources(write, body):
    body["properties"]["distribute"][0]["aritfactTags"] = {}
    template = arm(body)
    template["resources"].insert(0, {"type": "Microsoft.Storage/storageAccounts", "name": "s"})
    assert problems(write(template)) == [
        "resources[1].properties.distribute[0].aritfactTags: unknown field 'aritfactTags' — did you mean 'artifactTags'?"
    ]


def test_arm_given_value_beats_default_and_names_are_case_insensitive(write, body):
    body["location"] = "[PARAMETERS('Location')]"
    template = arm(body, parameters={"location": {"type": "string", "defaultValue": "northeurope"}})
    assert load_template(write(template), values={"LOCATION": "westus"}).template.location == "westus"


def test_arm_typed_parameters_convert_set_strings(write, body):
    body["properties"]["buildTimeoutInMinutes"] = "[parameters('timeout')]"
    body["properties"]["distribute"] = [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": "/g/i",
                                         "excludeFromLatest": "[parameters('hide')]"}]
    template = write(arm(body, parameters={"timeout": {"type": "int"}, "hide": {"type": "bool"}}))
    props = load_template(template, values={"timeout": "90", "hide": "True"}).template.properties
    assert (props.buildTimeoutInMinutes, props.distribute[0].excludeFromLatest) == (90, True)
    assert problems(template, values={"timeout": "ninety", "hide": "true"}) == [
        "parameters.timeout: parameter 'timeout' is int; 'ninety' is not"
    ]


def render(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["render", *args]) == 0
    return json.loads(out.getvalue())


def test_parameters_file_and_set_precedence(write, body):
    body["location"] = "[parameters('location')]"
    body["properties"]["buildTimeoutInMinutes"] = "[parameters('timeout')]"
    body["properties"]["distribute"][0]["runOutputName"] = "[parameters('out')]"
    template = write(arm(body, parameters={"location": {"type": "string"}, "timeout": {"type": "int"},
                                           "out": {"type": "string", "defaultValue": "fromDefault"}}))
    params = write({"$schema": "x", "parameters": {"location": {"value": "fromFile"}, "timeout": {"value": 30},
                                                   "out": {"value": "fromFile"}}}, name="p.json")
    rendered = render("--parameters", str(params), "--set", "out=fromSet", str(template))
    assert rendered["location"] == "fromFile"
    assert rendered["properties"]["buildTimeoutInMinutes"] == 30
    assert rendered["properties"]["distribute"][0]["runOutputName"] == "fromSet"


def test_parameters_file_may_be_a_bare_map(write):
    assert read_parameters_file(write({"a": 1, "b": {"value": "x"}})) == {"a": 1, "b": "x"}


def test_arm_escape_keeps_a_literal_bracket(write, body):
    body["properties"]["customize"] = [{"type": "Shell", "inline": ["[[ -f /etc/os-release ]"]}]
    loaded = load_template(write(arm(body)))
    assert loaded.template.properties.customize[0].inline == ["[ -f /etc/os-release ]"]


@pytest.mark.parametrize(("expression", "message"), [
    ("[resourceGroup().location]",
     "ARM function 'resourceGroup()' is not supported here (supported: parameters, variables, concat)"),
    ("[parameters('nope')]", "parameters('nope') is not declared in 'parameters' (declared: none)"),
    ("[variables('nope')]", "variables('nope') is not declared in 'variables' (declared: none)"),
    ("[concat('a',]", "ARM expression ends too early"),
    ("[parameters('a', 'b')]", "parameters() takes one string argument"),
])
def test_arm_expression_errors(write, body, expression, message):
    body["location"] = expression
    assert problems(write(arm(body))) == [f"resources[0].location: {message}"]


def test_arm_cycles_are_errors(write, body):
    body["location"] = "[variables('a')]"
    assert problems(write(arm(body, variables={"a": "[variables('b')]", "b": "[variables('a')]"}))) == [
        "variables.b: variables('a') refers to itself"
    ]
    body["location"] = "[parameters('p')]"
    assert problems(write(arm(body, parameters={"p": {"type": "string", "defaultValue": "[parameters('p')]"}}))) == [
        "parameters.p.defaultValue: parameters('p') refers to itself"
    ]


def test_arm_sections_must_be_objects(write, body):
    template = arm(body)
    template["parameters"] = ["location"]
    assert problems(write(template)) == ["parameters: 'parameters' must be an object of name -> definition"]


@pytest.mark.parametrize(("resources", "message"), [
    ([], "found no 'Microsoft.VirtualMachineImages/imageTemplates' resources; a template file holds exactly one image"),
    ([{"type": RESOURCE}, {"type": RESOURCE}],
     "found 2 'Microsoft.VirtualMachineImages/imageTemplates' resources; a template file holds exactly one image"),
    ("nope", "an ARM deployment template needs a 'resources' array"),
])
def test_arm_template_holds_exactly_one_image(write, resources, message):
    assert problems(write({"$schema": "x", "resources": resources})) == [f"resources: {message}"]


def test_not_a_template_shape(write):
    assert problems(write({"name": "x"})) == [
        ": not an image template: expected a resource body with 'properties', an ARM deployment template with "
        "'resources', or a bare properties object with 'source' and 'distribute'"
    ]


# --- placeholders ---------------------------------------------------------------------------------------------

def test_placeholders_are_substituted(write, body):
    body["location"] = "<region>"
    body["properties"]["stagingResourceGroup"] = "/subscriptions/<sub>/resourceGroups/<rg>"
    loaded = load_template(write(body), values={"region": "westus", "sub": "0000", "rg": "build"})
    assert loaded.template.location == "westus"
    assert loaded.template.properties.stagingResourceGroup == "/subscriptions/0000/resourceGroups/build"
    assert loaded.notes == []


def test_unresolved_placeholders_are_listed_all_at_once(write, body):
    body["location"] = "<region>"
    body["properties"]["distribute"] = [
        {"type": "ManagedImage", "runOutputName": "<name>", "imageId": "/s/<sub>/images/<name>", "location": "<region>"},
        {"type": "VHD", "runOutputName": "vhd", "uri": "https://<account>/<name>"},
    ]
    assert problems(write(body)) == [
        "location: unresolved placeholder <region> (and 1 more place): pass --set region=VALUE",
        "properties.distribute[0].runOutputName: unresolved placeholder <name> (and 2 more places): pass --set name=VALUE",
        "properties.distribute[0].imageId: unresolved placeholder <sub>: pass --set sub=VALUE",
        "properties.distribute[1].uri: unresolved placeholder <account>: pass --set account=VALUE",
    ]


def test_allow_placeholders_checks_the_structure_around_them(write, body):
    body["location"] = "<region>"
    body["properties"]["distribute"][0]["runOutputName"] = "<runOutputName>"
    loaded = load_template(write(body), allow_placeholders=True)
    assert loaded.unresolved == ("region", "runOutputName")
    body["properties"]["distribute"][0]["aritfactTags"] = {}
    assert problems(write(body), allow_placeholders=True) == [
        "properties.distribute[0].aritfactTags: unknown field 'aritfactTags' — did you mean 'artifactTags'?"
    ]


def test_placeholders_inside_inline_are_not_reported_but_are_substituted(write, body):
    body["properties"]["customize"] = [{"type": "Shell", "inline": ["echo '<html>' > /tmp/i.html", "echo <greeting>"]}]
    loaded = load_template(write(body))
    assert loaded.template.properties.customize[0].inline == ["echo '<html>' > /tmp/i.html", "echo <greeting>"]
    loaded = load_template(write(body), values={"greeting": "hi"})
    assert loaded.template.properties.customize[0].inline[1] == "echo hi"


def test_unused_set_value_is_a_note(write, body):
    loaded = load_template(write(body), values={"nope": "1"})
    assert [n.format("t.json") for n in loaded.notes] == [
        "t.json: note: --set nope matches no parameter or placeholder in this template"
    ]


def test_template_dir_is_built_in(write, body, tmp_path):
    body["properties"]["customize"] = [{"type": "Shell", "scriptUri": "file://<templateDir>/scripts/setup.sh"}]
    loaded = load_template(write(body))
    assert loaded.template.properties.customize[0].scriptUri == f"file://{tmp_path}/scripts/setup.sh"


# --- read-only fields and the goldsmith block ------------------------------------------------------------------

def test_read_only_fields_are_noted_and_ignored(write, body):
    body["id"] = "/subscriptions/0/x"
    body["properties"]["provisioningState"] = "Succeeded"
    body["properties"]["source"]["exactVersion"] = "24.04.202401010"
    body["identity"] = {"type": "UserAssigned", "userAssignedIdentities": {"/ids/a": {"principalId": "p"}}}
    loaded = load_template(write(body))
    assert sorted(n.format("t.json") for n in loaded.notes) == [
        f"t.json:{path}: note: read-only field (set by the service): ignored"
        for path in ["id", "identity.userAssignedIdentities./ids/a.principalId", "properties.provisioningState",
                     "properties.source.exactVersion"]
    ]
    dumped = loaded.template.model_dump(by_alias=True, exclude_none=True)
    assert "id" not in dumped and "exactVersion" not in dumped["properties"]["source"]


def test_goldsmith_block(write, body):
    body["goldsmith"] = {"backend": "azure", "schedule": "@weekly", "retries": 0, "owner": "platform",
                         "tags": ["golden"], "rebuild": "always"}
    options = load_template(write(body)).options
    assert (options.backend, options.schedule, options.retries, options.owner, options.tags, options.rebuild) == (
        "azure", "@weekly", 0, "platform", ["golden"], "always")
    assert options.retryDelaySeconds == 30 and options.azureConnectionId == "azure_default"


def test_goldsmith_block_problems(write, body):
    body["goldsmith"] = {"backnd": "azure", "retries": 11, "rebuild": "never"}
    assert problems(write(body)) == [
        "goldsmith.rebuild: 'never' is not allowed: expected 'onChange' or 'always' or 'onUpdates'",
        "goldsmith.retries: Input should be less than or equal to 10",
        "goldsmith.backnd: unknown field 'backnd' — did you mean 'backend'?",
    ]


def test_goldsmith_block_sits_beside_an_arm_template(write, body):
    template = arm(body)
    template["goldsmith"] = {"backend": "azure"}
    assert load_template(write(template)).options.backend == "azure"


# --- reading the file ------------------------------------------------------------------------------------------

def test_invalid_json_names_line_and_column(write):
    path = write('{\n  "location": "x",\n  "properties": {,}\n}')
    with pytest.raises(TemplateError) as e:
        load_template(path)
    assert str(e.value) == f"{path}:3:18: invalid JSON: Expecting property name enclosed in double quotes"


@pytest.mark.parametrize(("text", "message"), [
    ('{"location": "a", "location": "b"}', "invalid template: duplicate key 'location'"),
    ('{"properties": {"buildTimeoutInMinutes": NaN}}', "invalid template: 'NaN' is not a JSON value"),
    ("[1, 2]", "a template is a JSON object, not an array"),
    ('"text"', "a template is a JSON object, not a string"),
    ("[" * 100_000, "invalid template: JSON nested too deeply"),
    ('{"properties": {"provisioningState": ' + "[" * 700 + "]" * 700 + "}}", "invalid template: JSON nested too deeply"),
])
def test_unreadable_documents(write, text, message):
    assert problems(write(text)) == [f": {message}"]


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"location": "Zürich"}'.encode("latin-1"))
    assert problems(path) == [": not UTF-8 text (byte 15): save the file as UTF-8"]


def test_utf8_bom_is_tolerated(tmp_path, body):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(body).encode())
    assert problems(path) == []


def test_missing_file_and_directory(tmp_path):
    assert problems(tmp_path / "nope.json") == [": no such file"]
    assert problems(tmp_path) == [": is a directory, not a template file"]
