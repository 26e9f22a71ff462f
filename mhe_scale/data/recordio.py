"""MXNet-compatible RecordIO (.rec + .idx) reading and writing, without MXNet.

File layout (dmlc-core recordio, little-endian), one record = one or more parts:
    part = uint32 magic 0xCED7230A | uint32 lrec = cflag << 29 | length | chunk | zero pad to 4 bytes
    cflag: 0 whole record, 1 first part, 2 middle part, 3 last part.
The writer splits a payload at every 4-byte-aligned occurrence of the magic word (the split drops
it); the reader joins the chunks and puts the magic back between them. So an aligned magic in the
file always starts a part, which lets every offset be checked. `.idx`: text lines
`key<TAB>offset of the record's first part`, in any order.

Image records (MXNet's `recordio.pack`): IRHeader '<IfQQ' = flag, label, id, id2; when flag > 0,
`flag` float32 labels follow and replace the scalar label; then the encoded image.

Every problem with the data raises RecordIOError naming the file, byte offset (or .idx line) and
key; a corrupt length never allocates more than the file holds and never loops.
"""

from __future__ import annotations

import operator
import os
import re
import struct
import uuid
import warnings
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np

MAGIC = 0xCED7230A
MAX_RECORD_BYTES = (1 << 29) - 1  # dmlc-core's limit on one record's payload
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
_IDX_LINE = re.compile(r"\s*[0-9]{1,18}\s+[0-9]{1,18}\s*")


class RecordIOError(ValueError):
    """Corrupt or inconsistent RecordIO data; the message names file, offset or line, and key."""

    def __init__(self, path: str | os.PathLike, problem: str, offset: int | None = None,
                 key: int | None = None, line: int | None = None) -> None:
        where = [str(path)]
        if line is not None:
            where.append(f"line {line}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        if key is not None:
            where.append(f"key {key}")
        super().__init__(f"{', '.join(where)}: {problem}")
        self.path, self.problem, self.offset, self.key, self.line = str(path), problem, offset, key, line

    def __reduce__(self):  # picklable across DataLoader workers
        return type(self), (self.path, self.problem, self.offset, self.key, self.line)


class IRHeader(NamedTuple):
    """MXNet image-record header; `label` is a float, or float32 [flag] when flag > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_image_record(header: IRHeader, image_bytes: bytes) -> bytes:
    """IRHeader + image bytes -> record payload (MXNet `recordio.pack` semantics).

    A scalar label is stored in the header (flag 0); a sequence label is stored as flag = its
    length float32 values after the header (the header's own label field is then 0).
    """
    for name, value in (("id", header.id), ("id2", header.id2)):
        if not 0 <= int(value) < 1 << 64:
            raise ValueError(f"IRHeader.{name}={value} does not fit uint64")
    if np.ndim(header.label) == 0:
        head = _IR.pack(0, float(header.label), int(header.id), int(header.id2))
    else:
        labels = np.asarray(header.label, dtype="<f4").ravel()
        head = _IR.pack(labels.size, 0.0, int(header.id), int(header.id2)) + labels.tobytes()
    return head + bytes(image_bytes)


def unpack_image_record(payload: bytes, *, path: str | os.PathLike = "<payload>", offset: int | None = None,
                        key: int | None = None) -> tuple[IRHeader, bytes]:
    """Record payload -> (IRHeader, image bytes); path/offset/key only label error messages."""
    if len(payload) < _IR.size:
        raise RecordIOError(path, f"record holds {len(payload)} bytes, too short for the {_IR.size}-byte image "
                            "header (IRHeader); is this an image record (mxnet.recordio.pack)?", offset, key)
    flag, label, id_, id2 = _IR.unpack_from(payload)
    start = _IR.size
    if flag > 0:
        start += 4 * flag
        if start > len(payload):
            raise RecordIOError(path, f"IRHeader.flag={flag} announces {flag} float32 labels ({4 * flag} bytes) "
                                f"but only {len(payload) - _IR.size} bytes follow the header", offset, key)
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=_IR.size).astype(np.float32)
    return IRHeader(flag, label, id_, id2), bytes(payload[start:])


def split_payload(payload: bytes) -> list[tuple[int, bytes]]:
    """Payload -> [(cflag, chunk)] parts, split at each 4-byte-aligned magic word (dropped)."""
    cuts, i = [], payload.find(_MAGIC_BYTES)
    while i != -1:
        if i % 4 == 0:
            cuts.append(i)
            i = payload.find(_MAGIC_BYTES, i + 4)
        else:
            i = payload.find(_MAGIC_BYTES, i + 1)
    if not cuts:
        return [(0, payload)]
    starts, ends = [0] + [c + 4 for c in cuts], cuts + [len(payload)]
    flags = [1] + [2] * (len(cuts) - 1) + [3]
    return [(f, payload[s:e]) for f, s, e in zip(flags, starts, ends)]


class RecordIOReader:
    """Random access to a .rec file by integer key.

    With `idx_path`, keys and offsets come from the .idx (checked: unique keys and offsets,
    4-byte aligned, inside the file); each record must end before the next indexed one. Without
    it, a sequential scan indexes the file and keys are record ordinals 0, 1, ... in file order.
    Reads use os.pread, so one reader may be shared by forked DataLoader workers; it pickles.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self._fd: int | None = None
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        self.file_size = os.path.getsize(self.rec_path)
        keys, offsets = self._scan() if self.idx_path is None else self._load_idx(self.idx_path)
        self.keys = keys  # int64 [N], in .idx order (file order when scanned)
        self.keys.setflags(write=False)
        order = np.argsort(keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = keys[order], offsets[order]
        self._check_unique(self._sorted_keys, keys, offsets, "key")
        by_offset = np.sort(offsets)
        self._check_unique(by_offset, keys, offsets, "offset")
        # a record may not run past the next indexed record (or the end of the file)
        nxt = np.searchsorted(by_offset, self._sorted_offsets, side="right")
        self._sorted_limits = np.append(by_offset, self.file_size)[nxt]

    def check_last_record(self) -> None:
        """A .rec cut short (an interrupted copy) loses its last records: validate the record at the highest
        indexed offset (its part headers and length; a few small reads), so datasets can fail at start-up,
        not at that record's first read. RecordIOError naming the key otherwise."""
        if self.idx_path is None or not len(self):
            return  # a scanned file was validated record by record
        i = int(np.argmax(self._sorted_offsets))
        offset, key = int(self._sorted_offsets[i]), int(self._sorted_keys[i])
        try:
            self._parts(offset, self.file_size, key)
        except RecordIOError as err:
            raise RecordIOError(self.rec_path, f"{err.problem}; the last record indexed by {self.idx_path} does not "
                                "fit the file (a truncated .rec, or an .idx of another file?)", err.offset, key) from None

    # ---- index --------------------------------------------------------------------------------
    def _load_idx(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # loadtxt warns on an empty file
                table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None, encoding="latin-1")
        except (ValueError, OverflowError) as err:
            self._raise_idx_line_error(path, str(err))
        if table.size == 0:
            table = np.zeros((0, 2), dtype=np.int64)
        if table.shape[1] != 2 or (table < 0).any():
            self._raise_idx_line_error(path, "expected lines 'key<TAB>offset' of non-negative integers")
        keys, offsets = table[:, 0].copy(), table[:, 1].copy()
        bad = np.flatnonzero((offsets % 4 != 0) | (offsets + _PART.size > self.file_size))
        if bad.size:
            k, o = int(keys[bad[0]]), int(offsets[bad[0]])
            why = "is not a multiple of 4" if o % 4 else f"leaves no room for a record in {self.rec_path} " \
                f"({self.file_size} bytes; truncated .rec or .idx of another file?)"
            more = ", ".join(f"key {int(keys[i])}" for i in bad[1:3]) + (", ..." if bad.size > 3 else "")
            raise RecordIOError(path, f"offset {o} {why}; {bad.size:,} of {len(keys):,} entries point outside "
                                f"the .rec or off the 4-byte grid" + (f" (also {more})" if more else ""), key=k)
        return keys, offsets

    @staticmethod
    def _raise_idx_line_error(path: Path, fallback: str) -> None:
        with open(path, encoding="latin-1") as f:
            for number, line in enumerate(f, start=1):
                if line.strip() and not _IDX_LINE.fullmatch(line):
                    raise RecordIOError(path, f"expected 'key<TAB>offset' (two non-negative integers), "
                                        f"got {line.rstrip()[:80]!r}", line=number)
        raise RecordIOError(path, f"cannot parse the index: {fallback}")

    def _check_unique(self, values: np.ndarray, keys: np.ndarray, offsets: np.ndarray, what: str) -> None:
        dup = np.flatnonzero(values[1:] == values[:-1])
        if dup.size:
            value = int(values[dup[0]])
            if what == "key":
                owners = f"at offsets {offsets[keys == value][:2].tolist()}"
            else:
                owners = f"keys {keys[offsets == value][:2].tolist()}"
            raise RecordIOError(self.idx_path or self.rec_path, f"{what} {value} appears more than once "
                                f"({owners}); an .idx maps each key to its own record")

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        offsets, pos = array("q"), 0
        while pos < self.file_size:
            offsets.append(pos)
            pos = self._parts(pos, self.file_size, None, scanning=True)[1]
        offsets = np.frombuffer(offsets, dtype=np.int64).copy()
        return np.arange(len(offsets), dtype=np.int64), offsets

    # ---- low-level reads ----------------------------------------------------------------------
    def _pread(self, size: int, offset: int, key: int | None) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.rec_path, os.O_RDONLY)
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise RecordIOError(self.rec_path, f"file ended after {len(data)} of {size} bytes "
                                "(was it truncated while open?)", offset, key)
        return data

    def _parts(self, offset: int, limit: int, key: int | None,
               scanning: bool = False) -> tuple[list[tuple[int, int]], int]:
        """Validate the record at `offset` -> ([(chunk start, chunk length)], end offset <= limit).

        A length field corrupted to be shorter is caught by what follows the record: its padding
        must be zero, and a record that stops before `limit` must be followed by another part's
        magic word (checked by the caller's next step when `scanning`)."""
        spans: list[tuple[int, int]] = []
        pos, prev = offset, None
        end_name = "end of the file" if limit == self.file_size else "start of the next indexed record"
        while True:  # each part advances pos by >= 8 bytes, bounded by limit: terminates
            if pos + _PART.size > limit:
                raise RecordIOError(self.rec_path, f"truncated part header: needs 8 bytes, only {limit - pos} "
                                    f"before the {end_name} ({limit})", pos, key)
            magic, lrec = _PART.unpack(self._pread(_PART.size, pos, key))
            if magic != MAGIC:
                raise RecordIOError(self.rec_path, f"bad magic 0x{magic:08X}, expected 0x{MAGIC:08X} at the start "
                                    "of a record part (corrupt file, or an .idx offset of another file)", pos, key)
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if prev is None and cflag not in (0, 1):
                raise RecordIOError(self.rec_path, f"part flag {cflag} cannot start a record (expected 0 = whole "
                                    "record or 1 = first part)", pos, key)
            if prev is not None and cflag not in (2, 3):
                raise RecordIOError(self.rec_path, f"part flag {cflag} after flag {prev}: expected a continuation "
                                    "part (2 = middle or 3 = last)", pos, key)
            end = pos + _PART.size + ((length + 3) & ~3)
            if end > limit:
                raise RecordIOError(self.rec_path, f"part length {length} runs to byte {end}, past the {end_name} "
                                    f"({limit})", pos, key)
            spans.append((pos + _PART.size, length))
            if cflag in (0, 3):
                self._check_record_end(pos, pos + _PART.size + length, end, limit, key, end_name, scanning)
                return spans, end
            pos, prev = end, cflag

    def _check_record_end(self, pos: int, data_end: int, end: int, limit: int, key: int | None, end_name: str,
                          scanning: bool) -> None:
        """Zero padding in [data_end, end); when end < limit (and not scanning), a magic word at end."""
        follow = 0 if scanning or end >= limit else min(4, limit - end)
        tail = self._pread(end - data_end + follow, data_end, key) if end - data_end + follow else b""
        pad, after = tail[:end - data_end], tail[end - data_end:]
        hint = "the part's length field is probably corrupt (too short); rebuild the file or drop this record"
        if pad.strip(b"\0"):
            raise RecordIOError(self.rec_path, f"the {len(pad)} padding bytes after the part's {data_end - pos - 8} "
                                f"data bytes are {pad!r}, not zero: {hint}", pos, key)
        if follow and after != _MAGIC_BYTES:
            raise RecordIOError(self.rec_path, f"the record ends at byte {end} (last part length "
                                f"{data_end - pos - 8}) but no record part starts there (bytes {after!r}; the "
                                f"{end_name} is at {limit}): {hint}", pos, key)

    def _locate(self, key: int) -> tuple[int, int]:
        key = operator.index(key)
        i = int(np.searchsorted(self._sorted_keys, key))
        if i == len(self._sorted_keys) or self._sorted_keys[i] != key:
            raise KeyError(f"key {key} is not in {self.idx_path or self.rec_path} ({len(self)} records)")
        return int(self._sorted_offsets[i]), int(self._sorted_limits[i])

    # ---- public API ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return self.has_keys(np.asarray([key])).item() if isinstance(key, (int, np.integer)) else False

    def has_keys(self, keys: np.ndarray) -> np.ndarray:
        """keys int [M] -> bool [M]: which keys the file holds."""
        keys = np.asarray(keys, dtype=np.int64)
        i = np.minimum(np.searchsorted(self._sorted_keys, keys), max(len(self) - 1, 0))
        return (self._sorted_keys[i] == keys) if len(self) else np.zeros(keys.shape, dtype=bool)

    def offset(self, key: int) -> int:
        """Byte offset of the record's first part."""
        return self._locate(key)[0]

    def read(self, key: int) -> bytes:
        """Payload of the record stored under `key` (parts joined, magic words restored)."""
        offset, limit = self._locate(key)
        spans, _ = self._parts(offset, limit, key)
        return _MAGIC_BYTES.join(self._pread(n, s, key) for s, n in spans)

    def read_prefix(self, key: int, size: int) -> bytes:
        """The first min(size, record length) payload bytes (e.g. an IRHeader) without the rest."""
        offset, limit = self._locate(key)
        spans, _ = self._parts(offset, limit, key)
        out = b""
        for i, (start, length) in enumerate(spans):
            if i:
                out += _MAGIC_BYTES
            out += self._pread(min(length, max(size - len(out), 0)), start, key)
            if len(out) >= size:
                break
        return out[:size]

    def read_image(self, key: int) -> tuple[IRHeader, bytes]:
        """read + unpack_image_record, with errors naming this file, offset and key."""
        return unpack_image_record(self.read(key), path=self.rec_path, offset=self.offset(key), key=key)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(key, payload) for every record, in file order (sequential reads)."""
        for i in np.argsort(self._sorted_offsets, kind="stable"):
            yield int(self._sorted_keys[i]), self.read(int(self._sorted_keys[i]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # each process opens its own descriptor


class RecordIOWriter:
    """Write records under integer keys to a .rec (+ .idx), atomically.

    Data goes to temporary files beside the targets, renamed over them by `close()`; `abort()`
    (or an exception inside `with`) deletes them. A crash leaves only `*.tmp` files behind, never
    a partial file under the final names. Duplicate keys are detected at close.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self._open = False
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        self._rec, self._rec_tmp = open_temp_beside(self.rec_path, "xb")
        self._idx, self._idx_tmp = open_temp_beside(self.idx_path, "x") if self.idx_path else (None, None)
        self._keys = array("q")
        self._pos = 0
        self._open = True

    def write(self, key: int, payload: bytes) -> int:
        """Append one record; returns its byte offset. payload: bytes-like, < 2**29 bytes."""
        if not self._open:
            raise ValueError(f"RecordIOWriter for {self.rec_path} is closed")
        key, payload = operator.index(key), bytes(payload)
        if not 0 <= key < 1 << 63:
            raise ValueError(f"key must be a non-negative int64, got {key}")
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(payload)} bytes for key {key} exceeds the RecordIO limit of "
                             f"{MAX_RECORD_BYTES} bytes; store the item in smaller records")
        offset = self._pos
        for cflag, chunk in split_payload(payload):
            self._rec.write(_PART.pack(MAGIC, cflag << 29 | len(chunk)))
            self._rec.write(chunk)
            self._pos += _PART.size + len(chunk)
        pad = -len(payload) % 4  # chunks before the last one are multiples of 4 long
        self._rec.write(b"\0" * pad)
        self._pos += pad
        self._keys.append(key)
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        """Finish: check keys, flush to disk, rename the temporary files to their final names."""
        if not self._open:
            return
        keys = np.sort(np.frombuffer(self._keys, dtype=np.int64))
        dup = np.flatnonzero(keys[1:] == keys[:-1])
        if dup.size:
            self.abort()
            raise ValueError(f"key {int(keys[dup[0]])} was written more than once to {self.rec_path}; "
                             "nothing was saved")
        for handle, tmp, final in ((self._rec, self._rec_tmp, self.rec_path),
                                   (self._idx, self._idx_tmp, self.idx_path)):
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                os.replace(tmp, final)
        self._open = False

    def abort(self) -> None:
        """Discard everything written; the final paths are left untouched."""
        for handle, tmp in ((self._rec, self._rec_tmp), (self._idx, self._idx_tmp)):
            if handle is not None:
                handle.close()
                Path(tmp).unlink(missing_ok=True)
        self._open = False

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        self.abort() if exc_type is not None else self.close()

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            warnings.warn(f"RecordIOWriter for {self.rec_path} was never closed; its records are discarded",
                          ResourceWarning, stacklevel=2)
            self.abort()


def open_temp_beside(final: Path, mode: str) -> tuple[IO, Path]:
    """A new file beside `final` (same file system, so the rename is atomic) -> (handle, its path)."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    return open(tmp, mode), tmp
