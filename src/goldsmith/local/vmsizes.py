"""Azure ``vmProfile.vmSize`` -> (vCPUs, memory MiB) for the local build VM.

AIB builds on Standard_D1_v2 unless the template says otherwise; the local backend gives its QEMU VM the
same vCPUs and memory, and ``goldsmith.local.qemu.launch`` caps them to what this host has. Under TCG
(no usable KVM) extra vCPUs help only up to the host's cores (``-accel tcg,thread=multi``).
Names match case-insensitively, as Azure's do.
"""

from __future__ import annotations

DEFAULT_VM_SIZE = "Standard_D1_v2"

_GIB = 1024


def _family(pattern: str, vcpu_counts: tuple[int, ...], gib_per_vcpu: float) -> dict[str, tuple[int, int]]:
    return {pattern.format(n=n): (n, int(n * gib_per_vcpu * _GIB)) for n in vcpu_counts}


VM_SIZES: dict[str, tuple[int, int]] = {
    # B-series (burstable).
    "Standard_B1ls": (1, 512),
    "Standard_B1s": (1, 1 * _GIB),
    "Standard_B1ms": (1, 2 * _GIB),
    "Standard_B2s": (2, 4 * _GIB),
    "Standard_B2ms": (2, 8 * _GIB),
    "Standard_B4ms": (4, 16 * _GIB),
    "Standard_B8ms": (8, 32 * _GIB),
    # Dv2 / DSv2: 3.5 GiB per vCPU; the number in the name is not the vCPU count.
    **{
        f"Standard_{series}{number}_v2": (vcpus, int(vcpus * 3.5 * _GIB))
        for series in ("D", "DS")
        for number, vcpus in ((1, 1), (2, 2), (3, 4), (4, 8), (5, 16))
    },
    # Dv3 and later general purpose: 4 GiB per vCPU.
    **{
        name: size
        for suffix in ("_v3", "s_v3", "_v4", "s_v4", "d_v4", "ds_v4", "_v5", "s_v5", "d_v5", "ds_v5",
                       "as_v5", "ads_v5")
        for name, size in _family("Standard_D{n}" + suffix, (2, 4, 8, 16, 32, 48, 64), 4).items()
    },
    # Memory optimised (E) 8 GiB per vCPU, compute optimised (F) 2 GiB per vCPU.
    **_family("Standard_E{n}s_v5", (2, 4, 8, 16, 32), 8),
    **_family("Standard_E{n}s_v3", (2, 4, 8, 16, 32), 8),
    **_family("Standard_F{n}s_v2", (2, 4, 8, 16, 32), 2),
}

_BY_LOWER = {name.lower(): size for name, size in VM_SIZES.items()}


class VmSizeError(ValueError):
    """A vmSize this table does not know."""


def vm_size(name: str | None) -> tuple[int, int]:
    """(vCPUs, memory MiB) for an Azure vmSize; ``None`` or ``""`` means AIB's default, Standard_D1_v2."""
    size = _BY_LOWER.get((name or DEFAULT_VM_SIZE).lower())
    if size is None:
        raise VmSizeError(
            f"vmProfile.vmSize {name!r} is not known to the local backend. Known sizes: "
            f"{', '.join(sorted(VM_SIZES))}. Use one of these (default {DEFAULT_VM_SIZE}), "
            "or add it to goldsmith/local/vmsizes.py."
        )
    return size
