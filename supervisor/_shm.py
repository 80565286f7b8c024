"""Shared memory between the host and one worker: two rings, one per direction.

Each worker gets two fresh ``memfd_create`` regions at spawn (nothing on the
filesystem; one worker serves one actor for its life, so nothing is shared
between actors; a restarted worker gets new ones; they are unmapped when the
worker is reaped). ``in`` is written by the host and inherited by the sandbox
through a read-only descriptor: the script gets a read-only ``memoryview`` of an
input, zero-copy, and cannot write there. ``out`` is written by the worker and
read (copied out) by the host.

Both are sealed once the host has mapped them, so what the sandbox holds cannot
be turned against the host: neither can change size (``F_SEAL_SHRINK``,
``F_SEAL_GROW`` — a region truncated under the host's mapping would SIGBUS it),
``in`` takes no new writers at all (``F_SEAL_FUTURE_WRITE``: no ``write()``, no
writable mapping, even through a descriptor reopened read-write), and the seals
themselves are final (``F_SEAL_SEAL``).

Layout of a region: 64 bytes of control (``consumed``, a u64 the consumer
advances) then the ring. A slot is a 16-byte header (``seq``, ``len``, u64
little-endian) and the bytes, 64-byte aligned; a slot that would run past the
end starts again at the beginning. Frames on the channel carry only
``{"type": "bytes", "$shm": [offset, length, seq, end]}``: where the bytes are,
the slot's sequence number, and the producer's position after it (what the
consumer reports as consumed when done).

Why by hand: no maintained library offers a single-producer/single-consumer
byte ring over a memfd that two processes — one of them untrusted, one of them
without third-party packages — can share; it is a few dozen lines on ``mmap``.
The host trusts nothing read from ``out``: a reference is used only when it
lies inside the ring and the slot header repeats its seq and length.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

from .core.frames import BadReference

__all__ = ["CONTROL", "HEADER", "Regions", "Ring", "ShmError"]

CONTROL = 64
HEADER = 16
_ALIGN = 64
_U64 = struct.Struct("<Q")
_HDR = struct.Struct("<QQ")


# fcntl's constants (Linux values); F_SEAL_FUTURE_WRITE (Linux 5.1) is not in Python 3.11's fcntl.
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x1)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)
_F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x4)
_F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
_SIZE_SEALS = _F_SEAL_SHRINK | _F_SEAL_GROW


class ShmError(BadReference):
    """A reference into shared memory that does not name a whole, current slot (what the
    frame codec's ``take_shm`` raises: a protocol violation of the worker)."""


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


class Ring:
    """One direction's ring, seen from one side.

    The producer calls :meth:`put` (None when the payload does not fit now: the
    caller sends it another way) and learns through :meth:`release` (its own
    bookkeeping, for ``in``) or the control word (for ``out``) what was consumed.
    The consumer calls :meth:`view` or :meth:`take` with a reference from a frame.
    """

    def __init__(self, buf: mmap.mmap | memoryview | bytearray, size: int):
        self.buf = memoryview(buf)
        self.size = size
        self.cap = size - CONTROL
        self.closed = False
        self.head = 0  # producer: bytes of ring used so far, monotonic (with padding)
        self.seq = 0
        self.released = 0  # producer-side bookkeeping of what the consumer is done with

    # -- producer ------------------------------------------------------------------------------

    def consumed(self) -> int:
        return max(self.released, _U64.unpack_from(self.buf, 0)[0])

    def put(self, data: bytes | bytearray | memoryview) -> list[int] | None:
        if self.closed:
            return None
        n = memoryview(data).nbytes
        total = _aligned(HEADER + n)
        pos = self.head % self.cap
        pad = self.cap - pos if pos + total > self.cap else 0
        if total > self.cap or self.head + pad + total - self.consumed() > self.cap:
            return None
        start = 0 if pad else pos
        self.seq += 1
        at = CONTROL + start
        self.buf[at + HEADER:at + HEADER + n] = memoryview(data).cast("B")
        _HDR.pack_into(self.buf, at, self.seq, n)  # header last: a torn write never matches
        self.head += pad + total
        return [at + HEADER, n, self.seq, self.head]

    def release(self, end: int) -> None:
        """The consumer is done with everything up to ``end`` (a reference's last field)."""
        if end > self.released:
            self.released = end

    # -- consumer ------------------------------------------------------------------------------

    def view(self, ref: object) -> memoryview:
        """The bytes a reference names, as a view into the region (validated)."""
        if self.closed:
            raise ShmError("the worker's shared memory is gone")
        if not (isinstance(ref, list) and len(ref) == 4 and all(type(x) is int and x >= 0 for x in ref)):
            raise ShmError("a shared-memory reference is [offset, length, seq, end] of non-negative integers")
        off, n, seq, _end = ref
        if off < CONTROL + HEADER or off + n > self.size:
            raise ShmError(f"shared-memory reference {off}+{n} lies outside the {self.size}-byte region")
        if _HDR.unpack_from(self.buf, off - HEADER) != (seq, n):
            raise ShmError("shared-memory slot does not hold what its reference says (torn or stale)")
        return self.buf[off:off + n]

    def take(self, ref: object) -> bytes:
        """Copy the bytes out and report the slot consumed (the producer may reuse it)."""
        data = bytes(self.view(ref))
        _U64.pack_into(self.buf, 0, max(ref[3], _U64.unpack_from(self.buf, 0)[0]))  # type: ignore[index]
        return data


class Regions:
    """The host's side of one worker's two regions; :meth:`close` unmaps and closes them."""

    def __init__(self, size: int):
        self.size = size
        self.fds: list[int] = []
        self.maps: list[mmap.mmap] = []
        try:
            in_fd = os.memfd_create("reflow-in", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            self.fds.append(in_fd)
            out_fd = os.memfd_create("reflow-out", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            self.fds.append(out_fd)
            for fd in (in_fd, out_fd):
                os.ftruncate(fd, size)
                self.maps.append(mmap.mmap(fd, size))
            # After our writable mappings exist (a future-write seal spares those): see the
            # module doc. Raises OSError on a kernel without memfd seals (< 5.1).
            fcntl.fcntl(in_fd, _F_ADD_SEALS, _SIZE_SEALS | _F_SEAL_FUTURE_WRITE | _F_SEAL_SEAL)
            fcntl.fcntl(out_fd, _F_ADD_SEALS, _SIZE_SEALS | _F_SEAL_SEAL)
            # What the sandbox inherits: ``in`` only readable (reopened O_RDONLY, so not even
            # mprotect can make it writable there), ``out`` read-write.
            # spawn_worker passes and then closes these two (``child_fds``).
            self.child_in = os.open(f"/proc/self/fd/{in_fd}", os.O_RDONLY | os.O_CLOEXEC)
            self.child_out = os.dup(out_fd)
        except BaseException:
            self.close()
            raise
        self.inbound = Ring(self.maps[0], size)   # host → worker (we produce)
        self.outbound = Ring(self.maps[1], size)  # worker → host (we consume)

    @property
    def child_fds(self) -> tuple[int, int]:
        return (self.child_in, self.child_out)

    def close(self) -> None:
        for ring in (getattr(self, "inbound", None), getattr(self, "outbound", None)):
            if ring is not None and not ring.closed:
                ring.closed = True
                ring.buf.release()
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a view still exported: the mapping goes with the last view
                pass
        self.maps = []
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

