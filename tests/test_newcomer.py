"""What a new user trips over first: each defect a newcomer met, tried as they
did, through the real command, real mounts, loop devices and systemd.

The systemd units verified together; examples/backup.sh without arguments,
its numbering and a restore by a user other than root; fallocate, fstrim and
SEEK_HOLE through partition files and a scratch mount's disk.raw; a second
mount on a qcowfs mount point; info and check of a mount point; a run
directory of another user; the messages of a user's umount of root's mount
and of a writable mount of an unwritable image; -U on the list commands;
the word about a stock pyfuse3; what the README says of disk.raw's mode.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import QCOWFS, ROOT, force_unmount, is_mounted, loop_device, mounted, qemu_img, qemu_io, run
from qcowfs.host.hostfile import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate

MiB = 1 << 20
# User ids no account has, so that no other test's run directory is in the way
# (the second: for the test that makes the first one's run directory root's).
STRANGER, SQUATTED = 47474, 47475


def as_user(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


AS_STRANGER = as_user(STRANGER)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, other users)")


def qcowfs(*args: object, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


def one_line(p: subprocess.CompletedProcess[str], *patterns: str) -> str:
    """A refusal: non-zero exit, exactly one `qcowfs: ` line on stderr, no traceback."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0, p
    assert len(lines) == 1 and lines[0].startswith("qcowfs: "), p.stderr
    for pat in patterns:
        assert re.search(pat, lines[0]), (pat, lines[0])
    return lines[0]


@pytest.fixture
def pubdir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="qcowfs-newcomer-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        for uid in (STRANGER, SQUATTED):
            shutil.rmtree(f"/tmp/qcowfs-{uid}", ignore_errors=True)


def image(path: Path, size: str = "64M", *writes: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    if writes:
        qemu_io(path, *writes)
    return path


def check_clean(img: Path) -> None:
    p = run("qemu-img", "check", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


# ---- 1. systemd units ----------------------------------------------------------------------

def test_all_shipped_units_verify_together(tmp_path: Path) -> None:
    """Every unit of systemd/ at once (with the qcowfs@disk instance mnt-fs.mount needs):
    no ordering cycle, nothing said at all."""
    units = sorted(p for p in (ROOT / "systemd").iterdir() if p.suffix in (".mount", ".service"))
    names = []
    for unit in units:
        text = unit.read_text().replace("/usr/local/bin/qcowfs", QCOWFS)
        name = unit.name.replace("@.", "@disk.")
        (tmp_path / name).write_text(text)
        names.append(name)
    assert "mnt-img.mount" in names and "qcowfs@disk.service" in names and "mnt-fs.mount" in names
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), p.stdout + p.stderr


# ---- 2. examples/backup.sh -------------------------------------------------------------------

BACKUP = ROOT / "examples" / "backup.sh"


@pytest.mark.parametrize("args", [[], ["full"], ["restore", "x"], ["frobnicate", "a", "b", "c"]])
def test_backup_sh_usage(args: list[str]) -> None:
    p = subprocess.run(["sh", str(BACKUP), *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p
    assert p.stderr.strip().startswith("usage: backup.sh full|incremental MOUNTPOINT DIR NAME"), p.stderr


def test_backup_sh_numbering_and_a_users_restore(pubdir: Path) -> None:
    """Increments are numbered 1, 2, 3 after the full copy 0; another user restores
    (the full copy's 0444 mode must not stop the restore), and the result is the disk
    at the last checkpoint; a restore that fails leaves no OUT behind."""
    img = image(pubdir / "vm.qcow2", "32M", "write -P 0x10 0 8M")
    dest = pubdir / "backup"
    env = {**os.environ, "PATH": f"{Path(QCOWFS).parent}:{os.environ['PATH']}"}

    def sh(*args: object, user: list[str] = []) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*user, "sh", str(BACKUP), *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300)

    with mounted(img, pubdir / "mnt", read_only=False) as mnt:
        assert sh("full", mnt, dest, "c0").returncode == 0
        for i in (1, 2, 3):
            with open(mnt / "disk.raw", "r+b") as disk:
                disk.seek(i * 3 * MiB)
                disk.write(bytes([0x40 + i]) * 100000)
            p = sh("incremental", mnt, dest, f"c{i}")
            assert p.returncode == 0, p.stderr
    names = sorted(os.listdir(dest))
    assert names == ["0-c0.full", "1-c1.extents", "1-c1.inc", "2-c2.extents", "2-c2.inc",
                     "3-c3.extents", "3-c3.inc", "last"], names
    sid = next(s["id"] for s in json.loads(qemu_img("info", "--output=json", img))["snapshots"]
               if s["name"] == "c3")
    qemu_img("convert", "-O", "raw", "-l", f"snapshot.id={sid}", img, pubdir / "c3.raw")
    out = pubdir / "out"
    out.mkdir()
    os.chown(out, STRANGER, STRANGER)
    p = sh("restore", dest, out / "restored.raw", user=AS_STRANGER)
    assert p.returncode == 0, p.stderr
    assert (out / "restored.raw").read_bytes() == (pubdir / "c3.raw").read_bytes()
    assert os.stat(out / "restored.raw").st_uid == STRANGER
    # A restore that fails (an increment's extents unreadable) leaves nothing named OUT.
    (dest / "2-c2.extents").chmod(0o600)
    p = sh("restore", dest, out / "again.raw", user=AS_STRANGER)
    assert p.returncode != 0
    assert sorted(os.listdir(out)) == ["restored.raw"]


# ---- 3. fallocate, fstrim and holes through partition files and a scratch disk.raw ---------

def punch(path: Path, off: int, length: int, mode: int = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, mode, off, length)
    finally:
        os.close(fd)


def seeks(path: Path, off: int) -> tuple[int | None, int]:
    """(SEEK_DATA, SEEK_HOLE) from OFF; None where there is no data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            data: int | None = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            data = None
        return data, os.lseek(fd, off, os.SEEK_HOLE)
    finally:
        os.close(fd)


def test_partition_files_discard_zero_and_holes(tmp_path: Path) -> None:
    """A partition file of a writable mount: SEEK_DATA/SEEK_HOLE follow the disk's
    clusters, PUNCH_HOLE and ZERO_RANGE zero (QEMU sees the clusters go), KEEP_SIZE
    allocation is fine; growing it is refused; mkfs says nothing about a read-only
    filesystem; fstrim through a loop device on the partition trims."""
    img = image(tmp_path / "p.qcow2", "96M")
    with mounted(img, tmp_path / "m", read_only=False) as m:
        subprocess.run(["sfdisk", "-q", str(m / "disk.raw")], input="label: gpt\nstart=2048, size=16M\n"
                       "size=64M\n", text=True, check=True, capture_output=True)
        part = m / "partitions" / "1"
        start = 2048 * 512
        assert part.stat().st_size == 16 * MiB
        with open(part, "r+b") as f:
            f.seek(2 * MiB)
            f.write(b"\xaa" * MiB)
        assert seeks(part, 0) == (2 * MiB, 0)
        assert seeks(part, 2 * MiB) == (2 * MiB, 3 * MiB)
        punch(part, 2 * MiB, 512 * 1024)
        punch(part, 2 * MiB + 512 * 1024, 512 * 1024, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        punch(part, 0, 16 * MiB, FALLOC_FL_KEEP_SIZE)  # allocation inside: nothing to do
        with pytest.raises(OSError):
            punch(part, 15 * MiB, 2 * MiB, 0)  # would grow the partition
        assert part.read_bytes() == bytes(16 * MiB)
        assert seeks(part, 0) == (None, 0)
        subprocess.run(["sync", "-f", str(m / "disk.raw")], check=True)
        assert not [r for r in data_ranges_live(m) if r[0] < start + 16 * MiB and r[1] > start]
        mkfs = subprocess.run(["mkfs.ext4", "-q", "-F", str(m / "partitions" / "2")], capture_output=True,
                              text=True, timeout=120)
        assert mkfs.returncode == 0 and "Read-only" not in mkfs.stdout + mkfs.stderr, mkfs.stderr
        with loop_device(m / "partitions" / "2", read_only=False) as dev:
            fs = tmp_path / "fs"
            fs.mkdir()
            run("mount", dev, fs)
            try:
                (fs / "big").write_bytes(os.urandom(24 * MiB))
                run("sync", "-f", fs)
                (fs / "big").unlink()
                run("sync", "-f", fs)
                trimmed = run("fstrim", "-v", fs).stdout
            finally:
                subprocess.run(["umount", str(fs)], capture_output=True)
        n = int(re.search(r"\((\d+) bytes\) trimmed", trimmed).group(1))  # type: ignore[union-attr]
        assert n >= 20 * MiB, trimmed
    check_clean(img)


def data_ranges_live(m: Path) -> list[tuple[int, int]]:
    """The data ranges of the mounted disk, from the mount's own map."""
    return [(e["start"], e["start"] + e["length"]) for e in json.loads((m / "maps" / "disk.json").read_bytes())
            if e["data"]]


def test_scratch_disk_discard_zero_and_holes(tmp_path: Path) -> None:
    """disk.raw of a scratch mount: holes as the image has them, then as discards
    and writes make them; a discard over written blocks gives their overlay space
    back; the image is never changed; mkfs through it says nothing."""
    img = image(tmp_path / "s.qcow2", "64M", "write -P 0x33 0 8M", "write -P 0x44 40M 1M")
    before = (tmp_path / "before.raw")
    qemu_img("convert", "-O", "raw", img, before)
    with mounted(img, tmp_path / "m", "-o", "scratch", read_only=False) as m:
        disk = m / "disk.raw"
        assert seeks(disk, 0) == (0, 8 * MiB)
        assert seeks(disk, 8 * MiB) == (40 * MiB, 8 * MiB)
        with open(disk, "r+b") as f:
            f.seek(20 * MiB)
            f.write(b"w" * MiB)
        assert seeks(disk, 8 * MiB) == (20 * MiB, 8 * MiB)
        assert seeks(disk, 20 * MiB) == (20 * MiB, 21 * MiB)
        used = int(os.getxattr(disk, "user.qcow2.scratch_used"))
        assert used == MiB
        punch(disk, 0, 4 * MiB)
        punch(disk, 20 * MiB, MiB)
        punch(disk, 40 * MiB + 100, 4096, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        assert int(os.getxattr(disk, "user.qcow2.scratch_used")) <= 2 * 4096  # the two edge blocks
        assert seeks(disk, 0) == (4 * MiB, 0)
        assert seeks(disk, 8 * MiB) == (40 * MiB, 8 * MiB)
        with open(disk, "rb") as f:
            assert f.read(4 * MiB) == bytes(4 * MiB)
            assert f.read(4 * MiB) == b"\x33" * (4 * MiB)
            f.seek(20 * MiB)
            assert f.read(MiB) == bytes(MiB)
            f.seek(40 * MiB)
            got = f.read(MiB)
        assert got == b"\x44" * 100 + bytes(4096) + b"\x44" * (MiB - 4196)
        with pytest.raises(OSError):
            punch(disk, 63 * MiB, 2 * MiB, 0)  # would grow the disk
        mkfs = subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], capture_output=True, text=True, timeout=120)
        assert mkfs.returncode == 0 and not mkfs.stderr.strip(), mkfs.stderr
    qemu_img("convert", "-O", "raw", img, tmp_path / "after.raw")
    assert (tmp_path / "after.raw").read_bytes() == before.read_bytes()
    check_clean(img)


# ---- 4. a second mount on a qcowfs mount point ------------------------------------------------

def test_second_mount_on_a_qcowfs_mount_point_is_refused(tmp_path: Path) -> None:
    a, b = image(tmp_path / "a.qcow2", "16M"), image(tmp_path / "b.qcow2", "16M")
    with mounted(a, tmp_path / "m") as m:
        for argv in (["mount", b, m, "-r"], [b, m, "-o", "ro"]):  # qcowfs mount, and mount.fuse3's form
            one_line(qcowfs(*argv), "already a qcowfs mount", "a.qcow2", "umount")
            entries = [line for line in Path("/proc/mounts").read_text().splitlines()
                       if line.split()[1] == str(m)]
            assert len(entries) == 1, entries


# ---- 5. info and check of a mount point --------------------------------------------------------

def test_info_and_check_of_a_mount_point(tmp_path: Path) -> None:
    """Live, as snapshot/bitmap/map are: what the daemon's image is now (writes not
    yet flushed included); a repair is refused while mounted; a plain directory is
    one line."""
    img = image(tmp_path / "i.qcow2", "64M", "write -P 1 0 1M")
    with mounted(img, tmp_path / "m", read_only=False) as m:
        with open(m / "disk.raw", "r+b") as f:
            f.seek(32 * MiB)
            f.write(os.urandom(3 * MiB))
            f.flush()
            assert qcowfs("snapshot", "create", m, "s1").returncode == 0
            info = qcowfs("info", "--json", m)
            assert info.returncode == 0, info.stderr
            d = json.loads(info.stdout)
            assert d["filename"] == str(img) and d["virtual-size"] == 64 * MiB
            assert [s["name"] for s in d["snapshots"]] == ["s1"]
            human = qcowfs("info", m)
            assert human.returncode == 0 and f"image: {img}" in human.stdout, human.stdout
            f.seek(50 * MiB)
            f.write(os.urandom(MiB))  # not flushed: the live check must see it
            check = qcowfs("check", "--json", m)
            assert check.returncode == 0, check.stdout + check.stderr
            c = json.loads(check.stdout)
            assert c["leaks"] == 0 and c["corruptions"] == 0 and c["filename"] == str(img)
            assert c["allocated-clusters"] * 65536 >= 5 * MiB, c
            assert "No errors were found" in qcowfs("check", m).stdout
        one_line(qcowfs("check", "--repair", m), "unmount")
    check_clean(img)
    (tmp_path / "plain").mkdir()
    for cmd in ("info", "check"):
        one_line(qcowfs(cmd, tmp_path / "plain"), "is a directory, not an image nor a qcowfs mount point")


# ---- 6. icount (tests/test_api.py::test_snapshot_records_match_qemu_info has the records) ------

def test_snapshot_list_json_has_no_icount_of_none(tmp_path: Path) -> None:
    """The listing showed an icount of 2**64-1, the value that means none was
    recorded. A snapshot qcowfs takes records 0, as `qemu-img snapshot -c`
    does, and the listing shows what `qemu-img info` shows for it."""
    img = image(tmp_path / "n.qcow2", "16M")
    assert qcowfs("snapshot", "create", img, "s").returncode == 0
    listed = json.loads(qcowfs("snapshot", "list", "--json", img).stdout)
    theirs = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)], capture_output=True,
                                       text=True, check=True).stdout)["snapshots"]
    assert listed and [s.get("icount") for s in listed] == [s.get("icount") for s in theirs] == [0], listed


# ---- 7. a run directory of another user ---------------------------------------------------------

def strangers_mount(pubdir: Path, uid: int = STRANGER) -> tuple[Path, Path]:
    """Root's image (0644: readable, not writable by others) and a mount point of UID's."""
    img = image(pubdir / "r.qcow2", "16M")
    img.chmod(0o644)
    mnt = pubdir / "m"
    mnt.mkdir()
    os.chown(mnt, uid, uid)
    return img, mnt


def test_run_dir_of_another_user_is_refused_at_mount(pubdir: Path) -> None:
    img, mnt = strangers_mount(pubdir, SQUATTED)
    run_dir = Path(f"/tmp/qcowfs-{SQUATTED}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o755)  # root's: a user's fallback run directory someone else made
    try:
        env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
        p = subprocess.run([*as_user(SQUATTED), QCOWFS, "mount", "-r", str(img), str(mnt)], capture_output=True,
                           text=True, timeout=60, env=env)
        one_line(p, f"{run_dir} belongs to root", "XDG_RUNTIME_DIR")
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)
        shutil.rmtree(run_dir, ignore_errors=True)


# ---- 8. messages ----------------------------------------------------------------------------------

def test_users_umount_of_roots_mount_says_whose_it_is(pubdir: Path) -> None:
    img = image(pubdir / "u.qcow2", "16M")
    with mounted(img, pubdir / "m") as m:
        p = subprocess.run([*AS_STRANGER, QCOWFS, "umount", str(m)], capture_output=True, text=True, timeout=60)
        one_line(p, r"was mounted by root \(uid 0\)", "only that user or root")
        assert is_mounted(m)


def test_writable_mount_of_an_unwritable_image_says_read_only(pubdir: Path) -> None:
    img, mnt = strangers_mount(pubdir)
    try:
        p = subprocess.run([*AS_STRANGER, QCOWFS, "mount", str(img), str(mnt)], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": ""})
        one_line(p, "cannot be written by you", "read-only with -r")
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)


def test_force_share_lists_of_a_held_image(tmp_path: Path) -> None:
    """-U on snapshot list and bitmap list reads an image a writable mount holds
    (as qemu-img's -U); without it the lock refusal names the mount point; -U is
    refused for a change."""
    img = image(tmp_path / "f.qcow2", "16M")
    qemu_img("snapshot", "-c", "snap", img)
    qemu_img("bitmap", "--add", img, "bm")
    with mounted(img, tmp_path / "m", read_only=False) as m:
        one_line(qcowfs("snapshot", "list", img), "give the mount point")
        p = qcowfs("snapshot", "list", "-U", img)
        assert p.returncode == 0 and "snap" in p.stdout, p.stderr
        p = qcowfs("bitmap", "list", "--force-share", img)
        assert p.returncode == 0 and p.stdout.startswith("bm\t"), p.stderr
        one_line(qcowfs("snapshot", "create", "-U", img, "x"), "only for snapshot list")
        one_line(qcowfs("bitmap", "add", "-U", img, "x"), "only for bitmap list")
        assert qcowfs("snapshot", "list", "-U", m).returncode == 0
    check_clean(img)


# ---- 9. a stock pyfuse3 ---------------------------------------------------------------------------

STOCK_PYFUSE3 = r"""
import sys
import pyfuse3
# What a plain `pip install pyfuse3` has: no compiled fallocate/lseek handlers.
del pyfuse3.fuse_fallocate_async, pyfuse3.fuse_lseek_async
from qcowfs.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_stock_pyfuse3_is_said_once_at_mount(tmp_path: Path) -> None:
    """Once on the mount's stderr (and in its log), and by `qcowfs --version`; nothing
    with the patched build."""
    version = subprocess.run([sys.executable, "-c", STOCK_PYFUSE3, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()
    assert len(version) == 2 and "pyfuse3 is the stock build" in version[1], version
    assert len(qcowfs("--version").stdout.splitlines()) == 1
    img = image(tmp_path / "k.qcow2", "16M")
    mnt = tmp_path / "m"
    mnt.mkdir()
    try:
        p = subprocess.run([sys.executable, "-c", STOCK_PYFUSE3, "mount", "-r", str(img), str(mnt)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "pyfuse3 is the stock build" in lines[0] and "make install" in lines[0], lines
        assert (mnt / "disk.raw").stat().st_size == 16 * MiB
        assert qcowfs("umount", mnt).returncode == 0
    finally:
        force_unmount(mnt)
    p = qcowfs("mount", "-r", img, mnt)  # the patched build (make install's): nothing said
    try:
        assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    finally:
        qcowfs("umount", mnt)
        force_unmount(mnt)


# ---- 10. what the README says ------------------------------------------------------------------

def test_readme_modes_of_disk_raw_are_what_a_mount_shows(tmp_path: Path) -> None:
    """The README's words for disk.raw's mode, read-write and read-only, under the
    default umask, are the modes a mount shows."""
    readme = (ROOT / "README.md").read_text()
    rw = re.search(r"disk\.raw` is (0[0-7]{3}) on a read-write mount and (0[0-7]{3}) on a read-only one", readme)
    assert rw, "the README states disk.raw's modes"
    img = image(tmp_path / "d.qcow2", "16M")
    with mounted(img, tmp_path / "rw", read_only=False) as m:
        assert f"{stat.S_IMODE((m / 'disk.raw').stat().st_mode):04o}" == rw.group(1)
    with mounted(img, tmp_path / "ro") as m:
        assert f"{stat.S_IMODE((m / 'disk.raw').stat().st_mode):04o}" == rw.group(2)


def test_readme_line_counts_are_true() -> None:
    """Where the docs say a file has N lines, it has."""
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for m in re.finditer(r"`?([\w./-]+\.(?:sh|py))`?[^.]{0,60}?\b(\d+)\s+lines", doc.read_text()):
            path = ROOT / m.group(1)
            if path.exists():
                assert len(path.read_text().splitlines()) == int(m.group(2)), (doc.name, m.group(0))
