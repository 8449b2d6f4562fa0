"""qcowfs amend's LUKS key slots (encrypt.state=active|inactive) against
qemu-img 7.2's amend on twin copies of the same images.

The images are made by qemu-img (iter-time 10 ms) and filled by qemu-io;
every change is made by qemu-img on one copy and by qcowfs on the other,
then QEMU judges both: `qemu-img info` must show the same slots active
(the PBKDF2 counts differ: each tool times its own), qemu-io must read the
same data with every passphrase that should open the image and fail with
the ones that should not, and `qemu-img check` must be clean. Every refusal
is asked of both tools (exit 1 each), and a refused qcowfs amend must leave
the image byte for byte as it was. A kill -9 loop during an add and two
simulated crashes (between the key material and the header) check that an
interrupted change leaves an image the old passphrase opens.

Images with more slots than qemu-img adds in a second are made by copying a
slot's entry and key material into other slots (a slot's material is
encrypted from sector 0 of its own, so it can be moved).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

import luks
import qcowfs
from conftest import QCOWFS
from luks import KiB, MiB, SECRET
from qcowfs.engine.metadata import Metadata
from qcowfs.errors import PassphraseError, QcowError, RequestError, UsageError
from qcowfs.format import EXT_CRYPTO, CryptoHeaderExtension, Header
from qcowfs.format.crypto import LUKS_HEADER_SIZE, LuksHeader

NEW = "qcowfs-new-passphrase"
THIRD = "qcowfs-third-passphrase"
# qemu-img's secret objects: sec0 opens the images (encrypt.key-secret) unless a case says otherwise.
SECRETS = {"sec0": SECRET, "sec1": NEW, "sec2": THIRD}
SIZE = 4 * MiB
WRITES = ["write -P 0x5a 0 1M", "write -P 0xa5 3M 256k"]
READS = ["read -P 0x5a 0 1M", "read -P 0xa5 3M 256k", "read -P 0 1M 2M"]
SLOT_ENTRY = 48      # bytes of a key slot's entry in the LUKS header
SLOTS_AT = 208       # where the entries start (the LUKS1 header's fixed fields)


# ---- the images ---------------------------------------------------------------------------

def luks_offset(img: Path) -> int:
    ext = Header.parse(img.read_bytes()[: 64 * KiB]).extension(EXT_CRYPTO)
    assert ext is not None
    return CryptoHeaderExtension.parse(ext).offset


def luks_header(img: Path) -> LuksHeader:
    at = luks_offset(img)
    return LuksHeader.parse(img.read_bytes()[at : at + LUKS_HEADER_SIZE])


def material(img: Path, slot: int) -> bytes:
    h = luks_header(img)
    s = h.key_slots[slot]
    start = luks_offset(img) + s.key_offset * 512
    return img.read_bytes()[start : start + h.key_bytes * s.stripes]


def clone_slot(img: Path, src: int, dst: int) -> None:
    """Key slot SRC's passphrase into slot DST too: its entry (but the key
    offset) and its key material, copied."""
    at, h = luks_offset(img), luks_header(img)
    s, d = h.key_slots[src], h.key_slots[dst]
    data = material(img, src)
    entry = struct.pack(">II32sII", s.active, s.iterations, s.salt, d.key_offset, s.stripes)
    with open(img, "r+b") as f:
        f.seek(at + d.key_offset * 512)
        f.write(data)
        f.seek(at + SLOTS_AT + dst * SLOT_ENTRY)
        f.write(entry)


def qemu_amend(img: Path, opts: str, *extra: str, opener: str = "sec0") -> subprocess.CompletedProcess[str]:
    objects = [a for ident, secret in SECRETS.items() for a in luks.secret_object(secret, ident)]
    return luks.run("qemu-img", "amend", *objects, "-o", opts, *extra, "--image-opts", luks.image_opts(img, opener))


def qemu_add(img: Path, opts: str, *extra: str, opener: str = "sec0") -> None:
    """A qemu-img amend that must succeed (retried on qemu-img's CPU timing flake)."""
    objects = [a for ident, secret in SECRETS.items() for a in luks.secret_object(secret, ident)]
    luks.create_encrypted("qemu-img", "amend", *objects, "-o", opts, *extra, "--image-opts",
                          luks.image_opts(img, opener))


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """one: slot 0 holds SECRET. two: and slot 1 NEW (qemu-img amend).
    three: and slot 2 NEW. full: slots 1 to 7 NEW."""
    d = tmp_path_factory.mktemp("keyslots")
    one = luks.create(d / "one.qcow2", SIZE)
    luks.qemu_io(one, *WRITES)
    two = d / "two.qcow2"
    shutil.copy(one, two)
    qemu_add(two, "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10")
    three, full = d / "three.qcow2", d / "full.qcow2"
    shutil.copy(two, three)
    clone_slot(three, 1, 2)
    shutil.copy(two, full)
    for k in range(2, 8):
        clone_slot(full, 1, k)
    return {"one": one, "two": two, "three": three, "full": full}


@pytest.fixture
def twin(templates: dict[str, Path], tmp_path: Path):
    """twin(NAME): copies of template NAME for qcowfs and for qemu-img."""
    def make(name: str) -> tuple[Path, Path]:
        ours, theirs = tmp_path / f"ours-{name}.qcow2", tmp_path / f"qemu-{name}.qcow2"
        shutil.copy(templates[name], ours)
        shutil.copy(templates[name], theirs)
        return ours, theirs
    return make


def key_file(tmp: Path, ident: str) -> Path:
    p = tmp / f"{ident}.key"
    p.write_text(SECRETS[ident])
    return p


def ours(img: Path, opts: str, *extra: str, opener: str = "sec0") -> subprocess.CompletedProcess[str]:
    """`qcowfs amend` of what qemu_amend(IMG, OPTS, *EXTRA) asks: the secrets
    of encrypt.new-secret / old-secret become --new-key-file / --old-key-file."""
    args = ["--key-file", str(key_file(img.parent, opener))]
    kept = []
    for opt in opts.split(","):
        name, _, value = opt.partition("=")
        if name in ("encrypt.new-secret", "encrypt.old-secret"):
            args += [f"--{name.split('.')[1].split('-')[0]}-key-file", str(key_file(img.parent, value))]
        else:
            kept.append(opt)
    return subprocess.run([QCOWFS, "amend", "-o", ",".join(kept), *args, *extra, str(img)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def active(img: Path) -> list[bool]:
    data = json.loads(luks.must("qemu-img", "info", "--output=json", img))
    return [s["active"] for s in data["format-specific"]["data"]["encrypt"]["slots"]]


def iterations(img: Path) -> list[int | None]:
    data = json.loads(luks.must("qemu-img", "info", "--output=json", img))
    return [s.get("iters") for s in data["format-specific"]["data"]["encrypt"]["slots"]]


def opens(img: Path, secret: str) -> bool:
    """qemu-io opens IMG with SECRET and reads what the templates wrote."""
    p = luks.run("qemu-io", *luks.secret_object(secret), "--image-opts", luks.image_opts(img),
                 *[a for c in READS for a in ("-c", c)])
    if p.returncode == 0 and "fail" not in p.stdout.lower():
        return True
    assert "Invalid password, cannot unlock any keyslot" in p.stderr, p.stdout + p.stderr
    return False


def qcowfs_opens(img: Path, secret: str) -> bool:
    """qcowfs opens IMG with SECRET and reads what qemu-io wrote; else its
    one line (`qcowfs convert` with the key) and False."""
    try:
        with qcowfs.open(img, passphrase=secret) as image:
            disk = image.disk
            assert disk.pread(0, 1 * MiB) == b"\x5a" * MiB
            assert disk.pread(3 * MiB, 256 * KiB) == b"\xa5" * (256 * KiB)
        return True
    except PassphraseError:
        pass
    except QcowError as e:
        assert "no active key slot" in str(e), e
    p = subprocess.run([QCOWFS, "convert", "-O", "raw", "--key-file", str(_any_key(img.parent, secret)), str(img),
                        str(img.with_suffix(".raw"))], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1 and p.stderr.startswith("qcowfs: "), p.stderr
    return False


def _any_key(tmp: Path, secret: str) -> Path:
    p = tmp / f"any-{hashlib.sha256(secret.encode()).hexdigest()[:8]}.key"
    p.write_text(secret)
    return p


def clean(img: Path, secret: str) -> None:
    p = luks.check(img, secret)
    assert p.returncode == 0, p.stdout + p.stderr


def same_outcome(a: Path, b: Path, open_with: dict[str, bool]) -> None:
    """A (qcowfs) and B (qemu-img) show the same active slots, open with the
    passphrases OPEN_WITH says and not with the others, and check clean."""
    assert active(a) == active(b)
    for secret, should in open_with.items():
        assert opens(b, secret) is should, f"qemu-img's image, {secret}"
        assert opens(a, secret) is should, f"qcowfs's image, {secret}"
        assert qcowfs_opens(a, secret) is should, f"qcowfs's image read by qcowfs, {secret}"
    for secret, should in open_with.items():
        if should:
            clean(a, secret)
            clean(b, secret)
            break


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- adding a key slot ------------------------------------------------------------------------

@pytest.mark.parametrize("template, opts, expect", [
    # (the first free slot)
    ("one", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10", [True, True] + [False] * 6),
    ("two", "encrypt.state=active,encrypt.new-secret=sec2,encrypt.keyslot=5,encrypt.iter-time=10",
     [True, True, False, False, False, True, False, False]),
], ids=["first-free", "keyslot"])
def test_add_beside_qemu_img(twin, template: str, opts: str, expect: list[bool]) -> None:
    a, b = twin(template)
    p = ours(a, opts)
    assert p.returncode == 0 and not p.stdout and not p.stderr, p.stderr
    qemu_add(b, opts)
    assert active(a) == expect
    same_outcome(a, b, {SECRET: True, SECRETS[opts.split("new-secret=")[1][:4]]: True})
    assert luks_header(a).key_slots[0] == luks_header(b).key_slots[0]   # (the other slots are left alone)


def test_add_iter_time(twin) -> None:
    """encrypt.iter-time=0 gives QEMU's minimum count (1000) with both tools;
    a longer time gives more, timed here (QEMU's rate per key length)."""
    a, b = twin("one")
    opts = "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=0"
    assert ours(a, opts).returncode == 0
    qemu_add(b, opts)
    assert iterations(a)[1] == iterations(b)[1] == 1000
    same_outcome(a, b, {SECRET: True, NEW: True})
    assert ours(a, "encrypt.state=active,encrypt.new-secret=sec2,encrypt.iter-time=30").returncode == 0
    assert (iterations(a)[2] or 0) > 1000
    assert opens(a, THIRD) and qcowfs_opens(a, THIRD)


def test_add_through_the_library(twin) -> None:
    a, b = twin("one")
    qcowfs.amend(a, encrypt_state="active", new_passphrase=NEW, passphrase=SECRET, encrypt_iter_time=10,
                 encrypt_keyslot=2)
    qemu_add(b, "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=2,encrypt.iter-time=10")
    same_outcome(a, b, {SECRET: True, NEW: True, THIRD: False})


def test_force_overwrites_an_active_slot(twin) -> None:
    """--force puts a new passphrase over an active slot's: the old one is gone."""
    a, b = twin("two")
    opts = "encrypt.state=active,encrypt.new-secret=sec2,encrypt.keyslot=0,encrypt.iter-time=10"
    assert ours(a, opts, "--force").returncode == 0
    qemu_add(b, opts, "--force")
    same_outcome(a, b, {THIRD: True, NEW: True, SECRET: False})


# ---- erasing key slots -----------------------------------------------------------------------

@pytest.mark.parametrize("template, opts, extra, opener, erased, open_with", [
    ("two", "encrypt.state=inactive,encrypt.keyslot=1", (), "sec0", [1], {SECRET: True, NEW: False}),
    ("two", "encrypt.state=inactive,encrypt.keyslot=0", (), "sec1", [0], {NEW: True, SECRET: False}),
    ("two", "encrypt.state=inactive,encrypt.keyslot=1,encrypt.old-secret=sec1", (), "sec0", [1],
     {SECRET: True, NEW: False}),
    ("three", "encrypt.state=inactive,encrypt.old-secret=sec1", (), "sec0", [1, 2], {SECRET: True, NEW: False}),
    ("three", "encrypt.state=inactive,encrypt.old-secret=sec0", (), "sec1", [0], {NEW: True, SECRET: False}),
    # (--force: an inactive slot is erased all the same; the last active one too, and the data is lost)
    ("two", "encrypt.state=inactive,encrypt.keyslot=4", ("--force",), "sec0", [4], {SECRET: True, NEW: True}),
    ("one", "encrypt.state=inactive,encrypt.keyslot=0", ("--force",), "sec0", [0], {SECRET: False}),
    ("two", "encrypt.state=inactive,encrypt.old-secret=sec0", ("--force",), "sec1", [0],
     {NEW: True, SECRET: False}),
], ids=["keyslot", "keyslot-opened-with-another", "keyslot-and-old", "old", "old-opener", "force-inactive",
        "force-last", "force-old"])
def test_erase_beside_qemu_img(twin, templates: dict[str, Path], template: str, opts: str,
                               extra: tuple[str, ...], opener: str, erased: list[int],
                               open_with: dict[str, bool]) -> None:
    """The erased passphrase no longer opens (qemu-io fails, qcowfs says so in
    one line), the others still do; the erased slots' entries are QEMU's
    byte for byte (disabled, count and salt zeroed, offset and stripes
    kept) and their key material is overwritten; the other slots are as
    they were."""
    a, b = twin(template)
    p = ours(a, opts, *extra, opener=opener)
    assert p.returncode == 0 and not p.stderr, p.stderr
    q = qemu_amend(b, opts, *extra, opener=opener)
    assert q.returncode == 0, q.stderr
    same_outcome(a, b, open_with)
    before, ha, hb = luks_header(templates[template]), luks_header(a), luks_header(b)
    assert [s.enabled for s in ha.key_slots] == [s.enabled and i not in erased
                                                 for i, s in enumerate(before.key_slots)]
    for i in range(8):
        if i in erased:
            assert ha.key_slots[i] == hb.key_slots[i]
            assert material(a, i) != material(templates[template], i)
        else:
            assert ha.key_slots[i] == before.key_slots[i]
            assert material(a, i) == material(templates[template], i)


def test_erase_through_the_library(twin) -> None:
    a, b = twin("three")
    qcowfs.amend(a, encrypt_state="inactive", old_passphrase=NEW, passphrase=SECRET)
    assert qemu_amend(b, "encrypt.state=inactive,encrypt.old-secret=sec1").returncode == 0
    same_outcome(a, b, {SECRET: True, NEW: False})


# ---- refusals ----------------------------------------------------------------------------

# template, qemu-img's -o (ours: the secrets as key files), extra arguments, qemu-img's
# message, qcowfs's error class and message
REFUSALS = {
    "active-no-new": ("one", "encrypt.state=active", (), "'new-secret' is required", UsageError,
                      "needs the new passphrase"),
    "active-old": ("one", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.old-secret=sec0", (),
                   "'old-secret' must not be given", UsageError, "old passphrase .* is not taken when adding"),
    "active-slot": ("one", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=0", (),
                    "Refusing to overwrite active keyslot 0", RequestError, "key slot 0 is active"),
    "active-slot-8": ("one", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=8", (),
                      "Invalid keyslot 8", UsageError, "invalid key slot 8"),
    "active-full": ("full", "encrypt.state=active,encrypt.new-secret=sec2", ("--force",),
                    "all keyslots are in use", RequestError, "all 8 key slots are in use"),
    "active-iter-time": ("one", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=-1", (),
                         "too large to scale", UsageError, "iter-time must not be negative"),
    "inactive-neither": ("one", "encrypt.state=inactive", (), "either explicit keyslot index or the password",
                         UsageError, "needs the key slot to erase"),
    "inactive-new": ("two", "encrypt.state=inactive,encrypt.keyslot=1,encrypt.new-secret=sec2", (),
                     "'new-secret' must not be given", UsageError, "new passphrase .* is not taken when erasing"),
    "inactive-iter-time": ("two", "encrypt.state=inactive,encrypt.keyslot=1,encrypt.iter-time=10", (),
                           "'iter-time' must not be given", UsageError, "iter-time is not taken when erasing"),
    "inactive-erased": ("two", "encrypt.state=inactive,encrypt.keyslot=2", (), "Given keyslot 2 is already erased",
                        RequestError, "key slot 2 is already inactive"),
    "inactive-slot-minus-1": ("two", "encrypt.state=inactive,encrypt.keyslot=-1", (), "Invalid keyslot -1",
                              UsageError, "invalid key slot -1"),
    "inactive-last": ("one", "encrypt.state=inactive,encrypt.keyslot=0", (),
                      "Attempt to erase the only active keyslot 0", RequestError, "key slot 0 is the only active one"),
    "inactive-no-match": ("two", "encrypt.state=inactive,encrypt.old-secret=sec2", (),
                          "No keyslots match given (old) password", PassphraseError,
                          "no key slot holds the given old passphrase"),
    "inactive-all-match": ("one", "encrypt.state=inactive,encrypt.old-secret=sec0", (),
                           "All the active keyslots match", RequestError,
                           "every active key slot holds the given old passphrase"),
    "inactive-slot-not-old": ("two", "encrypt.state=inactive,encrypt.keyslot=0,encrypt.old-secret=sec1", (),
                              "Given keyslot 0 doesn't contain the given old password", PassphraseError,
                              "key slot 0 does not hold the given old passphrase"),
    # (the key slots are refused before the other options are touched; QEMU changes them first)
    "inactive-no-match-and-more": ("two", "encrypt.state=inactive,encrypt.old-secret=sec2,lazy_refcounts=on", (),
                                   "No keyslots match given (old) password", PassphraseError,
                                   "no key slot holds the given old passphrase"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(twin, case: str) -> None:
    """qemu-img refuses (exit 1); qcowfs refuses too, in one line, and the
    image is byte for byte as it was."""
    template, opts, extra, qemu_says, _, we_say = REFUSALS[case]
    a, b = twin(template)
    q = qemu_amend(b, opts, *extra)
    assert q.returncode == 1 and qemu_says in q.stderr, q.stderr
    before = digest(a)
    p = ours(a, opts, *extra)
    assert p.returncode == 1, p.stderr
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("qcowfs: "), p.stderr
    assert re.search(we_say, p.stderr), p.stderr
    assert digest(a) == before


@pytest.mark.parametrize("case", ["active-old", "active-slot", "active-full", "inactive-neither",
                                  "inactive-erased", "inactive-no-match", "inactive-all-match",
                                  "inactive-slot-not-old"])
def test_refusals_through_the_library(twin, case: str) -> None:
    """The library raises the one error class of each refusal, the image as it was."""
    template, opts, extra, _, error, we_say = REFUSALS[case]
    a, _ = twin(template)
    kw: dict[str, object] = {"passphrase": SECRET, "force": "--force" in extra}
    for opt in opts.split(","):
        name, _, value = opt.partition("=")
        if name in ("encrypt.new-secret", "encrypt.old-secret"):
            kw[f"{name.split('.')[1].split('-')[0]}_passphrase"] = SECRETS[value]
        else:
            kw[name.replace(".", "_").replace("-", "_")] = int(value) if value.lstrip("-").isdigit() else value
    before = digest(a)
    with pytest.raises(error, match=we_say):
        qcowfs.amend(a, **kw)
    assert digest(a) == before


def test_a_slot_outside_the_luks_area_is_refused(twin) -> None:
    """An inactive slot whose key material would lie past the LUKS area is
    not written (it would land on whatever follows): qemu-img refuses the
    header at open, qcowfs refuses the add, the image as it was."""
    a, b = twin("one")
    for img in (a, b):
        with open(img, "r+b") as f:
            f.seek(luks_offset(img) + SLOTS_AT + 1 * SLOT_ENTRY + 40)   # (slot 1's key offset)
            f.write(struct.pack(">I", 1 << 20))
    opts = "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10"
    q = qemu_amend(b, opts)
    assert q.returncode == 1 and "Keyslot 1 is overlapping with the encrypted payload" in q.stderr, q.stderr
    before = digest(a)
    p = ours(a, opts)
    assert p.returncode == 1 and p.stderr == "qcowfs: LUKS key slot 1 key material lies outside the LUKS header " \
                                             "area\n", p.stderr
    assert digest(a) == before


# ---- crashes --------------------------------------------------------------------------------

def test_kill_during_an_add(tmp_path: Path, templates: dict[str, Path]) -> None:
    """kill -9 at random moments of an add (PBKDF2 timed to 300 ms, so the
    kill lands before, in or after it): the image always opens with the old
    passphrase and checks clean; the new one opens exactly when its slot is
    active."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    img = tmp_path / "crash.qcow2"
    for attempt in range(5):
        shutil.copy(templates["one"], img)
        args = [QCOWFS, "amend", "-o", "encrypt.state=active,encrypt.iter-time=300", "--key-file",
                str(key_file(tmp_path, "sec0")), "--new-key-file", str(key_file(tmp_path, "sec1")), str(img)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.2))
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        assert rc in (0, -signal.SIGKILL), (seed, attempt, rc, proc.stderr.read() if proc.stderr else "")
        slots = active(img)
        assert slots[0] and not any(slots[2:]), (seed, attempt, slots)
        assert opens(img, SECRET), (seed, attempt)
        clean(img, SECRET)
        assert opens(img, NEW) is slots[1], (seed, attempt, slots)


def _crash_at(monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """The process dies (as it were) at its first metadata write of WHAT: the
    write raises, and nothing after it is written."""
    write = Metadata.write

    def dying(self: Metadata, offset: int, data, kind: str, ignore: int = 0) -> None:
        if kind == what:
            raise SystemExit(f"killed before writing the {what}")
        write(self, offset, data, kind, ignore)

    monkeypatch.setattr(Metadata, "write", dying)


def test_a_crash_before_the_header_leaves_the_old_one(twin, templates: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An add's key material is written before the header names it: stopped
    just before the header write, the header is the old one (the slot
    inactive, the new passphrase opens nothing), its material is there, and
    the image opens with the old passphrase and checks clean."""
    a, _ = twin("one")
    header = luks_header(a)
    _crash_at(monkeypatch, "LUKS header")
    with pytest.raises(SystemExit):
        qcowfs.amend(a, encrypt_state="active", new_passphrase=NEW, passphrase=SECRET, encrypt_iter_time=10)
    monkeypatch.undo()
    assert luks_header(a) == header
    assert material(a, 1) != material(templates["one"], 1)
    assert active(a) == [True] + [False] * 7
    assert opens(a, SECRET) and not opens(a, NEW)
    clean(a, SECRET)


def test_a_crash_during_an_erase_leaves_the_slot_disabled(twin, monkeypatch: pytest.MonkeyPatch) -> None:
    """An erase writes the header first: stopped before the key material is
    overwritten, the slot is disabled already, the erased passphrase opens
    nothing and the others open."""
    a, _ = twin("two")
    _crash_at(monkeypatch, "LUKS key material")
    with pytest.raises(SystemExit):
        qcowfs.amend(a, encrypt_state="inactive", encrypt_keyslot=1, passphrase=SECRET)
    monkeypatch.undo()
    assert active(a) == [True] + [False] * 7
    assert opens(a, SECRET) and not opens(a, NEW)
    clean(a, SECRET)

