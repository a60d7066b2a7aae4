"""Request bodies checked against the published API definitions, as ARM's resource providers check them.

The azure-mgmt-* packages are generated from the REST specs (TypeSpec): each model's fields carry their
REST name, their visibility (read-only fields are `["read"]`), whether they are required (not Optional)
and, for a closed set of values, the enum. `check(type, body)` walks a PUT body through the model of its
resource type and refuses, with the provider's status and error code:

- a required property that is missing (400 InvalidParameter on Compute, InvalidRequestFormat on Network);
- a value outside its enum, compared case-insensitively as the services do (same codes), except for
  enums ARM treats as open (`OPEN_ENUMS`, e.g. vmSize: sizes come and go, `resourceSkus` decides).

Read-only properties in a request are ignored by ARM, so they are not refused here. Patterns, lengths and
ranges are not in the generated models: the platform rules that need them live with their handlers.
"""

from __future__ import annotations

import enum
import functools
import typing

from .core import ArmError

# resource type -> (models module, model name)
MODELS = {
    "Microsoft.Compute/virtualMachines": ("azure.mgmt.compute.models", "VirtualMachine"),
    "Microsoft.Compute/virtualMachines/runCommands": ("azure.mgmt.compute.models", "VirtualMachineRunCommand"),
    "Microsoft.Compute/disks": ("azure.mgmt.compute.models", "Disk"),
    "Microsoft.Compute/images": ("azure.mgmt.compute.models", "Image"),
    "Microsoft.Compute/galleries": ("azure.mgmt.compute.models", "Gallery"),
    "Microsoft.Compute/galleries/images": ("azure.mgmt.compute.models", "GalleryImage"),
    "Microsoft.Compute/galleries/images/versions": ("azure.mgmt.compute.models", "GalleryImageVersion"),
    "Microsoft.Network/virtualNetworks": ("azure.mgmt.network.models", "VirtualNetwork"),
    "Microsoft.Network/virtualNetworks/subnets": ("azure.mgmt.network.models", "Subnet"),
    "Microsoft.Network/networkSecurityGroups": ("azure.mgmt.network.models", "NetworkSecurityGroup"),
    "Microsoft.Network/networkSecurityGroups/securityRules": ("azure.mgmt.network.models", "SecurityRule"),
    "Microsoft.Network/publicIPAddresses": ("azure.mgmt.network.models", "PublicIPAddress"),
    "Microsoft.Network/networkInterfaces": ("azure.mgmt.network.models", "NetworkInterface"),
    "Microsoft.Storage/storageAccounts": ("azure.mgmt.storage.models", "StorageAccountCreateParameters"),
}
# Enums whose published list lags what the service accepts.
OPEN_ENUMS = {"hardwareProfile.vmSize"}


@functools.cache
def _fields(model: type) -> list[tuple[str, typing.Any, bool]]:
    """(REST name, type hint without Optional, required) of each field a request may set."""
    import importlib
    module = importlib.import_module(model.__module__)
    package = importlib.import_module(model.__module__.rsplit(".", 1)[0])  # the models package: `_models`
    hints = typing.get_type_hints(model, globalns={**vars(module), "_models": package})
    model.__new__(model)  # the SDK computes a model's field table on its first instance
    out = []
    for attr, field in model._attr_to_rest_field.items():
        if field._visibility and "create" not in field._visibility and "update" not in field._visibility:
            continue  # read-only
        hint = hints.get(attr)
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is typing.Union and type(None) in args
        if optional:
            rest = [a for a in args if a is not type(None)]
            hint = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        out.append((field._rest_name, hint, not optional and field._default is _unset(model)))
    return out


def _unset(model: type):
    import importlib
    return importlib.import_module(model.__module__.rsplit(".", 2)[0] + "._utils.model_base")._UNSET


def _model_of(hint) -> type | None:
    return hint if isinstance(hint, type) and hasattr(hint, "_is_model") else None


def _enum_of(hint) -> type[enum.Enum] | None:
    for arg in typing.get_args(hint) or (hint,):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return arg
    return None


def check(resource_type: str, body: dict) -> None:
    """Raise the ArmError the resource provider answers a PUT of `body` with, if any."""
    spec = MODELS.get(resource_type)
    if spec is None or not isinstance(body, dict):
        return
    import importlib
    model = getattr(importlib.import_module(spec[0]), spec[1])
    namespace = resource_type.split("/")[0]
    _walk(model, body, "", namespace)


def _refuse(namespace: str, message: str) -> ArmError:
    return ArmError(400, "InvalidRequestFormat" if namespace == "Microsoft.Network" else "InvalidParameter", message)


def _walk(model: type, body: dict, path: str, namespace: str) -> None:
    for name, hint, required in _fields(model):
        here = f"{path}.{name}" if path else name
        value = body.get(name)
        if value is None:
            if required and name not in ("id", "name", "type", "location"):  # location: LocationRequired
                raise _refuse(namespace, f"Required parameter '{here}' is missing (null).")
            continue
        _value(hint, value, here, namespace)


def _value(hint, value, path: str, namespace: str) -> None:
    origin = typing.get_origin(hint)
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        for index, element in enumerate(value):
            _value(item, element, f"{path}[{index}]", namespace)
    elif origin is dict and isinstance(value, dict):
        for key, element in value.items():
            _value(typing.get_args(hint)[1], element, f"{path}.{key}", namespace)
    elif (model := _model_of(hint)) is not None and isinstance(value, dict):
        _walk(model, value, path, namespace)
    elif (choices := _enum_of(hint)) is not None and isinstance(value, str) and path.split(".", 1)[-1] not in OPEN_ENUMS:
        allowed = [c.value for c in choices]
        if value.lower() not in {a.lower() for a in allowed}:
            raise _refuse(namespace, f"The value '{value}' of parameter '{path}' is not valid: it must be one of "
                          f"{', '.join(allowed)}.")
