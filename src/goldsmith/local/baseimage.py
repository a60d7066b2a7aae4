"""Base disks for the local backend, cached by digest under ``$GOLDSMITH_CACHE`` (``~/.cache/goldsmith``).

``ensure_base_image(entry)`` returns ``<cache>/base/<digest>/disk.qcow2``, making it at most once: a file
lock serialises processes asking for the same digest, and the disk is made in a temporary directory
renamed into place, so a cached disk is always complete.

- ``url`` entries are downloaded and checked against their sha256, and must be qcow2 without a backing file.
- ``recipe`` entries are bootstrapped from the Debian mirror (needs root: loop device, mount, chroot):
  mmdebstrap (variant apt + merged-usr hook) into an ext4 root (p1) of a GPT disk with a BIOS boot
  partition (p14), like Debian's cloud images; GRUB for BIOS with timeout 0 and the console on ttyS0;
  linux-image-cloud-amd64 (virtio and Hyper-V drivers); systemd-networkd (DHCP on en*) and
  systemd-resolved; openssh-server with no host keys baked in; cloud-init with the NoCloud datasource
  only, ed25519 host keys only, and only the modules a build VM uses, in three stages instead of four;
  locale C.UTF-8; sudo. Timers and units a build VM doesn't need are masked (wait-online, apt-daily,
  e2scrub, fstrim, dpkg-db-backup). The initramfs holds only the root disk's drivers (6.7 MB, not 15 MB:
  less for GRUB to read and the kernel to unpack). Nothing else (no waagent).

``GOLDSMITH_DEBIAN_MIRROR`` overrides the mirror the build downloads from (not the one written into the
image's sources.list, which is part of the recipe and its digest).

Measured on this host (2 cores, Debian 12, QEMU 7.2, deb.debian.org): a recipe build takes 124-145 s
(mmdebstrap ~85 s of it, the zstd qcow2 conversion ~7 s) and gives a 143 MiB qcow2 of a 4 GiB disk
(~450 MiB used). Booted under TCG (pc, qemu64, 2 vCPUs, idle host) SSH answers after ~79 s and cloud-init
is done ~25 s later.

Pitfalls handled: loop partition nodes may not appear by themselves (``partx -a``); GRUB 2.06 can't read
ext4 with ``metadata_csum_seed``/``orphan_file`` (mke2fs ``-O ^...``); ``grub-install`` can't map a loop
partition to a GRUB drive, so the core image is made with ``grub-mkimage`` (finding the root by fs UUID)
and written with ``grub-bios-setup`` inside the chroot; ``grub-mkconfig`` in a chroot without udev
writes ``root=/dev/loopXpY``, so grub.cfg is written here (an in-guest ``update-grub`` regenerates it
correctly from /etc/default/grub).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from goldsmith.local import disk
from goldsmith.local.catalog import CatalogEntry, Recipe
from goldsmith.settings import goldsmith_cache

log = logging.getLogger(__name__)

DISK_NAME = "disk.qcow2"
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")
# Tools the recipe build runs on the host, and the Debian package of each.
HOST_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "sgdisk": "gdisk",
    "losetup": "mount",
    "partx": "util-linux",
    "mkfs.ext4": "e2fsprogs",
    "fstrim": "util-linux",
    "qemu-img": "qemu-utils",
}
MASKED_UNITS = (
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "cloud-config.service",  # its modules run in cloud-final (see 90_goldsmith.cfg)
)
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "hv_vmbus", "hv_storvsc")
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200"
BUILD_VM_MARKER = "/etc/goldsmith-build-vm"  # see grub.cfg in _install_grub


class BaseImageError(RuntimeError):
    """The base disk could not be made."""


def ensure_base_image(entry: CatalogEntry, cache_dir: Path | None = None) -> Path:
    """The cached qcow2 base disk for a catalog entry, made first if needed."""
    base = Path(cache_dir or goldsmith_cache()) / "base"
    base.mkdir(parents=True, exist_ok=True)
    final = base / entry.digest
    if (final / DISK_NAME).is_file():
        return final / DISK_NAME
    with _locked(base / f"{entry.digest}.lock"):
        if (final / DISK_NAME).is_file():  # another process made it while we waited
            return final / DISK_NAME
        for stale in base.glob(f".tmp-{entry.digest}-*"):
            _remove_workdir(stale)  # left by a killed build; we hold the lock, so nobody uses it
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.digest}-", dir=base))
        try:
            started = time.monotonic()
            if entry.recipe is not None:
                _build_recipe(entry.recipe, work)
            else:
                _download(entry, work)
            seconds = round(time.monotonic() - started, 1)
            meta = {"urn": entry.urn, "kind": entry.kind, "digest": entry.digest, "url": entry.url,
                    "build_seconds": seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (work / "entry.json").write_text(json.dumps(meta, indent=2) + "\n")
            (work / DISK_NAME).chmod(0o444)  # overlays use it as their backing file: it must never change
            work.chmod(0o755)  # mkdtemp made it private; the cache is shared read-only
            work.rename(final)
            log.info("base image %s ready in %.0f s: %s", entry.urn, seconds, final / DISK_NAME)
        finally:
            if work.exists():
                _remove_workdir(work)
    return final / DISK_NAME


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(entry: CatalogEntry, work: Path) -> None:
    target = work / DISK_NAME
    digest = hashlib.sha256()
    log.info("downloading %s", entry.url)
    try:
        with urllib.request.urlopen(entry.url, timeout=60) as response, target.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise BaseImageError(f"cannot download {entry.urn} from {entry.url}: {exc}") from None
    if digest.hexdigest() != entry.sha256:
        raise BaseImageError(
            f"{entry.url} has sha256 {digest.hexdigest()}, the platform catalog says {entry.sha256}: "
            "the download is corrupt or the catalog entry is wrong"
        )
    # A backing file named inside a downloaded image could expose any host file to the guest.
    info = subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(target)],
                          capture_output=True, text=True)
    if info.returncode != 0 or "backing-filename" in json.loads(info.stdout):
        raise BaseImageError(f"{entry.url} is not a standalone qcow2 image")


# --- the offline Debian recipe ---------------------------------------------------------------


def _build_recipe(recipe: Recipe, work: Path) -> None:
    if os.geteuid() != 0:
        raise BaseImageError(
            "building the Debian base image needs root (loop device, mount, chroot); run as root, "
            "or copy a built base into the cache ($GOLDSMITH_CACHE/base/<digest>/disk.qcow2)"
        )
    missing = [f"{tool} (package {pkg})" for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool)]
    if not MERGED_USR_HOOK.is_dir():
        missing.append(f"{MERGED_USR_HOOK} (package mmdebstrap)")
    if missing:
        raise BaseImageError(f"the base image build needs {', '.join(missing)}: run `make setup`")
    raw = work / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(recipe.disk_size_gib * disk.GIB)
    # p14: BIOS boot partition for GRUB's core image; p1: root filesystem, the rest of the disk.
    _run(["sgdisk", "-o", "-n", "14:2048:8191", "-t", "14:ef02", "-c", "14:bios",
          "-n", "1:8192:0", "-t", "1:8300", "-c", "1:root", raw], work)
    fs_uuid = str(uuid.uuid4())
    root = work / "root"
    root.mkdir()
    with _loop_device(raw, work) as loop:
        part = _partition_node(loop, 1, work)
        _run(["mkfs.ext4", "-q", "-L", "root", "-U", fs_uuid, "-O", "^metadata_csum_seed,^orphan_file", part],
             work)
        with _mounted(part, root, work):
            _bootstrap(recipe, root, work)
            _configure(recipe, root, fs_uuid, work)
            with _chroot_mounts(root, work):
                _run(["chroot", root, "update-initramfs", "-u", "-k", "all"], work)  # with INITRAMFS_MODULES
                _install_grub(root, loop, fs_uuid, work)
            _run(["fstrim", root], work)  # unused blocks become holes in disk.raw, so the qcow2 stays small
    root.rmdir()
    disk.to_qcow2(raw, work / DISK_NAME, compress=True)
    raw.unlink()


def _bootstrap(recipe: Recipe, root: Path, work: Path) -> None:
    mirror = os.environ.get("GOLDSMITH_DEBIAN_MIRROR", recipe.mirror)
    argv = [
        "mmdebstrap", "--variant=apt", "--mode=root", "--format=directory",
        f"--hook-dir={MERGED_USR_HOOK}",  # without it, usrmerge pulls in Perl (+50 MB)
        # No debconf prompt for GRUB's install device: this build writes the boot code itself.
        "--essential-hook=echo 'grub-pc grub-pc/install_devices_empty boolean true'"
        " | chroot \"$1\" debconf-set-selections",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in recipe.path_exclude),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        recipe.suite, root, mirror,
    ]
    log.info("mmdebstrap %s from %s (about 90 s)", recipe.suite, mirror)
    _run(argv, work)


def _configure(recipe: Recipe, root: Path, fs_uuid: str, work: Path) -> None:
    files = {
        "etc/apt/sources.list": (
            f"deb {recipe.mirror} {recipe.suite} main\n"
            f"deb {recipe.mirror} {recipe.suite}-updates main\n"
            f"deb {recipe.security_mirror} {recipe.suite}-security main\n"
        ),
        "etc/fstab": f"UUID={fs_uuid} / ext4 rw,discard,errors=remount-ro 0 1\n",
        "etc/hostname": "localhost\n",  # mmdebstrap copies the host's; cloud-init sets the real one
        "etc/machine-id": "",  # empty: each VM gets its own on first boot
        "etc/default/locale": "LANG=C.UTF-8\n",
        "etc/ssh/sshd_config.d/10-ed25519-host-key.conf": "HostKey /etc/ssh/ssh_host_ed25519_key\n",
        "etc/cloud/cloud.cfg.d/90_goldsmith.cfg": (
            "datasource_list: [NoCloud]\n"
            "ssh_genkeytypes: [ed25519]  # an RSA key takes ~20 s under TCG\n"
            "manage_etc_hosts: true\n"
            # Only the modules a build VM uses (seed, users, keys, host name, disk growth, user scripts): each
            # other one costs time at every boot under emulation. The locale is set above, not by cloud-init.
            # The config stage's two modules run in the final stage: cloud-config.service is masked, as each
            # stage's Python start costs 6-14 s a boot under TCG.
            "cloud_init_modules: [bootcmd, write-files, growpart, resizefs, set_hostname, update_hostname,"
            " update_etc_hosts, users-groups, ssh]\n"
            "cloud_config_modules: []\n"
            "cloud_final_modules: [set-passwords, runcmd, write-files-deferred, scripts-vendor, scripts-per-once,"
            " scripts-per-boot, scripts-per-instance, scripts-user, power-state-change]\n"
        ),
        # What set-passwords would write (ssh_pwauth: false) already there, so it does not restart sshd
        # while the build is connecting.
        "etc/ssh/sshd_config.d/50-cloud-init.conf": "PasswordAuthentication no\n",
        # Only the root disk's drivers in the initramfs (virtio for QEMU, Hyper-V for Azure), not most of them.
        "etc/initramfs-tools/conf.d/goldsmith": "MODULES=list\n",
        "etc/initramfs-tools/modules": "".join(f"{m}\n" for m in INITRAMFS_MODULES),
        "etc/systemd/network/50-dhcp-en.network": "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n",
        # Read by update-grub when a kernel or GRUB upgrade runs inside the guest.
        "etc/default/grub": (
            "GRUB_DEFAULT=0\nGRUB_TIMEOUT=0\nGRUB_TIMEOUT_STYLE=hidden\nGRUB_DISTRIBUTOR=Debian\n"
            f'GRUB_CMDLINE_LINUX_DEFAULT=""\nGRUB_CMDLINE_LINUX="{KERNEL_CMDLINE}"\n'
            'GRUB_TERMINAL="console serial"\nGRUB_SERIAL_COMMAND="serial --speed=115200"\n'
            "GRUB_DISABLE_OS_PROBER=true\nGRUB_DISABLE_RECOVERY=true\n"
        ),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    # Host keys are made per VM by cloud-init; none may ship in the image.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for link in ("vmlinuz.old", "initrd.img.old"):
        (root / link).unlink(missing_ok=True)
    # The guest's own systemctl: it edits unit links offline in a chroot, and the host may have none.
    _run(["chroot", root, "systemctl", "--quiet", "enable", "systemd-networkd.service", "systemd-resolved.service"],
         work)
    _run(["chroot", root, "systemctl", "--quiet", "mask", *MASKED_UNITS], work)


def _install_grub(root: Path, loop: str, fs_uuid: str, work: Path) -> None:
    grub_dir = root / "boot/grub"
    (grub_dir / "i386-pc").mkdir(parents=True, exist_ok=True)
    for module in (root / "usr/lib/grub/i386-pc").iterdir():
        if module.suffix in (".mod", ".lst") or module.name == "boot.img":
            shutil.copy2(module, grub_dir / "i386-pc" / module.name)
    (root / "tmp/early-grub.cfg").write_text(f"search.fs_uuid {fs_uuid} root\nset prefix=($root)/boot/grub\n")
    _run(["chroot", root, "grub-mkimage", "-O", "i386-pc", "-d", "/usr/lib/grub/i386-pc",
          "-c", "/tmp/early-grub.cfg", "-o", "/boot/grub/i386-pc/core.img", "-p", "/boot/grub",
          "biosdisk", "part_gpt", "ext2", "search_fs_uuid"], work)
    (root / "tmp/early-grub.cfg").unlink()
    _run(["chroot", root, "grub-bios-setup", "-d", "/boot/grub/i386-pc", loop], work)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise BaseImageError(f"expected one kernel in the base image, found {[k.name for k in kernels]}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    (grub_dir / "grub.cfg").write_text(
        "set timeout=0\n"
        "serial --speed=115200\nterminal_input console serial\nterminal_output console serial\n"
        "insmod part_gpt\ninsmod ext2\n"
        f"search --no-floppy --fs-uuid --set=root {fs_uuid}\n"
        # A build VM's later boots skip cloud-init (its work is done after the first boot; three Python
        # stages cost 40-100 s a boot under TCG). The local backend makes the marker after the first boot and
        # removes it before generalizing; an in-guest update-grub drops this test, so cloud-init runs again.
        f"if [ -e {BUILD_VM_MARKER} ]; then set extra=cloud-init=disabled; fi\n"
        f"linux /boot/vmlinuz-{version} root=UUID={fs_uuid} ro {KERNEL_CMDLINE} $extra\n"
        f"initrd /boot/initrd.img-{version}\n"
        "boot\n"
    )


# --- host plumbing: every context manager undoes what it did, even on failure ----------------


def _run(argv: list, work: Path) -> None:
    """Run a build command, appending its output to work/build.log; fail with the log's tail."""
    argv = [str(a) for a in argv]
    with (work / "build.log").open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (work / "build.log").read_text(errors="replace").splitlines()[-25:]
        raise BaseImageError(f"{argv[0]} failed (exit {done.returncode}); end of build log:\n" + "\n".join(tail))


@contextlib.contextmanager
def _loop_device(image: Path, work: Path) -> Iterator[str]:
    loop = subprocess.run(["losetup", "--find", "--show", "--partscan", str(image)],
                          capture_output=True, text=True)
    if loop.returncode != 0:
        raise BaseImageError(f"no loop device for {image}: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True)


def _partition_node(loop: str, number: int, work: Path) -> str:
    node = f"{loop}p{number}"
    if not Path(node).exists():
        # Without udev the kernel may not have announced the partitions; ask explicitly.
        subprocess.run(["partx", "--add", loop], capture_output=True)
    for _ in range(50):
        if Path(node).exists():
            return node
        time.sleep(0.1)
    raise BaseImageError(f"partition {node} did not appear (loop partitions need partx or udev)")


@contextlib.contextmanager
def _mounted(source: str, target: Path, work: Path, *options: str) -> Iterator[None]:
    _run(["mount", *options, source, target], work)
    try:
        yield
    finally:
        done = subprocess.run(["umount", "--recursive", str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("umount %s failed: %s", target, done.stderr.strip())


@contextlib.contextmanager
def _chroot_mounts(root: Path, work: Path) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(_mounted("/dev", root / "dev", work, "--bind"))
        stack.enter_context(_mounted("proc", root / "proc", work, "-t", "proc"))
        stack.enter_context(_mounted("sysfs", root / "sys", work, "-t", "sysfs"))
        yield


def _remove_workdir(path: Path) -> None:
    """Remove a build directory, first undoing any mount or loop device a killed build left in it."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "--lazy", mount], capture_output=True)
    for image in path.glob("*.raw"):
        attached = subprocess.run(["losetup", "--associated", str(image)], capture_output=True, text=True)
        for line in attached.stdout.splitlines():  # "/dev/loop0: [2049]:1234 (/path/disk.raw)"
            subprocess.run(["losetup", "--detach", line.split(":")[0]], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)
