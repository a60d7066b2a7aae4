"""Azure vmSize -> vCPUs and memory for the local build VM."""

import pytest

from goldsmith.local.vmsizes import DEFAULT_VM_SIZE, VM_SIZES, VmSizeError, vm_size


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, (1, 3584)),
        ("", (1, 3584)),
        ("Standard_D1_v2", (1, 3584)),
        ("standard_ds2_v2", (2, 7168)),
        ("Standard_D2s_v3", (2, 8192)),
        ("Standard_D4ds_v4", (4, 16384)),
        ("Standard_D8as_v5", (8, 32768)),
        ("Standard_B1s", (1, 1024)),
        ("Standard_B2ms", (2, 8192)),
        ("Standard_F4s_v2", (4, 8192)),
        ("Standard_E2s_v5", (2, 16384)),
    ],
)
def test_known_sizes(name, expected):
    assert vm_size(name) == expected


def test_default_is_aibs():
    assert DEFAULT_VM_SIZE == "Standard_D1_v2" and DEFAULT_VM_SIZE in VM_SIZES


def test_unknown_size_names_it_and_lists_known_ones():
    with pytest.raises(VmSizeError) as err:
        vm_size("Standard_Z9_v9")
    assert "'Standard_Z9_v9'" in str(err.value) and "Standard_D2s_v3" in str(err.value)
