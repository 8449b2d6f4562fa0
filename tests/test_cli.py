"""The command line: failing mounts, accepted options, help and version.

A mount that fails must say why in exactly one stderr line, exit non-zero,
never show a traceback and leave nothing mounted.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import QCOWFS, mounted
from conftest import force_unmount, is_mounted

TIMEOUT = 60
MiB = 1 << 20

GENERIC = ["rw", "ro", "dev", "suid", "exec", "atime", "auto", "nofail", "_netdev",
           "x-systemd.automount", "x-systemd.device-timeout=10s", "x-systemd.requires=foo.service",
           "nosuid", "nodev", "noexec", "noatime", "noauto", "defaults"]


def qcowfs(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, **kw)


def fuse_mounts_of(image: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if line.split()[0] == str(image) and line.split()[2].startswith("fuse")]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    img = tmp_path_factory.mktemp("cli") / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(img)],
                   check=True, capture_output=True)
    return img


def assert_clean_failure(p: subprocess.CompletedProcess, *patterns: str) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0, p
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    assert len(lines) == 1, f"expected one stderr line, got: {p.stderr!r}"
    assert lines[0].startswith("qcowfs: "), lines
    for pat in patterns:
        assert re.search(pat, lines[0], re.I), (pat, lines[0])
    return lines[0]


# ---- failing mounts ---------------------------------------------------------------------

def test_missing_image(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = qcowfs("mount", tmp_path / "nope.qcow2", mnt)
    assert_clean_failure(p, "nope.qcow2", "no such file")
    assert not is_mounted(mnt)


@pytest.mark.parametrize("size", [0, 100, 1 << 20])
def test_bad_image(tmp_path: Path, size: int):
    bad = tmp_path / "random.qcow2"
    bad.write_bytes(os.urandom(size))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        p = qcowfs("mount", bad, mnt)
        assert_clean_failure(p)
        assert not is_mounted(mnt)
        assert not fuse_mounts_of(bad)
    finally:
        force_unmount(mnt)


def test_missing_mountpoint(tmp_path: Path, image: Path):
    p = qcowfs("mount", image, tmp_path / "nodir")
    assert_clean_failure(p, "nodir", "does not exist")
    assert not fuse_mounts_of(image)


def test_mountpoint_is_a_file(tmp_path: Path, image: Path):
    f = tmp_path / "afile"
    f.write_text("x")
    p = qcowfs("mount", image, f)
    assert_clean_failure(p, "afile", "not a directory")
    assert not fuse_mounts_of(image)


def test_mountpoint_in_missing_directory(tmp_path: Path, image: Path):
    p = qcowfs("mount", image, tmp_path / "a" / "b")
    assert_clean_failure(p, "does not exist")


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_same_image_twice_on_same_mountpoint(tmp_path: Path, image: Path, read_only: bool):
    mnt = tmp_path / "mnt"
    extra = ["--read-only"] if read_only else []
    with mounted(image, mnt, read_only=read_only):
        p = qcowfs("mount", image, mnt, *extra)
        assert_clean_failure(p, "already mounted")
        assert len(fuse_mounts_of(image)) == 1
        assert (mnt / "disk.raw").stat().st_size == 16 * MiB
    assert not is_mounted(mnt)


def test_image_mounted_writable_elsewhere_is_refused(tmp_path: Path, image: Path):
    """A second writer on the same image (another mount point) is refused by the image lock."""
    with mounted(image, tmp_path / "a", read_only=False):
        mnt2 = tmp_path / "b"
        mnt2.mkdir()
        try:
            p = qcowfs("mount", image, mnt2)
            assert_clean_failure(p)
            assert not is_mounted(mnt2)
            assert len(fuse_mounts_of(image)) == 1
        finally:
            force_unmount(mnt2)


@pytest.mark.parametrize("opt", ["bogus", "nobogus", "uid=abc", "umask=999", "l2_cache_size=lots",
                                 "x", "allow_other,frobnicate"])
def test_bad_option(tmp_path: Path, image: Path, opt: str):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = qcowfs("mount", image, mnt, "-o", opt)
    assert_clean_failure(p)
    assert not is_mounted(mnt)
    # mount.fuse3's form too
    p = qcowfs(image, mnt, "-o", opt)
    assert_clean_failure(p)
    assert not is_mounted(mnt)


def test_unknown_option_names_it(tmp_path: Path, image: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert_clean_failure(qcowfs("mount", image, mnt, "-o", "ro,frobnicate=3"), "frobnicate")


def test_umount_not_mounted(tmp_path: Path):
    assert_clean_failure(qcowfs("umount", tmp_path), "not a qcowfs mount")


# ---- accepted options ------------------------------------------------------------------

@pytest.mark.parametrize("opt", GENERIC)
def test_generic_option_parses(opt: str):
    from qcowfs.service.options import MountOptions

    MountOptions().apply(opt)


def test_generic_options_mount(tmp_path: Path, image: Path):
    """All of mount(8)'s and systemd's generic options at once, in both command forms."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for form in (["mount", image, mnt], [image, mnt]):
        p = qcowfs(*form, "-o", ",".join(GENERIC + ["ro"]))
        try:
            assert p.returncode == 0, p.stderr
            assert is_mounted(mnt)
            assert (mnt / "disk.raw").read_bytes()[:4] == b"\x5a" * 4
            with pytest.raises(OSError):
                os.open(mnt / "disk.raw", os.O_WRONLY)
        finally:
            qcowfs("umount", mnt)
            force_unmount(mnt)
        assert not is_mounted(mnt)


def test_noexec_reaches_the_kernel(tmp_path: Path, image: Path):
    """noexec (last of exec/noexec wins) shows in /proc/mounts; nosuid,nodev always."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for opts, noexec in (("ro,noexec", True), ("ro,noexec,exec", False), ("ro,dev,suid", False)):
        with mounted(image, mnt, "-o", opts):
            flags = fuse_mounts_of(image)[0].split()[3].split(",")
            assert ("noexec" in flags) is noexec, (opts, flags)
            assert "nosuid" in flags and "nodev" in flags, (opts, flags)


def test_mount_fuse3_options(tmp_path: Path, image: Path):
    """What mount.fuse3 passes (ro,dev,suid, plus repeated -o) and fuse's own options."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = qcowfs(image, mnt, "-o", "rw,allow_other,dev,suid", "-o", "ro,default_permissions,subtype=qcowfs")
    try:
        assert p.returncode == 0, p.stderr
        assert (mnt / "disk.raw").stat().st_size == 16 * MiB
        line = fuse_mounts_of(image)[0].split()
        assert line[2] == "fuse.qcowfs"
        assert "ro" in line[3].split(",") and "allow_other" in line[3].split(",")
    finally:
        qcowfs("umount", mnt)
        force_unmount(mnt)


# ---- help and version -----------------------------------------------------------------

def test_version():
    p = qcowfs("--version")
    assert p.returncode == 0
    assert p.stdout.strip() == f"qcowfs {version('qcowfs')}"


def test_top_help():
    p = qcowfs("--help")
    assert p.returncode == 0
    for word in ("mount", "umount", "info", "check", "--version", "fuse.qcowfs"):
        assert word in p.stdout, word


@pytest.mark.parametrize("cmd, words", [
    ("mount", ["IMAGE", "MOUNTPOINT", "--read-only", "--foreground", "--debug", "-o", "ro", "rw",
               "allow_other", "uid=", "gid=", "umask=", "l2_cache_size"]),
    ("umount", ["MOUNTPOINT"]),
    ("info", ["IMAGE", "--json"]),
    ("check", ["IMAGE", "--repair", "--json", "0", "1", "2", "3"]),
])
def test_subcommand_help(cmd: str, words: list[str]):
    p = qcowfs(cmd, "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: qcowfs {cmd}")
    for w in words:
        assert w in p.stdout, (cmd, w)


@pytest.mark.parametrize("cmd", [[], ["convert"], ["check"]])
def test_help_is_as_wide_as_the_terminal(cmd: list[str]):
    """Help wraps at the terminal's width, COLUMNS when set, as argparse's
    own would (its width is found without shutil: cli.main.HelpFormatter)."""
    for columns in (50, 140):
        p = subprocess.run([QCOWFS, *cmd, "--help"], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": str(columns)})
        assert p.returncode == 0, p.stderr
        widest = max(len(line) for line in p.stdout.splitlines())
        assert columns - 12 < widest <= columns - 2, (columns, widest)


def test_no_arguments_shows_usage():
    p = qcowfs()
    assert p.returncode != 0
    assert "usage" in (p.stdout + p.stderr).lower()
    assert "Traceback" not in p.stderr


def test_missing_arguments_are_usage_errors(tmp_path: Path):
    p = qcowfs("mount", tmp_path)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "usage" in p.stderr.lower()


@pytest.mark.parametrize("args,says", [(["snapshot", "list", "{}", "extra"], "takes no NAME"),
                                       (["bitmap", "list", "{}", "extra"], "takes no NAME"),
                                       (["bitmap", "add", "{}", "b1", "extra"], "takes one NAME"),
                                       (["bitmap", "remove", "{}", "b0", "b1"], "takes one NAME")],
                         ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_extra_operands_are_refused(tmp_path: Path, args: list[str], says: str):
    """An operand a command does not take is an error before anything is
    done (bitmap add B1 EXTRA added B1 and ignored EXTRA)."""
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", img, "b0"], check=True)
    before = img.read_bytes()
    assert_clean_failure(qcowfs(*[a.format(img) for a in args]), says)
    assert img.read_bytes() == before


# qemu-img's getopt takes options anywhere among the operands; so does each
# command here. (qemu-img arguments, qcowfs arguments, run in one directory.)
INTERMIXED = [
    (["create", "-f", "qcow2", "a.qcow2", "-o", "cluster_size=4k", "16M"], ["create", "a.qcow2", "-o", "cluster_size=4k", "16M"]),
    (["create", "-f", "qcow2", "b.qcow2", "-b", "a.qcow2", "-F", "qcow2", "32M"],
     ["create", "b.qcow2", "-b", "a.qcow2", "-F", "qcow2", "32M"]),
    (["resize", "b.qcow2", "--shrink", "24M"], ["resize", "b.qcow2", "--shrink", "24M"]),
    (["resize", "--shrink", "b.qcow2", "-1M"], ["resize", "--shrink", "b.qcow2", "-1M"]),
    (["resize", "--shrink", "b.qcow2", "--", "-1M"], ["resize", "--shrink", "b.qcow2", "--", "-1M"]),
    (["resize", "--shrink", "--", "b.qcow2", "-1M"], ["resize", "--shrink", "--", "b.qcow2", "-1M"]),
    (["convert", "a.qcow2", "-O", "raw", "a.raw"], ["convert", "a.qcow2", "-O", "raw", "a.raw"]),
    (["rebase", "b.qcow2", "-u", "-b", "a.raw", "-F", "raw"], ["rebase", "b.qcow2", "-u", "-b", "a.raw", "-F", "raw"]),
]


def test_options_among_operands_as_qemu_img_takes_them(tmp_path: Path):
    """`qcowfs create IMAGE -o OPTS SIZE` and the like: what qemu-img accepts
    with the options after an operand, qcowfs accepts, to the same effect."""
    for who in ("qemu", "qcowfs"):
        (tmp_path / who).mkdir()
    for theirs, ours in INTERMIXED:
        subprocess.run(["qemu-img", *theirs], cwd=tmp_path / "qemu", check=True, capture_output=True)
        p = qcowfs(*ours, cwd=tmp_path / "qcowfs")
        assert p.returncode == 0, (ours, p.stderr)
    for name in ("a.qcow2", "b.qcow2"):
        a, b = (json.loads(subprocess.run(["qemu-img", "info", "--output=json", name], cwd=tmp_path / who,
                                          check=True, capture_output=True, text=True).stdout)
                for who in ("qemu", "qcowfs"))
        for key in ("virtual-size", "cluster-size", "backing-filename", "backing-filename-format"):
            assert a.get(key) == b.get(key), (name, key)
    assert (tmp_path / "qemu" / "a.raw").read_bytes() == (tmp_path / "qcowfs" / "a.raw").read_bytes()
    p = qcowfs("create", tmp_path / "c.qcow2", "16M", "extra")
    assert p.returncode == 2 and "unrecognized arguments: extra" in p.stderr and "usage: qcowfs create" in p.stderr


# ---- messages -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, suggestion", [(["unmount", "m"], "umount"), (["list"], None),
                                              (["mout", "a.qcow2", "m"], "mount"), (["inf", "x"], "info")])
def test_mistyped_command(argv: list[str], suggestion: str | None, tmp_path: Path):
    p = qcowfs(*argv, cwd=tmp_path)
    line = assert_clean_failure(p, "unknown command", "mount, umount, info, check")
    assert p.returncode == 2
    assert f"'{argv[0]}'" in line
    if suggestion:
        assert f"did you mean '{suggestion}'" in line, line


def test_mount_fuse3_form_with_a_relative_image(tmp_path: Path, image: Path):
    """`qcowfs IMAGE DIR -o ...` still mounts when IMAGE is a bare file name in the
    current directory (it names a file, so it is not a mistyped command)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = qcowfs(image.name, mnt, "-o", "ro", cwd=image.parent)
    try:
        assert p.returncode == 0, p.stderr
        assert (mnt / "disk.raw").stat().st_size == 16 * MiB
    finally:
        qcowfs("umount", mnt)
        force_unmount(mnt)


def test_uid_gid_accept_names(tmp_path: Path, image: Path):
    import grp
    import pwd

    user = pwd.getpwuid(65534).pw_name
    group = grp.getgrgid(65534).gr_name
    with mounted(image, tmp_path / "mnt", "-o", f"uid={user},gid={group}") as mnt:
        st = (mnt / "disk.raw").stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    p = qcowfs("mount", image, tmp_path / "mnt", "-o", "uid=no-such-user-here")
    assert_clean_failure(p, "no user named 'no-such-user-here'")
    p = qcowfs("mount", image, tmp_path / "mnt", "-o", "gid=no-such-group-here")
    assert_clean_failure(p, "no group named 'no-such-group-here'")


def test_df_shows_the_host_filesystem(tmp_path: Path, image: Path):
    """statfs on the mount: the space of the filesystem holding the image (where it can
    grow), not a 100 % full pseudo filesystem."""
    with mounted(image, tmp_path / "mnt", read_only=False) as mnt:
        got, host = os.statvfs(mnt), os.statvfs(image)
        assert got.f_blocks * got.f_frsize == host.f_blocks * host.f_frsize
        assert abs(got.f_bavail * got.f_frsize - host.f_bavail * host.f_frsize) < 64 * MiB
        assert got.f_bavail > 0
        df = subprocess.run(["df", "--output=source,pcent", str(mnt)], capture_output=True, text=True)
        assert str(image) in df.stdout and "100%" not in df.stdout, df.stdout


def test_lock_refusal_names_qcowfs_as_the_holder(tmp_path: Path, image: Path):
    with mounted(image, tmp_path / "a", read_only=False) as a:
        b = tmp_path / "b"
        b.mkdir()
        try:
            for args in (["mount", image, b], ["mount", image, b, "--read-only"], ["info", image]):
                line = assert_clean_failure(qcowfs(*args), "in use")
                assert "QEMU?" not in line
                assert re.search(rf"qcowfs \(pid \d+, mounted on {re.escape(str(a))}\)", line), line
                assert "-U" in line, line
        finally:
            force_unmount(b)


def test_info_force_share(tmp_path: Path, image: Path):
    with mounted(image, tmp_path / "a", read_only=False):
        assert_clean_failure(qcowfs("info", image), "in use")
        p = qcowfs("info", "-U", image)
        assert p.returncode == 0, p.stderr
        assert "virtual size: 16 MiB" in p.stdout
        p = qcowfs("info", "--force-share", "--json", image)
        assert p.returncode == 0 and '"virtual-size": 16777216' in p.stdout, p.stderr


def test_check_force_share(tmp_path: Path, image: Path):
    with mounted(image, tmp_path / "a", read_only=False):
        assert_clean_failure(qcowfs("check", image), "in use")
        p = qcowfs("check", "-U", image)
        assert p.returncode in (0, 3), p.stdout + p.stderr


def test_check_force_share_refuses_repair(image: Path):
    assert_clean_failure(qcowfs("check", "-U", "--repair", image), "cannot be used with --repair")


def test_umount_force_help():
    p = qcowfs("umount", "--help")
    assert "--force" in p.stdout


def test_qemu_img_quiet_and_option_help(tmp_path: Path) -> None:
    """Scripts written for qemu-img pass -q, and its users ask `-o help`:
    qcowfs refused both as usage errors. -q prints nothing on stdout (and
    wins over -p, as in qemu-img); `-o help` lists every option create and
    convert take, without an image, as qemu-img lists its own."""
    import qcowfs.aio

    def q(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, timeout=120)

    for args in (["create", "-q", "a.qcow2", "4M"], ["create", "-q", "b.qcow2", "4M"],
                 ["resize", "-q", "a.qcow2", "8M"], ["snapshot", "-q", "create", "a.qcow2", "s"],
                 ["bitmap", "-q", "add", "a.qcow2", "bm"], ["check", "-q", "a.qcow2"],
                 ["convert", "-q", "-p", "-O", "qcow2", "a.qcow2", "c.qcow2"],
                 ["rebase", "-q", "-u", "-b", "b.qcow2", "-F", "qcow2", "c.qcow2"], ["commit", "-q", "-d", "c.qcow2"]):
        p = q(*args)
        assert p.returncode == 0 and p.stdout == "" and p.stderr == "", (args, p.stdout, p.stderr)
    assert json.loads(subprocess.run(["qemu-img", "info", "--output=json", tmp_path / "a.qcow2"], capture_output=True,
                                     text=True, check=True).stdout)["virtual-size"] == 8 << 20
    for args in (["create", "-o", "help"], ["convert", "-O", "qcow2", "-o", "cluster_size=4k,?", "x", "y"]):
        p = q(*args)
        assert p.returncode == 0 and p.stderr == "", p.stderr
        lines = p.stdout.splitlines()
        assert lines[0] == "Supported qcow2 options:"
        assert [x.split("=<")[0].strip() for x in lines[1:]] == [*qcowfs.aio.CREATE_OPTIONS, "encrypt.key-secret"]
    assert not (tmp_path / "y").exists()
    # the options of the target's format (convert's default is raw, as qemu-img's), and amend's
    for args in (["create", "-f", "raw", "-o", "help"], ["convert", "-o", "help", "x", "y"]):
        assert q(*args).stdout.splitlines() == ["Supported raw options:", "  size=<size>         - virtual disk size",
                                                "  preallocation=<str> - preallocation mode (off, falloc, full)"]
    lines = q("amend", "-o", "help", "a.qcow2").stdout.splitlines()
    theirs = subprocess.run(["qemu-img", "amend", "-f", "qcow2", "-o", "help"], capture_output=True, text=True).stdout
    assert lines[0] == "Amend options for 'qcow2':"
    assert [x.split("=<")[0].strip() for x in lines[1:]] == \
        [x.split("=<")[0].strip() for x in theirs.splitlines()[1:] if x.startswith("  ")]
    # qemu-img's --output=json spelling of --json (info, check; map had it)
    for cmd in ("info", "check"):
        p, want = q(cmd, "--output=json", "a.qcow2"), q(cmd, "--json", "a.qcow2")
        assert p.returncode == 0 and p.stdout == want.stdout and json.loads(p.stdout), p.stderr
        assert q(cmd, "--output", "human", "a.qcow2").stdout == q(cmd, "a.qcow2").stdout


def test_map_range_options_as_qemu_img(tmp_path: Path) -> None:
    """`map --start-offset --max-length` (qemu-img's options, sizes with
    suffixes): the JSON qemu-img prints for the same range of a backing
    chain; a negative or unreadable bound, a bound with --bitmap or on a
    mount point are one line, exit 1."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "8M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 1 0 3M", base], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 2 1M 1M", "-c", "write -z 5M 64k", top], check=True,
                   capture_output=True)
    for bounds in (["--start-offset=1k", "--max-length=2M"], ["--start-offset", "3M"], ["--max-length=7000"]):
        q = subprocess.run(["qemu-img", "map", "--output=json", *bounds, "top.qcow2"], capture_output=True,
                           text=True, cwd=tmp_path, check=True)
        p = qcowfs("map", "--output=json", *bounds, "top.qcow2", cwd=tmp_path)
        assert (p.returncode, p.stderr, p.stdout) == (0, "", q.stdout), bounds
    for bad in (["--start-offset=-1"], ["--max-length=lots"], ["--bitmap", "b", "--max-length=1M"],
                ["--start-offset=9E"]):
        assert_clean_failure(qcowfs("map", *bad, top), "")
    assert_clean_failure(qcowfs("map", "--start-offset=1M", tmp_path), "")


def test_bitmap_merge_from_another_image(tmp_path: Path) -> None:
    """`bitmap --merge SOURCE -b SOURCE_FILE -F qcow2 IMAGE NAME` (qemu-img's):
    the bits of another image's bitmap (another granularity too) added to
    NAME, as qemu-img adds them, offline and through a writable mount (the
    daemon opens SOURCE_FILE); a source of another disk size, a missing
    source bitmap, or -b with another action is one line, nothing changed."""
    def q(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, timeout=120)

    def qimg(*args: object) -> None:
        subprocess.run(["qemu-img", *map(str, args)], cwd=tmp_path, check=True, capture_output=True)

    for img, size in (("src.qcow2", "4M"), ("ours.qcow2", "4M"), ("theirs.qcow2", "4M"), ("big.qcow2", "8M")):
        qimg("create", "-q", "-f", "qcow2", img, size)
    qimg("bitmap", "--add", "-g", "4096", "src.qcow2", "b")
    subprocess.run(["qemu-io", "-c", "write 1M 64k", "-c", "write 3M 5000", "src.qcow2"], cwd=tmp_path,
                   check=True, capture_output=True)
    for img in ("ours.qcow2", "theirs.qcow2", "big.qcow2"):
        qimg("bitmap", "--add", img, "dst")
    p = q("bitmap", "--merge", "b", "-b", "src.qcow2", "-F", "qcow2", "ours.qcow2", "dst")
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    qimg("bitmap", "--merge", "b", "-b", "src.qcow2", "-F", "qcow2", "theirs.qcow2", "dst")
    dirty = q("map", "--bitmap", "dst", "--output=json", "theirs.qcow2").stdout
    assert q("map", "--bitmap", "dst", "--output=json", "ours.qcow2").stdout == dirty
    assert '"description": "dirty"' in dirty
    for args in (["bitmap", "--merge", "b", "-b", "src.qcow2", "big.qcow2", "dst"],
                 ["bitmap", "--merge", "nosuch", "-b", "src.qcow2", "ours.qcow2", "dst"],
                 ["bitmap", "add", "-b", "src.qcow2", "ours.qcow2", "x"]):
        before = {f: (tmp_path / f).read_bytes() for f in ("big.qcow2", "ours.qcow2", "src.qcow2")}
        assert_clean_failure(q(*args))
        assert {f: (tmp_path / f).read_bytes() for f in before} == before
    qimg("create", "-q", "-f", "qcow2", "live.qcow2", "4M")
    qimg("bitmap", "--add", "live.qcow2", "dst")
    with mounted(tmp_path / "live.qcow2", tmp_path / "mnt", read_only=False) as mnt:
        p = q("bitmap", "merge", mnt, "dst", "b", "-b", "src.qcow2")
        assert (p.returncode, p.stderr) == (0, ""), p.stderr
    assert q("map", "--bitmap", "dst", "--output=json", "live.qcow2").stdout == dirty
    qimg("check", "live.qcow2")


def test_qemu_img_snapshot_and_bitmap_flags(tmp_path: Path) -> None:
    """qemu-img's spellings: `snapshot -c NAME IMAGE`, `-l`, `-a`, `-d`, and
    `bitmap --add IMAGE NAME`, `--merge SOURCE IMAGE NAME`, `--disable`,
    `--remove`: the same images as qcowfs's verbs make (they were usage
    errors)."""
    def q(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, timeout=120)

    for img in ("ours.qcow2", "theirs.qcow2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "4M"], cwd=tmp_path, check=True)
    steps = [(["snapshot", "-c", "s1"], ["snapshot", "-c", "s1"]), (["snapshot", "-c", "s2"], ["snapshot", "-c", "s2"]),
             (["snapshot", "-d", "s1"], ["snapshot", "-d", "s1"]), (["snapshot", "-a", "s2"], ["snapshot", "-a", "s2"]),
             (["bitmap", "--add"], ["bitmap", "--add"], "b1"), (["bitmap", "--add", "-g", "4096"],
                                                                 ["bitmap", "--add", "-g", "4096"], "b2"),
             (["bitmap", "--merge", "b1"], ["bitmap", "--merge", "b1"], "b2"),
             (["bitmap", "--disable"], ["bitmap", "--disable"], "b2"), (["bitmap", "--remove"], ["bitmap", "--remove"], "b1")]
    for ours, theirs, *name in steps:
        p = q(*ours, "ours.qcow2", *name)
        assert p.returncode == 0, (ours, p.stderr)
        subprocess.run(["qemu-img", *theirs, "theirs.qcow2", *name], cwd=tmp_path, check=True)
    def shape(img: str) -> tuple[list, list]:
        d = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img], capture_output=True, text=True,
                                      cwd=tmp_path, check=True).stdout)
        return ([s["name"] for s in d.get("snapshots", [])],
                [(b["name"], b["granularity"], b["flags"]) for b in d["format-specific"]["data"].get("bitmaps", [])])
    assert shape("ours.qcow2") == shape("theirs.qcow2") == (["s2"], [("b2", 4096, [])])
    # qcowfs's own form keeps its own options: `bitmap add IMAGE NAME --disable` (a disabled
    # bitmap) is not qemu-img's --disable action (test_backup caught the first rewrite)
    assert q("bitmap", "add", "ours.qcow2", "off", "--disable").returncode == 0
    assert ("off", 65536, []) in shape("ours.qcow2")[1]
    p = q("snapshot", "-l", "ours.qcow2")
    assert p.returncode == 0 and p.stdout == subprocess.run(["qemu-img", "snapshot", "-l", "ours.qcow2"],
                                                            capture_output=True, text=True, cwd=tmp_path).stdout


def test_qemu_img_secret_objects(tmp_path: Path) -> None:
    """qemu-img's way of giving passphrases, `--object secret,id=ID,data=...`
    (or file=, format=base64) with `-o encrypt.key-secret=ID`: create,
    convert (the source's key tried as a --key-file is, the target's named),
    amend (encrypt.new-secret, encrypt.key-secret) and compare take the same
    command lines as qemu-img, and QEMU opens what they make with those
    secrets. A secret not given, an object that is not a secret, a secret
    without data are one line, nothing made."""
    def q(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, timeout=120)

    def qemu_reads(img: str, secret: str, pattern: int) -> None:
        p = subprocess.run(["qemu-io", "--object", f"secret,id=s,data={secret}", "--image-opts",
                            f"driver=qcow2,file.filename={img},encrypt.key-secret=s", "-c",
                            f"read -P {pattern} 0 64k"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr

    (tmp_path / "key.txt").write_bytes(b"filekey")
    fast = "encrypt.iter-time=10"
    p = q("create", "--object", "secret,id=sec0,data=first", "-f", "qcow2",
          "-o", f"encrypt.format=luks,encrypt.key-secret=sec0,{fast}", "a.qcow2", "1M")
    assert p.returncode == 0, p.stderr
    assert "encrypt.format=luks encrypt.key-secret=sec0 encrypt.iter-time=10 " in p.stdout
    subprocess.run(["qemu-io", "--object", "secret,id=s,data=first", "--image-opts",
                    "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=s", "-c", "write -P 7 0 64k"],
                   cwd=tmp_path, check=True, capture_output=True)
    p = q("convert", "--object", "secret,id=a,data=first", "--object", "secret,id=b,file=key.txt",
          "-o", f"encrypt.format=luks,encrypt.key-secret=b,{fast}", "-O", "qcow2", "a.qcow2", "b.qcow2")
    assert p.returncode == 0, p.stderr
    qemu_reads("b.qcow2", "filekey", 7)
    p = q("compare", "--object", "secret,id=x,data=first", "--object", "secret,id=y,data=ZmlsZWtleQ==,format=base64",
          "a.qcow2", "b.qcow2")
    assert (p.returncode, p.stdout) == (0, "Images are identical.\n"), p.stderr
    p = q("amend", "--object", "secret,id=old,data=first", "--object", "secret,id=new,data=second",
          "-o", f"encrypt.state=active,encrypt.new-secret=new,encrypt.key-secret=old,{fast}", "a.qcow2")
    assert p.returncode == 0, p.stderr
    qemu_reads("a.qcow2", "second", 7)
    qemu_reads("a.qcow2", "first", 7)
    for args in (["create", "--object", "secret,id=s,data=x", "-o", "encrypt.format=luks,encrypt.key-secret=t",
                  "c.qcow2", "1M"],
                 ["create", "--object", "iothread,id=io", "c.qcow2", "1M"],
                 ["create", "--object", "secret,id=s", "-o", "encrypt.format=luks,encrypt.key-secret=s", "c.qcow2",
                  "1M"]):
        assert_clean_failure(q(*args))
        assert not (tmp_path / "c.qcow2").exists()


def test_map_of_a_raw_file(tmp_path: Path) -> None:
    """`map` of a raw file (probed, or -f raw, also on a qcow2 file), text and
    JSON, whole and in ranges, as qemu-img map prints it (data where the host
    file has data, holes as zeros, the tail to the next sector); a bitmap or
    snapshot of it is one line. The library: qcowfs.map()."""
    import qcowfs as lib

    with open(tmp_path / "disk.img", "wb") as f:
        f.truncate(3 * 1024 * 1024 + 100)
        f.seek(1 << 20)
        f.write(b"x" * 70000)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "q.qcow2", "4M"], cwd=tmp_path, check=True)
    subprocess.run(["qemu-io", "-c", "write 1M 64k", "q.qcow2"], cwd=tmp_path, check=True, capture_output=True)
    for f in tmp_path.iterdir():  # (QEMU asks the host about holes: the same page cache for both)
        f.read_bytes()
    for args in ([], ["--output=json"], ["--output=json", "--start-offset=1M", "--max-length=100000"],
                 ["-f", "raw"], ["--start-offset=5M"]):
        for img in ("disk.img", "q.qcow2") if "-f" in args else ("disk.img",):
            q = subprocess.run(["qemu-img", "map", *args, img], capture_output=True, text=True, cwd=tmp_path)
            p = qcowfs("map", *args, img, cwd=tmp_path)
            assert (p.returncode, p.stderr, q.returncode) == (0, "", 0), (args, p.stderr, q.stderr)
            assert p.stdout == q.stdout, (args, img, p.stdout, q.stdout)
    assert lib.map(tmp_path / "disk.img", start=1 << 20, length=4096) == [
        {"start": 1 << 20, "length": 4096, "depth": 0, "present": True, "zero": False, "data": True,
         "offset": 1 << 20}]
    assert [e["data"] for e in lib.map(tmp_path / "q.qcow2")] == [False, True, False]
    for args in (["--bitmap", "b"], ["--snapshot", "s"]):
        assert_clean_failure(qcowfs("map", *args, tmp_path / "disk.img"), "raw image")
