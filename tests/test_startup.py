"""What a mount and a command load at start-up: only what the image and the
command need (time to first file, one-shot commands). The daemon's memory map
tells which libraries it loaded; sys.modules which of our modules a command did."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import luks
from conftest import daemon_pid, mounted, qemu_img, qemu_io

MiB = 1 << 20


def _libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_plain_image_mounts_without_the_cipher_library(tmp_path: Path) -> None:
    """cryptography (some 50 ms of imports) is loaded for an encrypted image only."""
    plain = tmp_path / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, "16M")
    enc = luks.create(tmp_path / "enc.qcow2", 16 * MiB)
    key = tmp_path / "key"
    key.write_text(luks.SECRET)
    with mounted(plain, tmp_path / "m1") as mnt:
        pid = daemon_pid(mnt)
        assert "cryptography" not in _libraries(pid)
    with mounted(enc, tmp_path / "m2", "-o", f"key_file={key}") as mnt:
        assert "cryptography" in _libraries(daemon_pid(mnt)), "the check cannot see the library"


# What only changes need: a command or an open that only reads must not load it.
WRITE_MACHINERY = {"qcowfs.engine.writer", "qcowfs.engine.refcount", "qcowfs.engine.snapshot_ops",
                   "qcowfs.engine.bitmap_ops", "qcowfs.engine.resize", "qcowfs.engine.create",
                   "qcowfs.engine.convert", "qcowfs.engine.chain_ops", "qcowfs.format.crypto"}


def _modules(code: str) -> set[str]:
    """Every module a fresh interpreter has loaded after running CODE (listed
    on stderr, apart from what CODE prints)."""
    err = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(*sys.modules, file=sys.stderr)"],
                         check=True, capture_output=True, text=True).stderr
    return set(err.split())


def _loaded_by(code: str) -> set[str]:
    """The qcowfs modules a fresh interpreter has loaded after running CODE."""
    return {m for m in _modules(code) if m.startswith("qcowfs")}


def test_reading_commands_load_no_write_machinery(tmp_path: Path) -> None:
    """One-shot commands pay for every module they import (docs/speed.md,
    start-up): info, map and a read-only open load none of what changes an
    image; a snapshot create does load it (so this test can see it)."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_img("snapshot", "-c", "s", img)
    cli = "from qcowfs.cli.main import main\nmain({!r})"
    for code in (cli.format(["info", str(img)]), cli.format(["map", str(img)]),
                 f"import qcowfs\nwith qcowfs.open({str(img)!r}) as i:\n    i.disk.read(4096); i.snapshot('s').read(4096)"):
        loaded = _loaded_by(code)
        assert "qcowfs.engine.image" in loaded
        assert not loaded & WRITE_MACHINERY, code
    loaded = _loaded_by(cli.format(["snapshot", "create", str(img), "t"]))
    assert {"qcowfs.engine.writer", "qcowfs.engine.snapshot_ops"} <= loaded


def _plain_image_with_data(tmp_path: Path) -> Path:
    """A plain image made by qemu: data in two L2 tables' spans, a snapshot,
    and data written after it (so the snapshot's tables differ), which
    bitmap b marks dirty."""
    img = tmp_path / "data.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1G")
    qemu_io(img, "write -P 0x5a 0 3M", "write -P 0x33 700M 1M")
    qemu_img("snapshot", "-c", "s", img)
    qemu_img("bitmap", "--add", img, "b")
    qemu_io(img, "write -P 0x44 1M 64k")
    return img


def test_reading_an_image_imports_no_numpy(tmp_path: Path) -> None:
    """numpy (some 50 ms and 12 MiB) is for bulk work only (docs/speed.md,
    start-up and memory): info, map (a bitmap's dirty map too) and a read-only
    open that reads data and a snapshot and seeks holes never import it, as
    tables are array.array; check,
    which counts every reference with it, does (so this test can see it)."""
    img = _plain_image_with_data(tmp_path)
    cli = "from qcowfs.cli.main import main\nmain({!r})"
    read = (f"import qcowfs\nwith qcowfs.open({str(img)!r}) as i:\n"
            "    assert i.disk.pread(1 << 20, 4096) == b'D' * 4096\n"
            "    assert i.disk.pread(0, 3 << 20)[-1:] == b'Z'\n"
            "    assert i.disk.pread(700 << 20, 1 << 20) == b'3' * (1 << 20)\n"
            "    assert i.snapshot('s').pread(1 << 20, 4096) == b'Z' * 4096\n"
            "    assert i.disk.seek(0, 4) == 3 << 20 and i.disk.seek(3 << 20, 3) == 700 << 20  # SEEK_HOLE, SEEK_DATA")
    for code in (cli.format(["info", str(img)]), cli.format(["map", str(img)]),
                 cli.format(["map", "--bitmap", "b", str(img)]), read):
        loaded = _modules(code)
        assert "numpy" not in loaded, code
        # zstd is imported by the first zstd cluster; libc is found without
        # ctypes.util (which imports subprocess and runs ldconfig)
        assert not loaded & {"zstandard", "ctypes.util", "subprocess"}, code
    assert "numpy" in _modules(cli.format(["check", str(img)])), "the test cannot see numpy"
    zstd = tmp_path / "zstd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", zstd, "1M")
    qemu_io(zstd, "write -c -P 7 0 64k")
    code = f"import qcowfs\nwith qcowfs.open({str(zstd)!r}) as i:\n    assert i.disk.pread(0, 512) == bytes([7]) * 512"
    assert "zstandard" in _modules(code), "the test cannot see zstandard"


def test_a_read_only_mount_serves_without_numpy(tmp_path: Path) -> None:
    """The daemon of a read-only mount of a plain image reads disk.raw,
    answers lseek's SEEK_HOLE and SEEK_DATA and serves a dirty map without numpy in its memory (the 32 MiB aim of issue 24); a writable
    mount loads it (its allocator works with it), which the check sees."""
    img = _plain_image_with_data(tmp_path)
    with mounted(img, tmp_path / "ro") as mnt:
        with open(mnt / "disk.raw", "rb") as f:
            assert f.read(4096) == b"Z" * 4096
            f.seek(700 * MiB)
            assert f.read(MiB) == b"3" * MiB
            f.seek(900 * MiB)
            assert f.read(MiB) == bytes(MiB)
            assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 3 * MiB
            assert os.lseek(f.fileno(), 3 * MiB, os.SEEK_DATA) == 700 * MiB
        assert json.loads((mnt / "maps" / "bitmaps" / "b.json").read_bytes())[1] == \
            {"offset": MiB, "length": 64 << 10, "type": 1, "description": "dirty"}
        assert "numpy" not in _libraries(daemon_pid(mnt))
    with mounted(img, tmp_path / "rw", read_only=False) as mnt:
        with open(mnt / "disk.raw", "r+b") as f:
            f.seek(2 * MiB)
            f.write(b"x" * 4096)
        assert "numpy" in _libraries(daemon_pid(mnt)), "the check cannot see numpy"


# Libraries (as the daemon's memory map names them) that only some images need:
# zstd clusters, GPT partition GUIDs, a passphrase prompt, locking an encrypted
# image's memory.
ONLY_IF_NEEDED = ("zstandard", "_uuid", "termios", "/resource.cpython")


def test_a_read_only_mount_loads_only_what_its_image_needs(tmp_path: Path) -> None:
    """Every module a mount imports is resident in the daemon and in each
    forked worker (issue 24, docs/speed.md on memory): a plain image, read,
    loads none of ONLY_IF_NEEDED; a zstd image loads zstandard at its first
    compressed cluster, and a GPT disk the uuid module (so the check sees them)."""
    img = _plain_image_with_data(tmp_path)
    with mounted(img, tmp_path / "plain") as mnt:
        with open(mnt / "disk.raw", "rb") as f:
            assert f.read(4096) == b"Z" * 4096
        maps = _libraries(daemon_pid(mnt))
        assert [lib for lib in ONLY_IF_NEEDED if lib in maps] == []
    raw, zstd = tmp_path / "gpt.raw", tmp_path / "zstd.qcow2"
    raw.write_bytes(bytes(8 * MiB))
    subprocess.run(["sfdisk", "-q", str(raw)], input="label: gpt\nsize=2M, type=L\n", text=True,
                   check=True, capture_output=True)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd", raw, zstd)
    with mounted(zstd, tmp_path / "zstd") as mnt:
        assert (mnt / "disk.raw").read_bytes() == raw.read_bytes()
        maps = _libraries(daemon_pid(mnt))
        assert "zstandard" in maps and "_uuid" in maps, "the check cannot see them"


def test_a_read_only_mount_maps_no_openssl(tmp_path: Path) -> None:
    """trio's TLS, which maps OpenSSL (3.4 MiB of each serving process's
    memory), is loaded on first use only (patches/trio-lazy-tls.patch): a
    mount, serving reads, never maps it; a process that asks trio for
    SSLStream does, so the check sees it."""
    img = _plain_image_with_data(tmp_path)
    with mounted(img, tmp_path / "mnt") as mnt:
        with open(mnt / "disk.raw", "rb") as f:
            assert f.read(4096) == b"Z" * 4096
        maps = _libraries(daemon_pid(mnt))
        assert "libssl" not in maps and "_ssl." not in maps and "_hashlib" not in maps
    control = subprocess.run([sys.executable, "-c", "import trio; trio.SSLStream; print(open('/proc/self/maps').read())"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert "libssl" in control and "_ssl." in control, "the check cannot see OpenSSL"


def _top_modules(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after running CODE."""
    return {m.split(".")[0] for m in _modules(code)}


def test_commands_and_the_library_run_without_trio(tmp_path: Path) -> None:
    """trio (some 60 ms and 14 MiB of imports) is for the mount and for
    programs of qcowfs.aio: commands and qcowfs.open drive the engine on
    their own thread (host/waiting.py), changes and whole-file operations
    included."""
    img, raw = tmp_path / "img.qcow2", tmp_path / "img.raw"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_img("snapshot", "-c", "s", img)
    raw.write_bytes(b"x" * MiB)
    cli = "from qcowfs.cli.main import main\ntry:\n    main({!r})\nexcept SystemExit as e:\n    assert not e.code, e"
    runs = [cli.format(args) for args in (
        ["info", str(img)], ["map", str(img)], ["check", str(img)],
        ["snapshot", "create", str(img), "t"], ["snapshot", "apply", str(img), "s"],
        ["bitmap", "add", str(img), "b"], ["resize", str(img), "+1M"],
        ["create", "-f", "qcow2", "-b", str(img), "-F", "qcow2", str(tmp_path / "top.qcow2")],
        ["commit", str(tmp_path / "top.qcow2")],
        ["convert", "-O", "qcow2", "-c", str(img), str(tmp_path / "c.qcow2")],
        ["convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_path / "r.qcow2")])]
    runs.append(f"import qcowfs\nwith qcowfs.open({str(img)!r}, 'r+') as i:\n"
                "    i.disk.write(b'y' * 70000); i.disk.flush(); i.snapshot('s').read(4096)\n"
                "    i.create_snapshot('u'); i.resize(i.virtual_size * 2)")
    for code in runs:
        loaded = _modules(code)
        assert "trio" not in {m.split(".")[0] for m in loaded}, code
        # (np.unique imports numpy.ma, some 5-10 ms: format.bulk.unique_inverse instead)
        assert "numpy.ma" not in loaded, code
    qemu_img("check", img)  # (raises unless clean)
    assert "trio" in _top_modules("import qcowfs.service.daemon"), "the check cannot see trio"
    assert "numpy.ma" in _modules("import numpy as np\nnp.unique(np.zeros(2))"), "the check cannot see numpy.ma"


def test_the_interpreter_starts_without_an_import_hook() -> None:
    """The venv's python finds qcowfs through a plain path (scripts/install.sh
    installs it editable in setuptools' compat mode): the default editable
    mode's finder, imported at every start of python, brings pathlib and
    some 8 ms to every command. The control: qcowfs is found and is this
    repository's."""
    code = "import sys, qcowfs; print('pathlib' in sys.modules, qcowfs.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd="/").stdout.split()
    assert out[0] == "False", "a module imported at start-up brings pathlib"
    assert out[1] == str(Path(__file__).resolve().parent.parent / "qcowfs" / "__init__.py")


def test_creating_a_plain_image_loads_no_numpy(tmp_path: Path) -> None:
    """`qcowfs create` of a plain image (the most common command of a CI
    script) writes its few tables without numpy and without the LUKS code
    (about 50 ms); an encrypted create loads both (so the test can see them)."""
    cli = "from qcowfs.cli.main import main\ntry:\n    main({!r})\nexcept SystemExit as e:\n    assert not e.code, e"
    loaded = _modules(cli.format(["create", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1G"]))
    assert not loaded & {"numpy", "qcowfs.format.crypto", "cryptography"}
    qemu_img("check", tmp_path / "a.qcow2")
    key = tmp_path / "key"
    key.write_text(luks.SECRET)
    loaded = _modules(cli.format(["create", "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.iter-time=10",
                                  "--key-file", str(key), str(tmp_path / "b.qcow2"), "1G"]))
    assert {"numpy", "qcowfs.format.crypto"} <= loaded


def test_converting_loads_no_numpy(tmp_path: Path) -> None:
    """`qcowfs convert -O raw` (a qcow2 or raw source) finds the blocks of
    zeros without numpy, whose import (some 65 ms) was a third of a 1 GiB
    convert, and so does `-O qcow2` into a new plain image (engine.builder);
    a compressed target's writer does load it (so the test can see it)."""
    img, raw = tmp_path / "img.qcow2", tmp_path / "img.raw"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 0x5a 0 3M", "write -z 4M 1M")
    raw.write_bytes(b"x" * MiB + bytes(MiB))
    cli = "from qcowfs.cli.main import main\ntry:\n    main({!r})\nexcept SystemExit as e:\n    assert not e.code, e"
    for src in (img, raw):
        loaded = _modules(cli.format(["convert", "-O", "raw", str(src), str(tmp_path / "out.raw")]))
        # (nor concurrent.futures, which loads logging, nor shutil: the read lane is a thread,
        # argparse's width comes without it; some 9 ms of every convert's start)
        assert not loaded & {"numpy", "concurrent.futures", "logging", "shutil"}, src
        assert "qcowfs.engine.convert" in loaded
        loaded = _modules(cli.format(["convert", "-O", "qcow2", str(src), str(tmp_path / "out.qcow2")]))
        assert "numpy" not in loaded, src
        assert "qcowfs.engine.builder" in loaded
    loaded = _modules(cli.format(["convert", "-c", "-O", "qcow2", str(img), str(tmp_path / "out.qcow2")]))
    assert "numpy" in loaded


# What a command that prints a description of an image file has no use for:
# logging (the engine logs through host.logs, which loads it with a first
# warning), json (--json output), the mount's and the daemon's modules; and
# ctypes where no read is large enough to need the bounce check (info,
# create; fallocate and mlockall import it too); shutil, which argparse
# imports for the terminal's width (cli.main.HelpFormatter finds it). Some 8 ms of the 60 that
# `qcowfs info` took (docs/speed.md, start-up).
NOT_FOR_DESCRIBING = {"logging", "json", "qcowfs.cli.mount", "qcowfs.service.control", "qcowfs.host.mounts",
                      "shutil"}


def test_describing_an_image_file_loads_no_logging_json_or_mount_code(tmp_path: Path) -> None:
    """info and map of an image file, and creating a plain one, load none of
    NOT_FOR_DESCRIBING (info and create no ctypes either). The controls: `info --json` loads json, and a read
    past the end of a truncated file logs its warning (so logging is loaded
    and the line reaches stderr)."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 0x5a 0 1M")
    cli = "from qcowfs.cli.main import main\ntry:\n    main({!r})\nexcept SystemExit as e:\n    assert not e.code, e"
    for args in (["info", str(img)], ["map", str(img)],
                 ["create", "-f", "qcow2", str(tmp_path / "new.qcow2"), "1G"]):
        loaded = _modules(cli.format(args))
        assert not loaded & NOT_FOR_DESCRIBING, (args, loaded & NOT_FOR_DESCRIBING)
        assert args[0] == "map" or "ctypes" not in loaded, args
    assert "json" in _modules(cli.format(["info", "--json", str(img)]))
    # (the data cluster is the file's last: cut it off)
    os.truncate(img, os.path.getsize(img) - MiB)
    p = subprocess.run([sys.executable, "-c", f"import qcowfs, sys\nwith qcowfs.open({str(img)!r}) as i:\n"
                        "    assert i.disk.read(4096) == bytes(4096)\nprint(*sys.modules, file=sys.stderr)"],
                       check=True, capture_output=True, text=True)
    assert "the image file ends before what it maps" in p.stderr
    assert "logging" in p.stderr.split()
