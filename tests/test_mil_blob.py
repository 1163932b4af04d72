"""BLOBFILE weight files: exact byte layout (docs/ane-runtime.md#blob-files), round trips, corrupted headers."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rustane.mil import BlobError, blob_key, read_blob, write_blob, write_multi_blob


def reference_blob(values_fp16: np.ndarray) -> bytes:
    """The layout written out field by field from docs/ane-runtime.md#blob-files, independent of rustane.mil.blob."""
    data = values_fp16.astype("<f2").tobytes()
    header = bytearray(128)
    header[0] = 0x01
    header[4] = 0x02
    header[64:68] = bytes([0xEF, 0xBE, 0xAD, 0xDE])
    header[68] = 0x01
    header[72:76] = len(data).to_bytes(4, "little")
    header[80:84] = (128).to_bytes(4, "little")
    return bytes(header) + data


def test_exact_layout_of_one_matrix():
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 8 - 0.5
    blob = write_blob(w)
    assert blob == reference_blob(w.astype(np.float16))
    assert len(blob) == 128 + 24
    # data is row-major [OUT, IN]: element (1, 2) sits at 128 + 2*(1*4 + 2)
    assert struct.unpack_from("<e", blob, 128 + 2 * 6)[0] == w[1, 2]


def test_blob_key():
    assert blob_key("wq") == "@model_path/weights/wq.bin"
    assert blob_key("mask.bin") == "@model_path/weights/mask.bin"
    for bad in ("", "a/b", "..", None):
        with pytest.raises(ValueError):
            blob_key(bad)


def test_overflow_and_dtype_errors():
    with pytest.raises(ValueError, match=r"index \(1,\) overflows fp16"):
        write_blob(np.array([1.0, 1e6], np.float32))
    with pytest.raises(TypeError):
        write_blob(np.array(["a"]))
    np.testing.assert_array_equal(read_blob(write_blob(np.array([np.inf, -np.inf]))), [np.inf, -np.inf])


fp16_arrays = hnp.arrays(
    np.float16,
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
    elements=st.floats(width=16, allow_nan=False),
)


@settings(max_examples=100)
@given(fp16_arrays)
def test_write_read_round_trip(a):
    blob = write_blob(a)
    assert blob == reference_blob(a)
    back = read_blob(blob, shape=a.shape)
    assert back.dtype == np.float16 and back.shape == a.shape
    assert back.tobytes() == a.tobytes()  # bit-exact, including -0.0


small_fp16_arrays = hnp.arrays(
    np.float16, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5), elements=st.floats(width=16, allow_nan=False)
)


@settings(max_examples=50)
@given(st.lists(small_fp16_arrays, min_size=1, max_size=4))
def test_multi_chunk_read(arrays):
    blob, offsets = write_multi_blob(arrays)
    # chunk i at 64 + sum_{j<i}(64 + bytes_j), data 64 bytes after its header (docs/ane-runtime.md#blob-files)
    expect = [64]
    for a in arrays[:-1]:
        expect.append(expect[-1] + 64 + a.nbytes)
    assert offsets == expect
    for a, off in zip(arrays, offsets):
        assert struct.unpack_from("<I", blob, off)[0] == 0xDEADBEEF
        assert struct.unpack_from("<I", blob, off + 16)[0] == off + 64
        assert read_blob(blob, off, shape=a.shape).tobytes() == a.tobytes()


def test_read_other_dtype_and_errors_are_specific():
    a = np.arange(8, dtype=np.float16)
    blob = write_blob(a)
    assert read_blob(blob, dtype=np.int8).shape == (16,)
    with pytest.raises(BlobError, match="shape \\[3, 3\\] needs 9"):
        read_blob(blob, shape=(3, 3))
    with pytest.raises(BlobError, match="magic"):
        read_blob(blob, offset=72)
    with pytest.raises(BlobError, match="outside the file"):
        read_blob(blob, offset=len(blob) - 10)
    with pytest.raises(BlobError, match="outside the file"):
        read_blob(blob, offset=0)
    bench = bytearray(blob)
    bench[72:88] = bytes(16)  # benchmark builders leave size and offset zero
    with pytest.raises(BlobError, match="benchmark-style"):
        read_blob(bytes(bench))
    odd = bytearray(blob)
    odd[72] = 15
    with pytest.raises(BlobError, match="multiple of"):
        read_blob(bytes(odd))


# Corruptions: (byte offset, new bytes) applied to a valid one-matrix file; every one must raise
# BlobError (never IndexError/struct.error or a silently wrong array).
@settings(max_examples=200)
@given(
    fp16_arrays,
    st.sampled_from(["version", "count", "magic", "size", "data_offset", "truncate"]),
    st.data(),
)
def test_corrupted_headers_raise_blob_error(a, field, data):
    blob = bytearray(write_blob(a))
    n = len(blob)
    if field == "version":
        v = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != 2))
        blob[4:8] = v.to_bytes(4, "little")
    elif field == "count":
        blob[0:4] = bytes(4)
    elif field == "magic":
        i = data.draw(st.integers(64, 67))
        blob[i] ^= data.draw(st.integers(1, 255))
    elif field == "size":
        # any size that no longer fits inside the file (or is odd for fp16)
        size = data.draw(st.one_of(st.integers(n - 128 + 1, 2**64 - 1), st.integers(0, n - 128).filter(lambda s: s % 2)))
        blob[72:80] = size.to_bytes(8, "little")
    elif field == "data_offset":
        off = data.draw(st.one_of(st.integers(0, 127), st.integers(n - a.nbytes + 1, 2**64 - 1)))
        blob[80:88] = off.to_bytes(8, "little")
    else:
        blob = blob[: data.draw(st.integers(0, n - 1))]
    with pytest.raises(BlobError):
        read_blob(bytes(blob), shape=a.shape)


@settings(max_examples=200)
@given(st.binary(max_size=300), st.integers(-10, 400))
def test_random_bytes_never_crash(data, offset):
    try:
        out = read_blob(data, offset)
    except BlobError:
        return
    assert out.dtype == np.float16
