"""The control socket: how `qcowfs snapshot|bitmap|checkpoint MOUNTPOINT ...`
reaches the daemon that serves the mount.

One request per connection: a JSON object on one line ({"op": ..., args}),
answered by one JSON line: {"ok": true, ...} or {"error": message, "errno": n}.
The socket lives in the mount owner's private run directory with mode 0600,
so only the user who mounted (and root) can change the image through it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..host import mounts
from ..host.logs import log
from ..errors import QcowError, UsageError

if TYPE_CHECKING:
    import trio

MAX_REQUEST = 1 << 16
# A snapshot of a large image may take a while; the client waits this long.
CLIENT_TIMEOUT = 3600.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(QcowError):
    """What the daemon answered to a request it could not do."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


async def serve(path: str, handler: Handler) -> None:
    """Answer requests on a unix socket at PATH until cancelled (then remove it).
    (trio is imported here, not for the module: the client side starts fast.)"""
    import trio

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(8)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_answer, stream, handler)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def _answer(stream: "trio.SocketStream", handler: Handler) -> None:
    import trio

    async with stream:
        try:
            try:
                request = json.loads(await _read_line(stream))
            except ValueError as e:  # not JSON, or too long: nothing ran
                raise UsageError(f"bad request: {e}") from None
            # A metadata change runs to its end even if the mount stops meanwhile.
            with trio.CancelScope(shield=True):
                reply = await handler(request)
            reply.setdefault("ok", True)
        except QcowError as e:
            reply = {"error": str(e), "errno": e.errno}
        except trio.BrokenResourceError:
            return
        except Exception as e:  # noqa: BLE001 - the daemon keeps serving
            log.exception("control request failed: %s: %s", type(e).__name__, e)
            reply = {"error": f"internal error: {type(e).__name__}: {e}", "errno": errno.EIO}
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _read_line(stream: "trio.SocketStream") -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    return buf


def mounted(path: str) -> mounts.Mount | None:
    """The qcowfs mount at PATH (a mount point), if PATH is one."""
    if not os.path.isdir(path):
        return None
    return mounts.find(path, mounts.FSTYPE)


def request(mountpoint: str, op: str, **args: Any) -> dict[str, Any]:
    """Send one request to the daemon serving MOUNTPOINT; its answer, or ControlError."""
    m = mounted(mountpoint)
    if m is None:
        raise UsageError(f"{mountpoint} is not a qcowfs mount point")
    path = mounts.find_control_socket(m.dev)
    if path is None:
        raise UsageError(f"cannot reach the daemon serving {mountpoint} (no control socket: "
                         "is it mounted by another user, or by an older qcowfs?)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CLIENT_TIMEOUT)
        try:
            s.connect(path)
        except PermissionError:
            raise UsageError(f"only the user who mounted {mountpoint} can change it") from None
        except OSError as e:
            raise UsageError(f"cannot reach the daemon serving {mountpoint}: {e.strerror}") from None
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ControlError(f"the daemon serving {mountpoint} closed the connection without an answer",
                           errno.EIO)
    reply: dict[str, Any] = json.loads(data)
    if "error" in reply:
        raise ControlError(reply["error"], int(reply.get("errno", errno.EIO)))
    return reply
