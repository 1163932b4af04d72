"""BLOBFILE weight files (docs/ane-runtime.md#blob-files).

Layout, little-endian::

    file header   bytes 0..63    uint32 chunk count (=1) at 0, uint32 version (=2) at 4, rest zero
    chunk header  64 bytes each  +0 magic EF BE AD DE, +4 uint32 1, +8 data size in bytes,
                                 +16 absolute file offset of the data, rest zero
    data          fp16 values, row-major (a conv weight [OUT, IN, 1, 1] is [OUT, IN])

``write_blob`` writes the one-matrix-per-file form every training kernel uses (data at 128, MIL
``offset = uint64(64)``); M1 rejects several chunks in one file, so that is all the engine emits.
``read_blob`` also reads multi-chunk files (pass the chunk's header offset) so captured blobs can
be inspected. The size/offset fields are read as uint64 (they are uint32 with zero upper bytes in
every writer we know of, which reads identically).
"""

from __future__ import annotations

import math
import struct

import numpy as np

FILE_HEADER_BYTES = 64
CHUNK_HEADER_BYTES = 64
CHUNK_MAGIC = 0xDEADBEEF
FILE_VERSION = 2
#: MIL ``offset`` of the single chunk in a one-matrix file.
SINGLE_CHUNK_OFFSET = FILE_HEADER_BYTES
#: File offset of the data in a one-matrix file.
SINGLE_DATA_OFFSET = FILE_HEADER_BYTES + CHUNK_HEADER_BYTES
WEIGHTS_PREFIX = "@model_path/weights/"


class BlobError(ValueError):
    """A blob file that does not have the layout of docs/ane-runtime.md#blob-files."""


def blob_key(name: str) -> str:
    """The weights-dictionary key and BLOBFILE path for weight ``name``: ``@model_path/weights/<name>.bin``."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"blob name must be a non-empty file stem without '/', got {name!r}")
    if name.endswith(".bin"):
        name = name[:-4]
    return f"{WEIGHTS_PREFIX}{name}.bin"


def _file_header(chunks: int) -> bytes:
    return struct.pack("<II", chunks, FILE_VERSION).ljust(FILE_HEADER_BYTES, b"\0")


def _chunk_header(size: int, data_offset: int) -> bytes:
    return struct.pack("<IIII", CHUNK_MAGIC, 1, size, 0).ljust(16, b"\0") + struct.pack("<I", data_offset).ljust(
        CHUNK_HEADER_BYTES - 16, b"\0"
    )


def _as_fp16(array, what: str, dtype=np.float16) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{what}: expected a numeric array, got dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    if arr.dtype.kind == "f":
        bad = np.isfinite(arr) & ~np.isfinite(out)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{what}: value {arr[idx]!r} at index {idx} overflows {'fp16' if np.dtype(dtype) == np.float16 else 'fp32'}")
    if out.nbytes >= 2**32:
        raise ValueError(f"{what}: {out.nbytes} bytes do not fit the uint32 size field of a blob chunk")
    return out


def write_blob(array, dtype=np.float16) -> bytes:
    """One fp16 matrix -> the bytes of a one-chunk blob file (128-byte header, data at 128).

    The array is converted to fp16 (values that overflow fp16 raise) and written row-major.
    ``dtype=np.float32`` writes fp32 data instead: only the simulator's exact fp32 kernels use
    that (the ANE path is fp16 throughout).
    Reference it in MIL with ``BLOBFILE(path = string(blob_key(name)), offset = uint64(64))``.
    """
    if np.dtype(dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ValueError(f"write_blob: dtype must be float16 or float32, got {np.dtype(dtype).name}")
    data = _as_fp16(array, "write_blob", dtype).tobytes()
    return _file_header(1) + _chunk_header(len(data), SINGLE_DATA_OFFSET) + data


def write_multi_blob(arrays) -> tuple[bytes, list[int]]:
    """Several fp16 matrices in one file; returns (bytes, MIL chunk offsets).

    Only for reading tools and tests: M1 rejects multi-chunk files (docs/ane-runtime.md#blob-files), so the engine
    always uses ``write_blob``. Chunk i starts at 64 + sum of earlier (64 + bytes).
    """
    parts = [_file_header(len(arrays))]
    offsets: list[int] = []
    pos = FILE_HEADER_BYTES
    for k, a in enumerate(arrays):
        data = _as_fp16(a, f"write_multi_blob[{k}]").tobytes()
        offsets.append(pos)
        parts.append(_chunk_header(len(data), pos + CHUNK_HEADER_BYTES))
        parts.append(data)
        pos += CHUNK_HEADER_BYTES + len(data)
    return b"".join(parts), offsets


def read_blob(data: bytes, offset: int = SINGLE_CHUNK_OFFSET, dtype=np.float16, shape=None) -> np.ndarray:
    """Read the chunk whose header is at ``offset`` (the MIL BLOBFILE offset) from blob file ``data``.

    Validates the file header (version 2, at least one chunk), the chunk magic, that the data lies
    inside the file after the chunk header, and that its size fits ``dtype`` and ``shape``.
    Returns a fresh array (a copy, not a view of ``data``).
    """
    buf = bytes(data) if not isinstance(data, (bytes, bytearray, memoryview)) else data
    n = len(buf)
    dt = np.dtype(dtype)
    if n < FILE_HEADER_BYTES + CHUNK_HEADER_BYTES:
        raise BlobError(f"blob is {n} bytes; a blob file needs at least {FILE_HEADER_BYTES + CHUNK_HEADER_BYTES}")
    count, version = struct.unpack_from("<II", buf, 0)
    if version != FILE_VERSION:
        raise BlobError(f"blob file header: version (bytes 4..7) is {version}, expected {FILE_VERSION}")
    if count < 1:
        raise BlobError("blob file header: chunk count (bytes 0..3) is 0, expected at least 1")
    if not isinstance(offset, (int, np.integer)) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    offset = int(offset)
    if offset < FILE_HEADER_BYTES or offset + CHUNK_HEADER_BYTES > n:
        raise BlobError(
            f"chunk offset {offset} is outside the file: it must be >= {FILE_HEADER_BYTES} and leave "
            f"{CHUNK_HEADER_BYTES} header bytes before the end ({n} bytes)"
        )
    magic, = struct.unpack_from("<I", buf, offset)
    if magic != CHUNK_MAGIC:
        raise BlobError(
            f"no chunk at offset {offset}: magic is 0x{magic:08X}, expected 0x{CHUNK_MAGIC:08X} "
            "(bytes EF BE AD DE); is the BLOBFILE offset right? (one-matrix files use 64)"
        )
    size, = struct.unpack_from("<Q", buf, offset + 8)
    data_off, = struct.unpack_from("<Q", buf, offset + 16)
    if size == 0 and data_off == 0:
        raise BlobError(
            f"chunk at {offset} has zero size and data-offset fields (benchmark-style header); "
            "fill them in (docs/ane-runtime.md#blob-files)"
        )
    if data_off < offset + CHUNK_HEADER_BYTES:
        raise BlobError(
            f"chunk at {offset}: data offset {data_off} points into the headers (must be >= {offset + CHUNK_HEADER_BYTES})"
        )
    if data_off + size > n:
        raise BlobError(f"chunk at {offset}: data [{data_off}, {data_off + size}) runs past the end of the file ({n} bytes)")
    if size % dt.itemsize:
        raise BlobError(f"chunk at {offset}: data size {size} is not a multiple of the {dt} item size {dt.itemsize}")
    count_elems = size // dt.itemsize
    if shape is not None:
        shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        if math.prod(shape) != count_elems:
            raise BlobError(
                f"chunk at {offset} holds {count_elems} {dt} values but shape {list(shape)} needs {math.prod(shape)}"
            )
    else:
        shape = (count_elems,)
    arr = np.frombuffer(buf, dtype=dt.newbyteorder("<"), count=count_elems, offset=data_off)
    return arr.astype(dt, copy=True).reshape(shape)
