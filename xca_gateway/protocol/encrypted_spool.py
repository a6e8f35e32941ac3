"""A spooled temporary file whose on-disk part is AES-256-GCM encrypted with a key that exists
only in this object's memory.

Documents and instances in flight (MTOM attachments of requests and of peers' answers) are
patient data. Above a size threshold they are spooled to disk so that memory stays bounded and
a consumer still gets a complete PartialSuccess when a peer dies mid-transfer. This file keeps
that guarantee without plaintext PHI on disk:

* in memory up to ``max_size`` bytes, like :class:`tempfile.SpooledTemporaryFile`;
* beyond, an *anonymous* file (``O_TMPFILE`` where the kernel has it, else created and unlinked
  at once): it never has a name, so nothing survives a crash or SIGKILL — the kernel frees it
  with the last descriptor;
* every block on disk is sealed with AES-GCM under a fresh random 256-bit key generated for
  this spool alone and never written anywhere; the block index is the nonce's counter and the
  associated data, so blocks cannot be reordered or replayed undetected. Even the bytes of a
  crashed process's freed inode are unreadable without the key that died with the process.

The interface is what the MTOM code uses of a binary file: ``write`` (append), ``seek``,
``tell``, ``read``, ``close``; ``_rolled`` says whether it went to disk.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
import tempfile
from types import TracebackType

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Plaintext bytes per sealed block; each block costs 16 bytes of tag on disk.
BLOCK = 64 * 1024
_TAG = 16


def _anonymous_file(directory: str | None) -> int:
    """A file descriptor of a file with no name (never visible in ``directory``)."""
    target = directory or tempfile.gettempdir()
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            return os.open(target, flag | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError:
            pass  # file systems without O_TMPFILE (some network/overlay mounts)
    fd, path = tempfile.mkstemp(dir=target, prefix=".xca-spool-")
    os.unlink(path)
    return fd


class EncryptedSpool(io.RawIOBase):
    """Append-then-read binary spool: memory first, then encrypted blocks on an unnamed file."""

    def __init__(self, max_size: int = 1 << 20, *, dir: str | None = None) -> None:
        super().__init__()
        self._max_size = max_size
        self._dir = dir
        self._memory: bytearray | None = bytearray()
        self._fd: int | None = None
        self._aead: AESGCM | None = None
        self._prefix = b""
        # Written plaintext not yet sealed (less than one block), and the sealed block count.
        self._tail = bytearray()
        self._blocks = 0
        self._size = 0
        self._pos = 0
        # One decrypted block kept for sequential reads.
        self._cached: tuple[int, bytes] | None = None

    # -------------------------------------------------------------- file protocol

    @property
    def _rolled(self) -> bool:
        return self._fd is not None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        position = base + offset
        if position < 0:
            raise ValueError("negative seek position")
        self._pos = position
        return position

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("write to a closed spool")
        if self._pos != self._size:
            raise io.UnsupportedOperation("the spool is append-only")
        data = bytes(data)
        if self._memory is not None:
            if len(self._memory) + len(data) <= self._max_size:
                self._memory += data
                self._size += len(data)
                self._pos = self._size
                return len(data)
            self._roll_over()
        self._tail += data
        while len(self._tail) >= BLOCK:
            self._seal(bytes(self._tail[:BLOCK]))
            del self._tail[:BLOCK]
        self._size += len(data)
        self._pos = self._size
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed spool")
        if size is None or size < 0:
            size = self._size - self._pos
        size = min(size, max(0, self._size - self._pos))
        if size == 0:
            return b""
        if self._memory is not None:
            out = bytes(self._memory[self._pos : self._pos + size])
            self._pos += len(out)
            return out
        parts: list[bytes] = []
        remaining = size
        while remaining:
            index, offset = divmod(self._pos, BLOCK)
            block = self._block(index)
            piece = block[offset : offset + remaining]
            if not piece:
                break
            parts.append(piece)
            self._pos += len(piece)
            remaining -= len(piece)
        return b"".join(parts)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            # Drop the key and the plaintext we hold.
            self._aead = None
            self._memory = None
            self._tail = bytearray()
            self._cached = None
        super().close()

    def __enter__(self) -> EncryptedSpool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _roll_over(self) -> None:
        assert self._memory is not None
        self._fd = _anonymous_file(self._dir)
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._prefix = secrets.token_bytes(4)
        pending = bytes(self._memory)
        self._memory = None
        self._tail = bytearray(pending)
        while len(self._tail) >= BLOCK:
            self._seal(bytes(self._tail[:BLOCK]))
            del self._tail[:BLOCK]

    def _nonce(self, index: int) -> bytes:
        return self._prefix + struct.pack(">Q", index)

    def _seal(self, plaintext: bytes) -> None:
        assert self._fd is not None and self._aead is not None
        index = self._blocks
        sealed = self._aead.encrypt(self._nonce(index), plaintext, struct.pack(">Q", index))
        os.pwrite(self._fd, sealed, index * (BLOCK + _TAG))
        self._blocks += 1

    def _block(self, index: int) -> bytes:
        if index == self._blocks:
            return bytes(self._tail)  # the partial last block, still in memory
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        assert self._fd is not None and self._aead is not None
        sealed = os.pread(self._fd, BLOCK + _TAG, index * (BLOCK + _TAG))
        plaintext = self._aead.decrypt(self._nonce(index), sealed, struct.pack(">Q", index))
        self._cached = (index, plaintext)
        return plaintext
