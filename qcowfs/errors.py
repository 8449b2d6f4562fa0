"""Errors a user can read.

Each carries one line of text; the FUSE layer maps them to one errno and the
CLI prints the message as one line on stderr.
"""
from __future__ import annotations

import errno


class QcowError(Exception):
    """Base of every error qcowfs reports to a user."""

    errno: int = errno.EIO

    @classmethod
    def from_os(cls, what: str, e: OSError) -> "QcowError":
        """WHAT failed because of E (a host file's error), keeping E's errno:
        `cannot open disk.qcow2: No such file or directory` is ENOENT."""
        err = cls(f"{what}: {e.strerror or e}")
        err.errno = e.errno or errno.EIO
        return err

    def about(self, path: str) -> "QcowError":
        """This error naming the file PATH it is about, as an OSError names
        its file: `disk.qcow2: not a qcow2 image (bad magic)`; same type and
        errno. Itself when its message names PATH already."""
        if path in str(self):
            return self
        err = type(self)(f"{path}: {self}")
        err.errno = self.errno
        return err


class InvalidImageError(QcowError):
    """The header or a structure named by it is malformed: refuse to open."""


class TruncatedError(InvalidImageError):
    """A structure the header names lies past the end of the image file (a
    truncated file): a read-only open salvages what is left, as QEMU reads
    zeros past the end; a writable one refuses."""


class UnsupportedFeatureError(QcowError):
    """The image uses something qcowfs does not implement."""

    errno = errno.EOPNOTSUPP


class CorruptionError(QcowError):
    """A table read at run time is inconsistent: fail this request with EIO."""


class ReadOnlyError(QcowError):
    """A write reached a read-only file or image."""

    errno = errno.EROFS


class ImageLockedError(QcowError):
    """Another process (QEMU) holds the image in a conflicting way."""

    errno = errno.EBUSY


class NoSpaceError(QcowError):
    """A refcount would overflow or the image cannot grow."""

    errno = errno.ENOSPC


class ResizeError(QcowError):
    """A resize the image cannot take (shrinking, bitmaps)."""

    errno = errno.EINVAL


class UsageError(QcowError):
    """The command line or a mount option is wrong."""

    errno = errno.EINVAL


class PassphraseError(QcowError):
    """An encrypted image's key is missing or wrong: nothing is opened."""

    errno = errno.EACCES


class RequestError(QcowError):
    """A snapshot or bitmap command that cannot be done as asked (a bad name,
    a granularity out of range, a refcount width too narrow)."""

    errno = errno.EINVAL


class NameTakenError(RequestError):
    """A snapshot or bitmap of that name exists already."""

    errno = errno.EEXIST


class NotFoundError(RequestError):
    """No snapshot or bitmap of that name."""

    errno = errno.ENOENT


class InUseError(RequestError):
    """The snapshot or bitmap's file is open: it is not dropped."""

    errno = errno.EBUSY
