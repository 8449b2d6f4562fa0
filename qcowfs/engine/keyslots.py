"""LUKS key slots of an encrypted image: add one (a new passphrase) or erase
some, as `qemu-img amend -o encrypt.state=active|inactive,...` does
(QEMU's crypto/block-luks.c, qcrypto_block_luks_amend_options)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..errors import UnsupportedFeatureError

if TYPE_CHECKING:
    from .image import Image

DEFAULT_ITER_TIME_MS = 2000  # QEMU's default encrypt.iter-time


@dataclass
class KeySlotChange:
    """What `encrypt.*` amend options ask.

    state "active": NEW_PASSPHRASE goes into KEYSLOT (default: the first
    free one); OLD_PASSPHRASE, when given, must unlock the image (else the
    passphrase the image was opened with serves). state "inactive": erase
    KEYSLOT, or every slot OLD_PASSPHRASE opens. FORCE: what QEMU refuses
    without --force (overwriting an active slot, erasing the last one)."""

    state: Literal["active", "inactive"]
    keyslot: int | None = None
    new_passphrase: bytes | None = None
    old_passphrase: bytes | None = None
    iter_time_ms: int = DEFAULT_ITER_TIME_MS
    force: bool = False


def check_change(image: Image, change: KeySlotChange) -> None:
    """What QEMU refuses, before anything is written."""
    raise UnsupportedFeatureError("amending LUKS key slots is not supported yet")


async def apply_change(image: Image, change: KeySlotChange) -> None:
    """Make CHANGE on IMAGE's LUKS header (check_change allowed it)."""
    raise UnsupportedFeatureError("amending LUKS key slots is not supported yet")
