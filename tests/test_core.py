"""The core's registry and waits: every name resolves to a real part; a Pending's wait is plain JSON that
becomes the trigger which waits on it."""

from __future__ import annotations

import json

import pytest

from goldsmith import core
from goldsmith.core import BuildError, Pending


@pytest.mark.parametrize("registry,name", [(r, n) for r in (core.BACKENDS, core.TRIGGERS) for n in r])
def test_every_registered_name_resolves(registry, name):
    assert isinstance(core.load(registry, name), type)


def test_a_wait_is_plain_json_and_becomes_its_trigger():
    wait = {"trigger": "arm", "conn_id": "azure_build", "poll_interval": 2.0,
            "waits": [{"kind": "provisioned", "id": "/subscriptions/s/resourceGroups/g", "label": "group"}]}
    pending = Pending("the staging group", wait)
    assert json.loads(json.dumps(pending.wait)) == wait and str(pending) == "the staging group"
    trigger = core.trigger_for(pending.wait)
    classpath, kwargs = trigger.serialize()
    assert classpath == "goldsmith.azure.triggers.ArmWaitTrigger"
    assert kwargs == {"conn_id": "azure_build", "waits": wait["waits"], "poll_interval": 2.0}
    assert pending.wait["trigger"] == "arm"  # trigger_for leaves the wait as it was


def test_an_unknown_name_is_a_clear_error():
    with pytest.raises(BuildError, match=r"'ssh' is not one of arm in this installation"):
        core.trigger_for({"trigger": "ssh"})
