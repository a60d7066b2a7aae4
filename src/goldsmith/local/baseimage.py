"""Base disks for the local backend, cached by digest under ``$GOLDSMITH_CACHE`` (``~/.cache/goldsmith``).

``ensure_base_image(entry)`` returns ``<cache>/base/<digest>/disk.qcow2``, making it at most once: a file
lock serialises processes asking for the same digest, and the disk is made in a temporary directory
renamed into place, so a cached disk is always complete.

- ``url`` entries are downloaded and checked against their sha256, and must be qcow2 without a backing file.
- ``recipe`` entries are bootstrapped from the Debian mirror as an ordinary user (no root, no sudo):
  mmdebstrap in unshare mode (a user namespace; needs the user's subordinate ids in /etc/subuid and
  /etc/subgid, and newuidmap from package uidmap), variant apt + merged-usr hook. Its customize hook, as
  root of the namespace, configures the tree, writes it into an ext4 filesystem with ``mkfs.ext4 -d`` and
  copies that into the root partition (p1) of the GPT disk file; GRUB's boot.img and core.img go straight
  into the disk file (MBR and the BIOS boot partition p14), as grub-bios-setup would: no loop device, no
  mount of the disk. Like Debian's cloud images: GRUB for BIOS with timeout 0 and the console on ttyS0;
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

A user without subordinate ids can use a base an admin built once: ``python -m goldsmith.local.baseimage
--cache <the user's $GOLDSMITH_CACHE>`` (then chown the cache to the user).

Pitfalls handled: GRUB 2.06 can't read ext4 with ``metadata_csum_seed``/``orphan_file`` (mke2fs ``-O ^...``);
``grub-mkconfig`` in a chroot without udev guesses the root device wrong, so grub.cfg is written here (an
in-guest ``update-grub`` regenerates it correctly from /etc/default/grub); mmdebstrap keeps /dev, /proc and
/sys mounted in the tree during hooks, so ``mkfs.ext4 -d`` reads a non-recursive bind mount of it; the
namespace's root is a subordinate uid that cannot open the user's files, so the hook gets the disk as an
inherited file descriptor.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pwd
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from goldsmith.local import catalog, disk
from goldsmith.local.catalog import CatalogEntry, Recipe
from goldsmith.settings import goldsmith_cache

log = logging.getLogger(__name__)

DISK_NAME = "disk.qcow2"
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")
# Tools the recipe build runs on the host, and the Debian package of each.
HOST_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "newuidmap": "uidmap",  # mmdebstrap's unshare mode maps the user's subordinate ids with it
    "unshare": "util-linux",
    "sgdisk": "gdisk",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
}
SECTOR = 512
CORE_SECTOR = 2048  # the BIOS boot partition (p14), holding GRUB's core image, starts here
ROOT_SECTOR = 8192  # the root filesystem (p1) starts here
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
BUILD_VM_MARKER = "/etc/goldsmith-build-vm"  # see grub.cfg in _make_grub


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
    missing = [f"{tool} (package {pkg})" for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool)]
    if not MERGED_USR_HOOK.is_dir():
        missing.append(f"{MERGED_USR_HOOK} (package mmdebstrap)")
    if missing:
        raise BaseImageError(f"the base image build needs {', '.join(missing)}: run `make setup`")
    if os.geteuid() != 0:
        _check_unprivileged(os.geteuid())
    raw = work / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(recipe.disk_size_gib * disk.GIB)
    # p14: BIOS boot partition for GRUB's core image; p1: root filesystem, up to the backup GPT's 33 sectors.
    _run(["sgdisk", "-o", "-n", f"14:{CORE_SECTOR}:8191", "-t", "14:ef02", "-c", "14:bios",
          "-n", f"1:{ROOT_SECTOR}:{_last_root_sector(raw.stat().st_size)}", "-t", "1:8300", "-c", "1:root", raw], work)
    spec = json.dumps({"recipe": dataclasses.asdict(recipe), "fs_uuid": str(uuid.uuid4())})
    with raw.open("r+b") as out:
        _bootstrap(recipe, spec, out.fileno(), work)
    disk.to_qcow2(raw, work / DISK_NAME, compress=True)
    raw.unlink()


def _check_unprivileged(uid: int) -> None:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    if not _has_subids({user, str(uid)}):
        raise BaseImageError(
            f"user {user} has no subordinate uid/gid range in /etc/subuid and /etc/subgid, which mmdebstrap's "
            f"unshare mode needs: ask an admin for `usermod --add-subuids 100000-165535 --add-subgids "
            f"100000-165535 {user}`, or for a base built once with `python -m goldsmith.local.baseimage`"
        )
    private = [str(path) for path in (Path(sys.executable), Path(__file__)) if not _reachable_by_others(path)]
    if private:
        raise BaseImageError(
            f"the base image build runs {sys.executable} -m goldsmith.local.baseimage as the user's subordinate "
            f"root, which cannot reach {', '.join(private)}: make the directories on the way traversable by "
            "others (chmod o+x, e.g. a home created 0700), or install Goldsmith outside them"
        )


def _has_subids(names: set[str]) -> bool:
    """/etc/subuid and /etc/subgid list the user (by name or uid)."""
    def listed(path: str) -> bool:
        with contextlib.suppress(OSError):
            return any(line.split(":")[0] in names for line in Path(path).read_text().splitlines())
        return False

    return listed("/etc/subuid") and listed("/etc/subgid")


def _reachable_by_others(path: Path) -> bool:
    """Every directory on the way searchable by others, the file itself readable (the venv's python may be a
    symlink to the real interpreter: both paths count)."""
    for candidate in {path.absolute(), path.resolve()}:
        if not candidate.stat().st_mode & 0o004:
            return False
        if any(not parent.stat().st_mode & 0o001 for parent in candidate.parents):
            return False
    return True


def _last_root_sector(disk_size: int) -> int:
    return disk_size // SECTOR - 34  # the backup GPT: 32 sectors of entries and its header


def _bootstrap(recipe: Recipe, spec: str, disk_fd: int, work: Path) -> None:
    """mmdebstrap in a user namespace (unshare mode: no root needed); its customize hook makes the disk.

    In the namespace, root is the user's first subordinate uid, which cannot open the user's files: the hook
    writes the disk through `disk_fd`, inherited, and works in a temporary directory of its own."""
    mirror = os.environ.get("GOLDSMITH_DEBIAN_MIRROR", recipe.mirror)
    argv = [
        "mmdebstrap", "--variant=apt", "--mode=unshare", "--format=null",
        f"--hook-dir={MERGED_USR_HOOK}",  # without it, usrmerge pulls in Perl (+50 MB)
        # No debconf prompt for GRUB's install device: this build writes the boot code itself.
        "--essential-hook=echo 'grub-pc grub-pc/install_devices_empty boolean true'"
        " | chroot \"$1\" debconf-set-selections",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in recipe.path_exclude),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        f"--customize-hook={shlex.quote(sys.executable)} -m goldsmith.local.baseimage --finish-root"
        f" {disk_fd} {shlex.quote(spec)} \"$1\"",
        recipe.suite, "/dev/null", mirror,
    ]
    log.info("mmdebstrap %s from %s (about 90 s)", recipe.suite, mirror)
    _run(argv, work, pass_fds=(disk_fd,))


def finish_root(disk_fd: int, spec: dict, root: Path) -> None:
    """The customize hook, as (namespace) root: configure the tree, then write it as an ext4 filesystem and
    the boot code into the disk file, without loop devices or mounting the disk."""
    recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["recipe"].items()})
    fs_uuid = spec["fs_uuid"]
    with tempfile.TemporaryDirectory(prefix="goldsmith-base-") as scratch:
        work = Path(scratch)
        try:
            _configure(recipe, root, fs_uuid, work)
            _run(["chroot", root, "update-initramfs", "-u", "-k", "all"], work)  # with INITRAMFS_MODULES
            _make_grub(root, fs_uuid, work)
            _clean(root, work)
            # mmdebstrap's own apt configuration: it removes the file itself after this hook; not in the image.
            own = root / "etc/apt/apt.conf.d/00mmdebstrap"
            shutil.move(own, work / own.name)
            try:
                _make_root_fs(root, fs_uuid, os.fstat(disk_fd).st_size, work)
            finally:
                shutil.move(work / own.name, own)
            _copy_sparse(work / "root.ext4", disk_fd, ROOT_SECTOR * SECTOR)
            _write_boot_code(disk_fd, root / "usr/lib/grub/i386-pc/boot.img", root / "boot/grub/i386-pc/core.img")
        except BaseImageError as exc:
            print(exc, file=sys.stderr)  # into the outer build log, as the hook's output
            raise


def _clean(root: Path, work: Path) -> None:
    """What mmdebstrap cleans after the customize hooks, which is too late for the filesystem made here."""
    _run(["chroot", root, "apt-get", "clean"], work)
    for entry in (root / "var/lib/apt/lists").iterdir():
        if entry.name not in ("lock", "partial"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for name in ("var/log/dpkg.log", "var/log/apt/history.log",
                 "var/log/apt/term.log", "var/log/alternatives.log", "var/log/apt/eipp.log.xz",
                 "var/cache/ldconfig/aux-cache"):
        (root / name).unlink(missing_ok=True)


def _make_root_fs(root: Path, fs_uuid: str, disk_size: int, work: Path) -> None:
    sectors = _last_root_sector(disk_size) - ROOT_SECTOR + 1
    # mmdebstrap keeps /dev, /proc and /sys mounted in the tree; a non-recursive bind shows the tree alone.
    # Only this mount namespace sees it.
    tree = work / "tree"
    tree.mkdir()
    _run(["mount", "--bind", root, tree], work)
    try:
        # GRUB 2.06 can't read ext4 with metadata_csum_seed/orphan_file. Only used blocks are written: sparse.
        _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", fs_uuid, "-O", "^metadata_csum_seed,^orphan_file",
              "-E", "nodiscard", "-d", tree, work / "root.ext4", f"{sectors * SECTOR // 1024}k"], work)
    finally:
        _run(["umount", tree], work)


def _copy_sparse(source: Path, fd: int, offset: int) -> None:
    """Copy a sparse file's data extents into fd at offset (the holes stay holes)."""
    with source.open("rb") as src:
        size, position = os.fstat(src.fileno()).st_size, 0
        while position < size:
            try:
                start = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                start += os.copy_file_range(src.fileno(), fd, end - start, start, offset + start)
            position = end


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


def _make_grub(root: Path, fs_uuid: str, work: Path) -> None:
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


def _write_boot_code(fd: int, boot_img: Path, core_img: Path) -> None:
    """What grub-bios-setup does for a GPT disk with a BIOS boot partition, on a disk file: boot.img into the
    MBR (keeping the protective partition table) pointing at core.img in the BIOS boot partition, and the
    core's first sector (diskboot) listing the core's other sectors. No Reed-Solomon codes (as
    `grub-bios-setup --no-rs-codes`): they only repair a core image overwritten by other software."""
    boot, core = boot_img.read_bytes(), core_img.read_bytes()
    sectors = -(-len(core) // SECTOR)
    if sectors > 8192 - CORE_SECTOR:
        raise BaseImageError(f"GRUB's core image ({len(core)} bytes) does not fit the BIOS boot partition")
    mbr = bytearray(os.pread(fd, SECTOR, 0))
    # boot.img's code around the BIOS parameter block (0x03-0x5a, kept) and the partition table (0x1b8-, kept)
    mbr[0x00:0x03], mbr[0x5A:0x1B8] = boot[0x00:0x03], boot[0x5A:0x1B8]
    struct.pack_into("<Q", mbr, 0x5C, CORE_SECTOR)  # GRUB_BOOT_MACHINE_KERNEL_SECTOR
    mbr[0x66:0x68] = b"\x90\x90"  # GRUB_BOOT_MACHINE_DRIVE_CHECK: trust the BIOS's drive (a hard disk)
    first = bytearray(core[:SECTOR])
    # diskboot's blocklist, at the end of its sector: (start, count, load segment), then a zero terminator.
    struct.pack_into("<QHH", first, SECTOR - 12, CORE_SECTOR + 1, sectors - 1, 0x820)
    struct.pack_into("<QHH", first, SECTOR - 24, 0, 0, 0)
    os.pwrite(fd, mbr, 0)
    os.pwrite(fd, first + core[SECTOR:], CORE_SECTOR * SECTOR)


# --- host plumbing ----------------------------------------------------------------------------


def _run(argv: list, work: Path, pass_fds: tuple[int, ...] = ()) -> None:
    """Run a build command, appending its output to work/build.log; fail with the log's tail."""
    argv = [str(a) for a in argv]
    with (work / "build.log").open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              pass_fds=pass_fds)
    if done.returncode != 0:
        tail = (work / "build.log").read_text(errors="replace").splitlines()[-25:]
        raise BaseImageError(f"{argv[0]} failed (exit {done.returncode}); end of build log:\n" + "\n".join(tail))


def _remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m goldsmith.local.baseimage",
        description="Build (once) the base disks of the platform catalog's recipes into the cache, e.g. by an admin "
                    "for users without subordinate ids; prints each disk's path.")
    parser.add_argument("--cache", type=Path, help="cache directory (default $GOLDSMITH_CACHE or ~/.cache/goldsmith)")
    parser.add_argument("--finish-root", nargs=3, metavar=("DISK_FD", "SPEC", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.finish_root:  # mmdebstrap's customize hook (see _bootstrap)
            fd, spec, root = args.finish_root
            finish_root(int(fd), json.loads(spec), Path(root))
            return 0
        for image in catalog.load_catalog():
            if "recipe" in image:
                entry = catalog.resolve(image["publisher"], image["offer"], image["skus"][0])
                print(entry.urn, ensure_base_image(entry, args.cache))
    except (BaseImageError, catalog.CatalogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
