"""Content codings for the edge hop: streaming compressors that flush per SSE event, and
bounded decompressors that cannot be turned into a memory or CPU bomb.

Encoders: ``br`` (brotli), ``gzip``, ``zstd`` (with the ``zstandard`` package). ``flush()``
ends a block the peer can decode at once (brotli FLUSH, zlib Z_SYNC_FLUSH, zstd block flush)
while the window keeps spanning what came before, so per-event flushing still shrinks a stream
of near-identical events many times over.

Decoders never produce more than ``limit`` bytes in all, nor more than ``MAX_RATIO`` times the
input once past ``floor`` bytes of output (a bomb is caught after its first ~2 MB, whatever size
it claims, in milliseconds); each step's output is capped (brotli's ``output_buffer_limit``, zlib's ``max_length``,
zstd input fed in slices whose worst-case expansion is bounded), so memory stays small.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Final

import brotli

try:  # optional: `pip install zstandard`
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None  # type: ignore[assignment]

__all__ = [
    "DECODABLE",
    "ENCODINGS",
    "DecodeError",
    "Decoder",
    "Encoder",
    "TooLarge",
    "accepted",
    "accepts",
    "decoder",
    "encode",
    "encoder",
    "safe_ratio",
]

# Hop compression levels: fast enough for a 30 KB body in well under a millisecond, still most
# of the gain (JSON chat histories and SSE events are very repetitive).
BROTLI_QUALITY: Final = 5
BROTLI_WINDOW: Final = 22
GZIP_LEVEL: Final = 6
ZSTD_LEVEL: Final = 6

# Decompression guards.
# Output over input. Real chat bodies compress 5-20x, SSE streams ~10x; a body repeating the same
# tool output hundreds of times reaches a few hundred (senders skip compressing anything past
# a quarter of the limit: see safe_ratio(), so what they send never trips the guard). Bombs:
# brotli and zstd reach 10^4-10^6x; deflate cannot pass ~1030x, so gzip gets a lower limit.
MAX_RATIO: Final = {"br": 2000, "zstd": 2000, "gzip": 800, "deflate": 800}
RATIO_FLOOR: Final = 1 << 20  # small outputs are never a bomb, whatever their ratio
STEP_OUTPUT: Final = 64 * 1024  # at most this much output per step (memory bound)
SLICE: Final = 1024  # input per step, so the ratio guard sees how much input was consumed
ZSTD_SLICE: Final = 256  # zstd input per step: <= ~8 MB of output in the worst case (RLE blocks)
ZSTD_MAX_WINDOW: Final = 1 << 23

ENCODINGS: Final = ("br", "gzip", "zstd") if zstandard is not None else ("br", "gzip")
DECODABLE: Final = frozenset((*ENCODINGS, "deflate"))


class DecodeError(ValueError):
    """The compressed data is broken (corrupt, or cut before its end)."""


class TooLarge(DecodeError):
    """The data decompresses past the size limit or the ratio guard: a bomb, or just too big."""


class _Brotli:
    __slots__ = ("_c",)

    def __init__(self) -> None:
        self._c = brotli.Compressor(quality=BROTLI_QUALITY, lgwin=BROTLI_WINDOW)

    def process(self, data: bytes) -> bytes:
        return self._c.process(data)  # type: ignore[no-any-return]

    def flush(self) -> bytes:
        return self._c.flush()  # type: ignore[no-any-return]

    def finish(self) -> bytes:
        return self._c.finish()  # type: ignore[no-any-return]


class _Gzip:
    __slots__ = ("_c",)

    def __init__(self) -> None:
        self._c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)

    def process(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._c.flush(zlib.Z_FINISH)


class _Zstd:
    __slots__ = ("_c",)

    def __init__(self) -> None:
        assert zstandard is not None
        self._c = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()

    def process(self, data: bytes) -> bytes:
        return self._c.compress(data)  # type: ignore[no-any-return]

    def flush(self) -> bytes:
        assert zstandard is not None
        return self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)  # type: ignore[no-any-return]

    def finish(self) -> bytes:
        return self._c.flush()  # type: ignore[no-any-return]


_ENCODERS: Final[dict[str, type[_Brotli] | type[_Gzip] | type[_Zstd]]] = {"br": _Brotli, "gzip": _Gzip}
if zstandard is not None:
    _ENCODERS["zstd"] = _Zstd


class Encoder:
    """A streaming compressor for one body, counting bytes in (``raw``) and out (``wire``).

    ``process()`` may hold data back; ``flush()`` makes everything so far decodable (an SSE
    event boundary); ``finish()`` ends the compressed stream.
    """

    __slots__ = ("_c", "name", "raw", "wire")

    def __init__(self, name: str) -> None:
        self.name = name
        self._c = _ENCODERS[name]()
        self.raw = 0
        self.wire = 0

    def process(self, data: bytes) -> bytes:
        self.raw += len(data)
        out = self._c.process(data)
        self.wire += len(out)
        return out

    def flush(self) -> bytes:
        out = self._c.flush()
        self.wire += len(out)
        return out

    def finish(self) -> bytes:
        out = self._c.finish()
        self.wire += len(out)
        return out


def encoder(name: str) -> Encoder:
    """A streaming compressor for content coding ``name`` (one of ENCODINGS)."""
    return Encoder(name)


def encode(name: str, data: bytes) -> bytes:
    """Compress a whole body."""
    enc = _ENCODERS[name]()
    return enc.process(data) + enc.finish()


# Whole bodies from this size on are compressed in a thread, not on the event loop.
THREAD_MIN: Final = 1 << 20


async def encode_whole(name: str, data: bytes) -> bytes:
    """Compress a whole body; a big one off the event loop (the codecs release the GIL)."""
    if len(data) < THREAD_MIN:
        return encode(name, data)
    return await asyncio.to_thread(encode, name, data)


def accepts(header: str | None, name: str) -> bool:
    """Does an Accept-Encoding value accept coding ``name`` (listed, or ``*``, with q > 0)?"""
    if not header:
        return False
    for item in header.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if coding == name or coding == "*":
            return not _q_zero(params)
    return False


def accepted(header: str | None) -> list[str]:
    """The codings of an Accept-Encoding value that we can produce, in the sender's order
    (``q=0`` excluded)."""
    if not header:
        return []
    out = []
    for item in header.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        if name in _ENCODERS and name not in out and not _q_zero(params):
            out.append(name)
    return out


def _q_zero(params: str) -> bool:
    q = params.replace(" ", "").lower()
    if not q.startswith("q="):
        return False
    try:
        return float(q[2:]) == 0
    except ValueError:
        return False


class Decoder:
    """A bounded streaming decompressor: ``feed()`` chunks, then ``finish()``.

    Raises DecodeError for broken data and TooLarge past ``limit`` bytes of output or the
    ratio guard. ``wire`` and ``raw`` count the bytes in and out.
    """

    __slots__ = ("_between", "_d", "_done", "floor", "limit", "name", "ratio", "raw", "wire")

    def __init__(self, name: str, limit: int, floor: int = RATIO_FLOOR) -> None:
        self.name = name
        self.limit = limit
        self.floor = floor
        self.ratio = MAX_RATIO.get(name, 2000)
        self.wire = 0
        self.raw = 0
        self._done = False
        self._between = False  # gzip: a member just ended (another may follow)
        if name == "br":
            self._d: object = brotli.Decompressor()
        elif name in ("gzip", "deflate"):
            self._d = zlib.decompressobj(47)  # gzip or zlib, detected from the header
        elif name == "zstd" and zstandard is not None:
            self._d = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()
        else:
            raise DecodeError(f"unsupported content coding {name!r}")

    def feed(self, data: bytes) -> bytes:
        """Decompress the next chunk; returns what it decodes to (maybe b"")."""
        if not data:
            return b""
        if self._done:
            raise DecodeError(f"{self.name}: data after the end of the compressed stream")
        step = self._zstd if self.name == "zstd" else self._brotli if self.name == "br" else self._zlib
        try:
            if len(data) <= SLICE:
                return step(data)
            view = memoryview(data)
            return b"".join([step(view[i : i + SLICE]) for i in range(0, len(view), SLICE)])
        except DecodeError:
            raise
        except Exception as exc:  # brotli.error, zlib.error, zstandard.ZstdError
            raise DecodeError(f"broken {self.name} data: {exc}") from None

    def finish(self) -> None:
        """The input ended: raise DecodeError if the compressed stream was cut short."""
        if self.name == "br":
            finished = self._d.is_finished()  # type: ignore[attr-defined]
        elif self.name == "zstd":
            finished = self._done or self._d.eof  # type: ignore[attr-defined]
        else:
            finished = self._between or self._d.eof  # type: ignore[attr-defined]
        if not finished and self.wire:
            raise DecodeError(f"{self.name} data ended before the end of the compressed stream")

    def _check(self, produced: int) -> None:
        self.raw += produced
        if self.raw > self.limit:
            raise TooLarge(f"decompresses to more than the limit of {self.limit} bytes")
        if self.raw > self.floor and self.raw > self.ratio * self.wire:
            raise TooLarge(f"decompresses more than {self.ratio}x (a compression bomb?)")

    def _brotli(self, data: bytes | memoryview) -> bytes:
        d = self._d
        if self._done:
            raise DecodeError("br: data after the end of the compressed stream")
        self.wire += len(data)
        out = d.process(data, output_buffer_limit=STEP_OUTPUT)  # type: ignore[attr-defined]
        self._check(len(out))
        if len(out) < STEP_OUTPUT:
            self._done = d.is_finished()  # type: ignore[attr-defined]
            return out  # type: ignore[no-any-return]
        # The output was cut at the step limit: drain the rest step by step, with empty
        # input (the decoder keeps what it has not consumed), checking the guards each time.
        parts = [out]
        while not d.is_finished():  # type: ignore[attr-defined]
            more = d.process(b"", output_buffer_limit=STEP_OUTPUT)  # type: ignore[attr-defined]
            if not more:
                break
            self._check(len(more))
            parts.append(more)
        self._done = d.is_finished()  # type: ignore[attr-defined]
        return b"".join(parts)

    def _zlib(self, data: bytes | memoryview) -> bytes:
        d = self._d
        if self._done:
            raise DecodeError(f"{self.name}: data after the end of the compressed stream")
        self.wire += len(data)
        self._between = False
        parts = []
        while data:
            out = d.decompress(data, STEP_OUTPUT)  # type: ignore[attr-defined]
            self._check(len(out))
            parts.append(out)
            if d.eof:  # type: ignore[attr-defined]
                rest = d.unused_data  # type: ignore[attr-defined]
                if self.name == "gzip" and rest:
                    # RFC 1952 2.2: a gzip file is a series of members; each decodes on its own.
                    self._d = d = zlib.decompressobj(47)
                    self._between = False
                    data = rest
                    continue
                if rest:
                    raise DecodeError(f"{self.name}: data after the end of the compressed stream")
                if self.name == "gzip":
                    self._between = True  # a next member may follow in the next chunk
                    self._d = d = zlib.decompressobj(47)
                    break
                self._done = True
                break
            data = d.unconsumed_tail  # type: ignore[attr-defined]
            if not out and data:
                raise DecodeError(f"broken {self.name} data: no progress")
        return b"".join(parts)

    def _zstd(self, data: bytes | memoryview) -> bytes:
        d = self._d
        if self._done:
            raise DecodeError("zstd: data after the end of the compressed stream")
        parts = []
        view = memoryview(data)
        for i in range(0, len(view), ZSTD_SLICE):
            piece = view[i : i + ZSTD_SLICE]
            self.wire += len(piece)
            out = d.decompress(piece)  # type: ignore[attr-defined]
            self._check(len(out))
            parts.append(out)
            if d.eof:  # type: ignore[attr-defined]
                if i + ZSTD_SLICE < len(view) or d.unused_data:  # type: ignore[attr-defined]
                    raise DecodeError("zstd: data after the end of the compressed stream")
                self._done = True
                break
        return b"".join(parts)


def safe_ratio(name: str) -> int:
    """Past this ratio a sender sends the body as it is: the receiver's guard would refuse it."""
    return MAX_RATIO.get(name, 2000) // 4


def decoder(name: str, limit: int, floor: int = RATIO_FLOOR) -> Decoder:
    return Decoder(name, limit, floor)
