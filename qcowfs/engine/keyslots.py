"""LUKS key slots of an encrypted image: add one (a new passphrase) or erase
some, as `qemu-img amend -o encrypt.state=active|inactive,...` does
(QEMU's crypto/block-luks.c, qcrypto_block_luks_amend_options), with
qemu-img 7.2's refusals, in its order.

The LUKS header and every slot's key material lie in the clusters the
crypto header extension names (a LuksVolume of the engine Image); they are
written through the image's metadata owner, whose overlap check keeps
them inside the LUKS area.

Everything a change can be refused for is found by check_change, before
anything is written, PBKDF2 included (the slots an old passphrase opens,
the count of a new slot): it leaves its findings on the change (a
KeySlotPlan), so apply_change derives nothing twice.

Crash safety: a new slot's key material is written and synced before the
header that marks the slot active, so a crash leaves the old header (a
slot overwritten with --force is the exception, as in QEMU: its old
material is gone before the header names the new one). An erase writes the
header first (the slot disabled, synced), then overwrites the material, as
QEMU does: a crash between leaves an inactive slot over its old material.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from ..errors import InvalidImageError, PassphraseError, RequestError, UsageError
from .overlap import Kind

if TYPE_CHECKING:
    from ..format.crypto import LuksHeader, LuksKeySlot, LuksVolume
    from .image import Image

# QEMU overwrites an erased slot's key material this many times with random
# bytes (QCRYPTO_BLOCK_LUKS_ERASE_ITERATIONS), unsynced in between, as here.
LUKS_ERASE_ITERATIONS = 40


@dataclass(frozen=True)
class KeySlotPlan:
    """What check_change found that a change does to the LUKS header HEADER:
    ADD, the slot that gets the new passphrase, with ITERATIONS (its PBKDF2
    count, timed here to iter-time), or ERASE, the slots to erase."""

    header: LuksHeader
    add: int | None = None
    iterations: int = 0
    erase: tuple[int, ...] = ()


@dataclass
class KeySlotChange:
    """What `encrypt.*` amend options ask (qemu-img's names in brackets).

    state "active": NEW_PASSPHRASE [encrypt.new-secret] goes into KEYSLOT
    [encrypt.keyslot] (default: the first inactive one), its PBKDF2 timed
    to ITER_TIME_MS [encrypt.iter-time] (None: QEMU's default); the master
    key comes from the passphrase the image was opened with (qemu-img 7.2
    refuses an OLD_PASSPHRASE [encrypt.old-secret] here). state "inactive":
    erase KEYSLOT (which OLD_PASSPHRASE, when given too, must open), or
    every slot OLD_PASSPHRASE opens. FORCE [--force]: what QEMU refuses
    without it (overwriting an active slot, erasing an inactive one or the
    last active one). PLAN: what check_change found (KeySlotPlan).
    Passphrases are left out of the repr: it may be logged."""

    state: Literal["active", "inactive"]
    keyslot: int | None = None
    new_passphrase: bytes | None = field(default=None, repr=False)
    old_passphrase: bytes | None = field(default=None, repr=False)
    iter_time_ms: int | None = None
    force: bool = False
    plan: KeySlotPlan | None = field(default=None, init=False, repr=False, compare=False)


def check_change(image: Image, change: KeySlotChange) -> None:
    """What QEMU refuses, before anything is written; what is found on the
    way is kept as CHANGE's plan for apply_change."""
    change.plan = _plan(image, _volume(image), change)


async def apply_change(image: Image, change: KeySlotChange) -> None:
    """Make CHANGE on IMAGE's LUKS header (check_change allowed it; its plan
    serves while the header is the one it was made for: the image may have
    been opened again since, e.g. after an upgrade)."""
    vol = _volume(image)
    plan = change.plan
    if plan is None or plan.header != vol.header:
        plan = _plan(image, vol, change)
    if plan.add is not None:
        assert change.new_passphrase is not None
        await _add(image, vol, plan.add, plan.iterations, change.new_passphrase)
    else:
        await _erase(image, vol, plan.erase)


def _volume(image: Image) -> LuksVolume:
    """IMAGE's LUKS header, which amend.check_request made sure it has."""
    if image.luks is None:
        raise UsageError("only LUKS encryption options can be amended")
    return image.luks


def _master_key(image: Image) -> bytes:
    """The master key the image was unlocked with: qemu-img opens the image
    with its passphrase for any key slot change, and a new slot seals it."""
    key = image.cipher.master_key if image.cipher is not None else None
    if key is None:
        raise PassphraseError("the image's passphrase is needed to change its key slots (--key-file)")
    return key


def _slot_number(n: int) -> int:
    from ..format.crypto import LUKS_NUM_KEY_SLOTS

    if not 0 <= n < LUKS_NUM_KEY_SLOTS:
        raise UsageError(f"invalid key slot {n}: encrypt.keyslot must be between 0 and {LUKS_NUM_KEY_SLOTS - 1}")
    return n


def _plan(image: Image, vol: LuksVolume, change: KeySlotChange) -> KeySlotPlan:
    _master_key(image)
    if change.state == "active":
        return _plan_add(vol, change)
    if change.state == "inactive":
        return _plan_erase(image, vol, change)
    raise UsageError(f"encrypt.state must be active or inactive, not '{change.state}'")


def _plan_add(vol: LuksVolume, change: KeySlotChange) -> KeySlotPlan:
    """QEMU's qcrypto_block_luks_amend_add_keyslot and store_key refusals,
    in their order, then qcowfs's own: the new header must be one qcowfs
    opens (a count OpenSSL derives: luks_iterations)."""
    from ..format.crypto import LUKS_KEY_ENABLED, LUKS_NUM_KEY_SLOTS, LuksVolume, passphrase_text
    from .create import LUKS_DEFAULT_ITER_TIME_MS, LUKS_MIN_SLOT_ITERS, luks_iterations

    h = vol.header
    if change.new_passphrase is None:
        raise UsageError("encrypt.state=active needs the new passphrase (--new-key-file; qemu-img's "
                         "encrypt.new-secret)")
    if change.old_passphrase is not None:
        raise UsageError("an old passphrase (--old-key-file; qemu-img's encrypt.old-secret) is not taken when "
                         "adding a key slot: the passphrase that opens the image (--key-file) unlocks it")
    if change.keyslot is not None:
        slot = _slot_number(change.keyslot)
    else:
        free = [i for i, s in enumerate(h.key_slots) if not s.enabled]
        if not free:
            raise RequestError(f"cannot add a key slot: all {LUKS_NUM_KEY_SLOTS} key slots are in use "
                               "(erase one first with encrypt.state=inactive)")
        slot = free[0]
    if h.key_slots[slot].enabled and not change.force:
        raise RequestError(f"key slot {slot} is active: erase it first (encrypt.state=inactive), or use --force "
                           "to overwrite it")
    passphrase_text(change.new_passphrase)
    iter_time = LUKS_DEFAULT_ITER_TIME_MS if change.iter_time_ms is None else change.iter_time_ms
    if iter_time < 0:
        raise UsageError(f"encrypt.iter-time must not be negative (milliseconds), not {iter_time}")
    vol.material_apart(slot)
    iterations = luks_iterations(vol.spec.hash, h.key_bytes, iter_time, LUKS_MIN_SLOT_ITERS)
    active = replace(h.key_slots[slot], active=LUKS_KEY_ENABLED, iterations=iterations)
    try:
        LuksVolume.parse(_with_slots(h, {slot: active}).pack(), vol.offset, vol.length)
    except InvalidImageError as e:
        raise RequestError(f"the new key slot would make a LUKS header qcowfs refuses to open ({e}): use a "
                           "shorter encrypt.iter-time") from None
    return KeySlotPlan(h, add=slot, iterations=iterations)


def _plan_erase(image: Image, vol: LuksVolume, change: KeySlotChange) -> KeySlotPlan:
    """QEMU's qcrypto_block_luks_amend_erase_keyslots refusals, in its order
    (PBKDF2 trials of the old passphrase included)."""
    from ..format.crypto import LUKS_NUM_KEY_SLOTS, passphrase_text

    h = vol.header
    if change.new_passphrase is not None:
        raise UsageError("a new passphrase (--new-key-file; qemu-img's encrypt.new-secret) is not taken when "
                         "erasing key slots")
    if change.iter_time_ms is not None:
        raise UsageError("encrypt.iter-time is not taken when erasing key slots")
    old = passphrase_text(change.old_passphrase) if change.old_passphrase is not None else None
    lost = "would lose all the data of the image for good (--force erases all the same)"
    if change.keyslot is not None:
        slot = _slot_number(change.keyslot)
        if old is not None and not vol.opened_by(old, [slot], image.file.read_sync):
            raise PassphraseError(f"key slot {slot} does not hold the given old passphrase: nothing is erased")
        if not h.key_slots[slot].enabled and not change.force:
            raise RequestError(f"key slot {slot} is already inactive (erased)")
        if len(vol.active_slots) == 1 and not change.force:
            raise RequestError(f"key slot {slot} is the only active one: erasing it {lost}")
        erase: tuple[int, ...] = (slot,)
    elif old is not None:
        erase = tuple(vol.opened_by(old, range(LUKS_NUM_KEY_SLOTS), image.file.read_sync))
        if not erase:
            raise PassphraseError("no key slot holds the given old passphrase: nothing is erased")
        if len(erase) == len(vol.active_slots) and not change.force:
            raise RequestError(f"every active key slot holds the given old passphrase: erasing them {lost}")
    else:
        raise UsageError("encrypt.state=inactive needs the key slot to erase (encrypt.keyslot) or the old "
                         "passphrase of the slots to erase (--old-key-file; qemu-img's encrypt.old-secret)")
    for i in erase:
        vol.material_apart(i)
    return KeySlotPlan(h, erase=erase)


def _with_slots(h: LuksHeader, slots: dict[int, LuksKeySlot]) -> LuksHeader:
    """H with the key slots of SLOTS (by index) in their places."""
    return replace(h, key_slots=tuple(slots.get(i, s) for i, s in enumerate(h.key_slots)))


async def _add(image: Image, vol: LuksVolume, slot: int, iterations: int, passphrase: bytes) -> None:
    """QEMU's qcrypto_block_luks_store_key: a new salt, the master key sealed
    with PASSPHRASE into SLOT's material (written and synced), then the
    header naming the slot active."""
    from ..format.crypto import LUKS_KEY_ENABLED, LUKS_SALT_LEN, seal_master_key

    old = vol.header.key_slots[slot]
    salt = os.urandom(LUKS_SALT_LEN)
    material = seal_master_key(vol.spec, _master_key(image), passphrase, salt, iterations, old.stripes)
    start, _ = vol.material_apart(slot)
    image.meta.write(vol.offset + start, material, "LUKS key material", ignore=Kind.CRYPTO_HEADER)
    await image.file.sync()
    new = replace(old, active=LUKS_KEY_ENABLED, iterations=iterations, salt=salt)
    await _write_header(image, vol, _with_slots(vol.header, {slot: new}))


async def _erase(image: Image, vol: LuksVolume, slots: tuple[int, ...]) -> None:
    """QEMU's qcrypto_block_luks_erase_key, for SLOTS at once: the header
    with each slot disabled (salt and count zeroed, offset and stripes
    kept), synced; then each slot's key material (key bytes x stripes, as
    QEMU) overwritten LUKS_ERASE_ITERATIONS times with random bytes."""
    from ..format.crypto import LUKS_KEY_DISABLED, LUKS_SALT_LEN

    h = vol.header
    await _write_header(image, vol, _with_slots(h, {
        i: replace(h.key_slots[i], active=LUKS_KEY_DISABLED, iterations=0, salt=bytes(LUKS_SALT_LEN))
        for i in slots}))
    for i in slots:
        start, _ = vol.material_range(i)
        length = h.key_bytes * h.key_slots[i].stripes
        for _ in range(LUKS_ERASE_ITERATIONS):
            image.meta.write(vol.offset + start, os.urandom(length), "LUKS key material",
                             ignore=Kind.CRYPTO_HEADER)
    await image.file.sync()


async def _write_header(image: Image, vol: LuksVolume, header: LuksHeader) -> None:
    """The 592 bytes of HEADER over VOL's, synced (QEMU's
    qcrypto_block_luks_store_header)."""
    image.meta.write(vol.offset, header.pack(), "LUKS header", ignore=Kind.CRYPTO_HEADER)
    await image.file.sync()
