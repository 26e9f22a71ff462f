import io
import pickle
import random
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mhe_scale.data.face_dataset import RecordIOFaceDataset, SyntheticFaceDataset, pack_image_folder
from mhe_scale.data.recordio import (IRHeader, RecordIOError, RecordIOReader, RecordIOWriter, pack_image_record,
                                     unpack_image_record)

from conftest import load_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
MAGIC = 0xCED7230A
M = struct.pack("<I", MAGIC)


# ---- naive references (loops on purpose) ----------------------------------------------------------
def naive_encode(payload: bytes) -> bytes:
    """One record as dmlc-core writes it: split at aligned magic words, pad the last part."""
    parts, start = [], 0
    for i in range(0, len(payload) - 3, 4):
        if payload[i:i + 4] == M:
            parts.append(payload[start:i])
            start = i + 4
    parts.append(payload[start:])
    out = b""
    for j, chunk in enumerate(parts):
        cflag = 0 if len(parts) == 1 else 1 if j == 0 else 3 if j == len(parts) - 1 else 2
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(chunk)) + chunk
    return out + b"\0" * (-len(payload) % 4)


def naive_parts(data: bytes) -> list[list[tuple[int, int, int, int]]]:
    """Valid file bytes -> per record, its parts as (header pos, chunk start, chunk length, padded end)."""
    records, pos, current = [], 0, []
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        length = lrec & ((1 << 29) - 1)
        end = pos + 8 + (length + 3) // 4 * 4
        current.append((pos, pos + 8, length, end))
        if lrec >> 29 in (0, 3):
            records.append(current)
            current = []
        pos = end
    return records


def naive_decode(data: bytes) -> list[bytes]:
    return [M.join(data[s:s + n] for _, s, n, _ in parts) for parts in naive_parts(data)]


def write_records(rec: Path, idx: Path | None, items: list[tuple[int, bytes]]) -> None:
    with RecordIOWriter(rec, idx) as writer:
        for key, payload in items:
            writer.write(key, payload)


# ---- format: exact bytes and round trips ----------------------------------------------------------
@pytest.mark.parametrize("payload,expected", [
    (b"", struct.pack("<II", MAGIC, 0)),
    (b"ab", struct.pack("<II", MAGIC, 2) + b"ab\0\0"),
    (b"abcd", struct.pack("<II", MAGIC, 4) + b"abcd"),
    (M + b"xyz", struct.pack("<II", MAGIC, 1 << 29) + struct.pack("<II", MAGIC, 3 << 29 | 3) + b"xyz\0"),
    (b"1234" + M + b"5678" + M, struct.pack("<II", MAGIC, 1 << 29 | 4) + b"1234"
     + struct.pack("<II", MAGIC, 2 << 29 | 4) + b"5678" + struct.pack("<II", MAGIC, 3 << 29)),
    (b"x" + M, struct.pack("<II", MAGIC, 5) + b"x" + M + b"\0\0\0"),  # unaligned magic: no split
])
def test_writer_bytes_match_the_format(tmp_path, payload, expected):
    write_records(tmp_path / "a.rec", tmp_path / "a.idx", [(7, payload)])
    assert (tmp_path / "a.rec").read_bytes() == expected == naive_encode(payload)
    assert (tmp_path / "a.idx").read_text() == "7\t0\n"
    assert RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx").read(7) == payload


payload_strategy = st.lists(st.one_of(st.binary(max_size=9), st.just(M)), max_size=6).map(b"".join)


@settings(max_examples=60, deadline=None)
@given(payloads=st.lists(payload_strategy, min_size=0, max_size=8), seed=st.integers(0, 2**16))
def test_round_trip_random_payloads_with_magic_words(payloads, seed):
    keys = random.Random(seed).sample(range(1000), len(payloads))  # unsorted, like im2rec
    with tempfile.TemporaryDirectory() as tmp:
        rec, idx = Path(tmp) / "r.rec", Path(tmp) / "r.idx"
        write_records(rec, idx, list(zip(keys, payloads)))
        assert rec.read_bytes() == b"".join(naive_encode(p) for p in payloads)
        assert naive_decode(rec.read_bytes()) == payloads
        reader = RecordIOReader(rec, idx)
        assert reader.keys.tolist() == keys
        for key, payload in zip(keys, payloads):
            assert reader.read(key) == payload
            assert reader.read_prefix(key, 6) == payload[:6]
        assert list(reader) == list(zip(keys, payloads))  # file order
        scanned = RecordIOReader(rec)  # no .idx: keys are ordinals
        assert list(scanned) == list(enumerate(payloads))


def test_image_header_pack_unpack():
    payload = pack_image_record(IRHeader(0, 3.0, 7, 9), b"IMG")
    assert payload == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"IMG"
    header, image = unpack_image_record(payload)
    assert header == IRHeader(0, 3.0, 7, 9) and image == b"IMG"
    payload = pack_image_record(IRHeader(0, [4.0, 2.5], 1, 0), b"")  # label array: flag = its length
    assert payload == struct.pack("<IfQQ", 2, 0.0, 1, 0) + struct.pack("<2f", 4.0, 2.5)
    header, image = unpack_image_record(payload)
    assert header.flag == 2 and header.label.tolist() == [4.0, 2.5] and image == b""
    with pytest.raises(RecordIOError, match=r"x\.rec, byte offset 40, key 5: .*IRHeader"):
        unpack_image_record(payload[:20], path="x.rec", offset=40, key=5)
    with pytest.raises(RecordIOError, match="announces 2 float32 labels"):
        unpack_image_record(payload[:28])


# ---- the real MXNet-written file --------------------------------------------------------------------
def read_lst_file(path: Path) -> dict[int, tuple[float, str]]:
    out = {}
    for line in path.read_text().splitlines():
        key, label, rel = line.split("\t")
        out[int(key)] = (float(label), rel)
    return out


def test_reads_mxnet_im2rec_file(shared_data):
    folder = shared_data / "recordio-im2rec-faces"
    rec, idx = folder / "validation.rec", folder / "validation.idx"
    lst = read_lst_file(folder / "validation.lst")
    reader = RecordIOReader(rec, idx)
    assert len(reader) == 229 == len(lst)
    idx_keys = [int(line.split("\t")[0]) for line in idx.read_text().splitlines()]
    assert reader.keys.tolist() == idx_keys and sorted(idx_keys) == sorted(lst)
    for key in idx_keys:
        header, image = reader.read_image(key)
        assert (header.flag, header.id, header.id2) == (0, key, 0)
        assert header.label == lst[key][0]
        assert Image.open(io.BytesIO(image)).size == (112, 112)
    data = rec.read_bytes()
    by_file_order = [payload for _, payload in reader]
    assert by_file_order == naive_decode(data)
    assert [p for _, p in RecordIOReader(rec)] == by_file_order  # scan without .idx


def test_face_dataset_on_mxnet_im2rec_file(shared_data):
    folder = shared_data / "recordio-im2rec-faces"
    lst = read_lst_file(folder / "validation.lst")
    ds = RecordIOFaceDataset(folder / "validation.rec", folder / "validation.idx")
    by_records = RecordIOFaceDataset(folder / "validation.rec", folder / "validation.idx", labels_from="records")
    assert ds.layout == "im2rec" and len(ds) == 229 and ds.num_classes == 25
    assert sorted(zip(ds.keys.tolist(), ds.labels.tolist())) == sorted((k, int(v[0])) for k, v in lst.items())
    assert sorted(zip(by_records.keys.tolist(), by_records.labels.tolist())) == sorted(zip(ds.keys.tolist(),
                                                                                           ds.labels.tolist()))
    for i in range(0, 229, 37):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 112, 112)
        assert label == lst[int(ds.keys[i])][0]
    scanned = RecordIOFaceDataset(folder / "validation.rec")  # no .idx: ordinals; the .lst is not used
    assert sorted(scanned.labels.tolist()) == sorted(ds.labels.tolist())
    assert scanned[5][1] == scanned.labels[5]


# ---- packing a folder ---------------------------------------------------------------------------------
@pytest.fixture
def image_folder(tmp_path):
    """3 identities (sorted: Zed, alice, bob), PNG and JPEG images of 10x6, plus files to ignore."""
    rng = np.random.default_rng(0)
    root, expected = tmp_path / "faces", []
    for label, (name, count) in enumerate([("Zed", 2), ("alice", 3), ("bob", 1)]):
        (root / name).mkdir(parents=True)
        for j in range(count):
            path = root / name / f"{j}.{'png' if j % 2 == 0 else 'jpg'}"
            Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).save(path)
            expected.append((path, label))
        (root / name / "notes.txt").write_text("not an image")
    (root / "README").write_text("ignored")
    return root, expected


def test_pack_without_header_reads_back_exact_pixels(image_folder, tmp_path):
    root, expected = image_folder
    packed = pack_image_folder(root, tmp_path / "out", pass_through=True, progress=False)
    assert (packed.num_images, packed.num_classes) == (6, 3)
    ds = RecordIOFaceDataset(packed.rec_path, packed.idx_path)
    assert ds.layout == "im2rec" and ds.num_classes == 3 and ds.keys.tolist() == list(range(6))
    assert ds.labels.tolist() == [label for _, label in expected]
    for i, (path, label) in enumerate(expected):
        image, got = ds[i]
        assert got == label
        assert torch.equal(image, torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
    lines = packed.lst_path.read_text().splitlines()
    assert lines[1] == "1\t0.000000\tZed/1.jpg" and len(lines) == 6


def test_pack_cli_with_header_writes_insightface_layout(image_folder, tmp_path):
    root, expected = image_folder
    tool = load_tool("pack_recordio")
    assert tool.main([str(root), str(tmp_path / "ms1m"), "--header", "--quality", "90", "--no-progress"]) == 0
    reader = RecordIOReader(tmp_path / "ms1m.rec", tmp_path / "ms1m.idx")
    assert sorted(reader.keys.tolist()) == list(range(10))  # header, 6 images, 3 identities
    header, image = reader.read_image(0)
    assert header.flag == 2 and header.label.tolist() == [7.0, 10.0] and image == b""
    ranges = [reader.read_image(k)[0].label.tolist() for k in (7, 8, 9)]
    assert ranges == [[1.0, 3.0], [3.0, 6.0], [6.0, 7.0]]
    ds = RecordIOFaceDataset(tmp_path / "ms1m.rec", tmp_path / "ms1m.idx")
    assert ds.layout == "insightface" and ds.keys.tolist() == list(range(1, 7)) and ds.num_classes == 3
    assert ds.labels.tolist() == [label for _, label in expected]
    for i, (_, label) in enumerate(expected):
        image, got = ds[i]
        assert got == label and image.shape == (3, 6, 10) and image.dtype == torch.uint8


def test_insightface_identity_ranges_are_checked(tmp_path):
    image = pack_image_record(IRHeader(0, 0.0, 1, 0), b"")
    bad = [(0, pack_image_record(IRHeader(2, [3, 5], 0, 0), b"")), (1, image), (2, image),
           (3, pack_image_record(IRHeader(2, [1, 2], 3, 0), b"")),
           (4, pack_image_record(IRHeader(2, [1, 3], 4, 0), b""))]  # overlaps identity 0
    write_records(tmp_path / "b.rec", tmp_path / "b.idx", bad)
    with pytest.raises(RecordIOError, match="b.rec, key 4: identity ranges must tile"):
        RecordIOFaceDataset(tmp_path / "b.rec", tmp_path / "b.idx")


def test_forced_insightface_layout_refuses_an_image_as_header(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(jpeg, format="JPEG")
    labels9 = [2, 3] + [0.5] * 7  # flag 9: nine float labels whose first two look like a key range
    items = [(0, pack_image_record(IRHeader(0, labels9, 0, 0), jpeg.getvalue())),
             (1, pack_image_record(IRHeader(0, 0.0, 1, 0), jpeg.getvalue())),
             (2, pack_image_record(IRHeader(2, [1, 2], 2, 0), b""))]
    write_records(tmp_path / "f.rec", tmp_path / "f.idx", items)
    with pytest.raises(RecordIOError, match=r"f\.rec, byte offset 0, key 0: key 0 holds a \d+-byte image \(IRHeader "
                       r"flag 9\), so it is not an insightface header.*layout='im2rec'"):
        RecordIOFaceDataset(tmp_path / "f.rec", tmp_path / "f.idx", layout="insightface")


def test_records_with_several_labels_warn_that_only_the_first_is_the_class(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(jpeg, format="JPEG")
    nine = [[float(k % 2)] + [0.25] * 8 for k in range(3)]  # flag 9: class first, then 8 more floats
    items = [(k, pack_image_record(IRHeader(0, nine[k], k, 0), jpeg.getvalue())) for k in range(3)]
    write_records(tmp_path / "m.rec", tmp_path / "m.idx", items)
    with pytest.warns(UserWarning, match=r"m\.rec: key 0 carries 9 labels \[0, 0.25, 0.25, 0.25, \.\.\.\].*takes the "
                      r"first \(0\) as the class"):
        ds = RecordIOFaceDataset(tmp_path / "m.rec", tmp_path / "m.idx", labels_from="records")
    assert ds.labels.tolist() == [0, 1, 0]
    (tmp_path / "m.lst").write_text("".join(f"{k}\t{k % 2}\t0.25\tpic{k}.jpg\n" for k in range(3)))
    with pytest.warns(UserWarning, match=r"m\.lst: key 0 carries 2 labels \[0, 0.25\]"):
        RecordIOFaceDataset(tmp_path / "m.rec", tmp_path / "m.idx", labels_from="lst")
    # insightface layout: labels come from identity records; the image's own header warns on read
    head = [(0, pack_image_record(IRHeader(2, [2, 3], 0, 0), b"")),
            (1, pack_image_record(IRHeader(0, nine[0], 1, 0), jpeg.getvalue())),
            (2, pack_image_record(IRHeader(2, [1, 2], 2, 0), b""))]
    write_records(tmp_path / "h.rec", tmp_path / "h.idx", head)
    ds = RecordIOFaceDataset(tmp_path / "h.rec", tmp_path / "h.idx")
    with pytest.warns(UserWarning, match=r"h\.rec: key 1 carries 9 labels"):
        assert ds[0][1] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per dataset; one-label records stay quiet
        ds[0]
        single = [(k, pack_image_record(IRHeader(0, float(k), k, 0), jpeg.getvalue())) for k in range(2)]
        write_records(tmp_path / "s.rec", tmp_path / "s.idx", single)
        RecordIOFaceDataset(tmp_path / "s.rec", tmp_path / "s.idx")[1]


# ---- corruption: fuzzing and messages ------------------------------------------------------------------
FUZZ_ITEMS = [(5, b"plain"), (2, M + b"head" + M), (9, b""), (0, b"abcdefgh" + M + b"ij" + M + b"k"), (4, b"tail!")]


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    write_records(folder / "base.rec", folder / "base.idx", FUZZ_ITEMS)
    data = (folder / "base.rec").read_bytes()
    spans = dict(zip([k for k, _ in FUZZ_ITEMS], naive_parts(data)))
    return folder, data, (folder / "base.idx").read_bytes(), spans


def _read_all(reader: RecordIOReader) -> dict[int, bytes | RecordIOError]:
    out = {}
    for key in reader.keys.tolist():
        try:
            out[key] = reader.read(key)
        except RecordIOError as err:
            out[key] = err
    return out


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fuzz_rec_byte_flip(fuzz_base, data):
    folder, base, idx, spans = fuzz_base
    pos = data.draw(st.integers(0, len(base) - 1))
    bad = bytearray(base)
    bad[pos] ^= data.draw(st.integers(1, 255))
    (folder / "bad.rec").write_bytes(bytes(bad))
    got = _read_all(RecordIOReader(folder / "bad.rec", folder / "base.idx"))
    original = dict(FUZZ_ITEMS)
    for key, parts in spans.items():
        in_chunk = any(s <= pos < s + n for _, s, n, _ in parts)
        if not parts[0][0] <= pos < parts[-1][3]:
            assert got[key] == original[key]  # other records are untouched
        elif in_chunk:  # a payload byte: same length, exactly one byte differs
            assert len(got[key]) == len(original[key])
            assert sum(a != b for a, b in zip(got[key], original[key])) == 1
        elif not any(h <= pos < s for h, s, _, _ in parts):  # padding must stay zero
            assert isinstance(got[key], RecordIOError) and "padding bytes" in str(got[key])
    # the same file without .idx: error, or the records before the flip unchanged
    try:
        scanned = [p for _, p in RecordIOReader(folder / "bad.rec")]
    except RecordIOError:
        return
    before = [original[k] for k, parts in spans.items() if parts[-1][3] <= pos]
    assert scanned[:len(before)] == before


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_truncation(fuzz_base, data):
    folder, base, idx, spans = fuzz_base
    cut = data.draw(st.integers(0, len(base) - 1))
    (folder / "cut.rec").write_bytes(base[:cut])
    ends = {key: parts[-1][3] for key, parts in spans.items()}
    original = dict(FUZZ_ITEMS)
    try:
        reader = RecordIOReader(folder / "cut.rec", folder / "base.idx")
    except RecordIOError as err:
        assert "cut.rec" in str(err) or "base.idx" in str(err)
        assert any(parts[0][0] + 8 > cut for parts in spans.values())
    else:
        for key, value in _read_all(reader).items():
            assert value == original[key] if ends[key] <= cut else isinstance(value, RecordIOError)
    boundaries = [0] + [parts[-1][3] for parts in spans.values()]  # file order = write order
    if cut in boundaries:
        scanned = [p for _, p in RecordIOReader(folder / "cut.rec")]
        assert scanned == [p for _, p in FUZZ_ITEMS][:boundaries.index(cut)]
    else:
        with pytest.raises(RecordIOError, match="cut.rec, byte offset"):
            RecordIOReader(folder / "cut.rec")


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_fuzz_idx_byte_flip(fuzz_base, data):
    folder, base, idx, spans = fuzz_base
    pos = data.draw(st.integers(0, len(idx) - 1))
    bad = bytearray(idx)
    bad[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != idx[pos]))
    (folder / "bad.idx").write_bytes(bytes(bad))
    try:
        reader = RecordIOReader(folder / "base.rec", folder / "bad.idx")
    except RecordIOError as err:
        assert "bad.idx" in str(err) or "base.rec" in str(err)
        return
    for value in _read_all(reader).values():  # an offset can only name a real record, or fail
        assert isinstance(value, RecordIOError) or value in [p for _, p in FUZZ_ITEMS]


def _corrupt(folder: Path, patch: dict[int, bytes], idx_text: str | None = None) -> RecordIOReader:
    data = bytearray((folder / "base.rec").read_bytes())
    for pos, value in patch.items():
        data[pos:pos + len(value)] = value
    (folder / "x.rec").write_bytes(bytes(data))
    (folder / "x.idx").write_text(idx_text if idx_text is not None else (folder / "base.idx").read_text())
    return RecordIOReader(folder / "x.rec", folder / "x.idx")


def test_error_messages_name_file_offset_and_key(fuzz_base):
    folder, base, idx, spans = fuzz_base
    second = spans[2][0][0]  # records: 5 @0 (16 bytes), 2 @16 (3 parts), ...
    assert second == 16
    with pytest.raises(RecordIOError, match=r"x\.rec, byte offset 16, key 2: bad magic 0x00000000"):
        _corrupt(folder, {16: b"\0\0\0\0"}).read(2)
    with pytest.raises(RecordIOError, match=r"x\.rec, byte offset 0, key 5: part length 536870911 runs .* past"):
        _corrupt(folder, {4: struct.pack("<I", (1 << 29) - 1)}).read(5)
    with pytest.raises(RecordIOError, match=r"byte offset 0, key 5: part length 12 runs to byte 20, past the start "
                       r"of the next indexed record \(16\)"):
        _corrupt(folder, {4: struct.pack("<I", 12)}).read(5)
    with pytest.raises(RecordIOError, match=r"byte offset 0, key 5: part flag 2 cannot start a record"):
        _corrupt(folder, {4: struct.pack("<I", 2 << 29 | 5)}).read(5)
    middle = spans[2][1][0]
    with pytest.raises(RecordIOError, match=rf"byte offset {middle}, key 2: part flag 0 after flag 1"):
        _corrupt(folder, {middle + 4: struct.pack("<I", 4)}).read(2)
    with pytest.raises(RecordIOError, match=r"x\.idx, key 5: offset 4096 leaves no room"):
        _corrupt(folder, {}, "5\t4096\n")
    with pytest.raises(RecordIOError, match=r"x\.idx, key 5: offset 2 is not a multiple of 4"):
        _corrupt(folder, {}, "5\t2\n")
    with pytest.raises(RecordIOError, match=r"x\.idx, line 3: expected 'key<TAB>offset'"):
        _corrupt(folder, {}, "5\t0\n\n2\tsixteen\n")
    with pytest.raises(RecordIOError, match=r"x\.idx: offset 0 appears more than once \(keys \[5, 6\]\)"):
        _corrupt(folder, {}, "5\t0\n6\t0\n")
    with pytest.raises(RecordIOError, match=r"x\.idx: key 5 appears more than once \(at offsets \[0, 16\]\)"):
        _corrupt(folder, {}, "5\t0\n5\t16\n")
    with pytest.raises(RecordIOError, match=r"x\.rec, byte offset 0, key 5: record holds 5 bytes.*IRHeader"):
        _corrupt(folder, {}).read_image(5)
    with pytest.raises(KeyError, match="key 77 is not in"):
        _corrupt(folder, {}).read(77)
    (folder / "t.rec").write_bytes(base[:21])
    with pytest.raises(RecordIOError, match=r"t\.rec, byte offset 16: truncated part header"):
        RecordIOReader(folder / "t.rec")


def test_length_field_corrupted_shorter_is_caught(fuzz_base, shared_data, tmp_path):
    folder, base, idx, spans = fuzz_base  # key 5 = b"plain" at 0 (5 bytes + 3 zero pad), key 2 at 16
    with pytest.raises(RecordIOError, match=r"x\.rec, byte offset 0, key 5: the record ends at byte 12 .*no record "
                       r"part starts there.*length field is probably corrupt"):
        _corrupt(folder, {4: struct.pack("<I", 4)}).read(5)
    with pytest.raises(RecordIOError, match=r"key 5: the 3 padding bytes after the part's 1 data bytes are b'lai'"):
        _corrupt(folder, {4: struct.pack("<I", 1)}).read(5)
    # a real MXNet-written file: shorten one JPEG record's length by 1, 4 and 100 bytes
    rec, idx_path = shared_data / "recordio-im2rec-faces" / "validation.rec", shared_data / "recordio-im2rec-faces" / "validation.idx"
    reader = RecordIOReader(rec, idx_path)
    key = int(reader.keys[len(reader) // 2])
    offset = reader.offset(key)
    data = rec.read_bytes()
    (magic, lrec), good = struct.unpack_from("<II", data, offset), reader.read(key)
    assert lrec >> 29 == 0 and len(good) == lrec  # one whole part
    for shorter in (1, 4, 100):
        bad = bytearray(data)
        struct.pack_into("<I", bad, offset + 4, lrec - shorter)
        (tmp_path / "v.rec").write_bytes(bytes(bad))
        with pytest.raises(RecordIOError, match=rf"v\.rec, byte offset {offset}, key {key}: .*length field is "
                           r"probably corrupt \(too short\)"):
            RecordIOReader(tmp_path / "v.rec", idx_path).read(key)


# ---- writer atomicity -----------------------------------------------------------------------------------
def test_writer_publishes_only_on_close(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        writer.write(1, b"x")
        assert not (tmp_path / "a.rec").exists() and not (tmp_path / "a.idx").exists()
    assert RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx").read(1) == b"x"
    with pytest.raises(RuntimeError), RecordIOWriter(tmp_path / "b.rec", tmp_path / "b.idx") as writer:
        writer.write(1, b"x")
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="key 3 was written more than once"), \
            RecordIOWriter(tmp_path / "c.rec", tmp_path / "c.idx") as writer:
        writer.write(3, b"x")
        writer.write(3, b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "a.rec"]


def test_writer_crash_leaves_no_file_under_the_final_name(tmp_path):
    code = ("import importlib.util, os, sys\n"  # load recordio.py alone: no torch import, fast
            "spec = importlib.util.spec_from_file_location('recordio', sys.argv[2])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "w = m.RecordIOWriter(sys.argv[1] + '.rec', sys.argv[1] + '.idx')\n"
            "w.write(0, b'abc' * 1000); w._rec.flush(); os._exit(3)\n")
    module = REPO_ROOT / "mhe_scale" / "data" / "recordio.py"
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d"), str(module)])
    assert result.returncode == 3
    names = [p.name for p in tmp_path.iterdir()]
    assert names and all(n.endswith(".tmp") for n in names)


# ---- synthetic data and pickling ----------------------------------------------------------------------
def test_synthetic_face_dataset_is_deterministic():
    ds = SyntheticFaceDataset(50, 7, image_size=16, seed=3)
    a, la = ds[4]
    b, lb = SyntheticFaceDataset(50, 7, image_size=16, seed=3)[4]
    assert torch.equal(a, b) and la == lb and a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert not torch.equal(a, ds[5][0]) and not torch.equal(a, SyntheticFaceDataset(50, 7, 16, seed=4)[4][0])
    assert [ds[i][1] for i in range(50)] == ds.labels.tolist()
    assert set(ds.labels.tolist()) == set(range(7))
    with pytest.raises(IndexError):
        ds[50]


def test_dataset_pickles_for_worker_processes(image_folder, tmp_path):
    root, _ = image_folder
    packed = pack_image_folder(root, tmp_path / "p", header=True, progress=False)
    ds = RecordIOFaceDataset(packed.rec_path, packed.idx_path)
    first = ds[0]
    ds[1]  # opens the file descriptor
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0][0], first[0]) and clone[0][1] == first[1]
    err = pickle.loads(pickle.dumps(RecordIOError("f.rec", "bad", 8, 3)))
    assert str(err) == "f.rec, byte offset 8, key 3: bad"


# ---- issue 22: the pack tool's output folder, start-up checks -------------------------------------------
def test_pack_cli_creates_the_output_folder_and_refuses_in_one_line(image_folder, tmp_path, capsys):
    root, expected = image_folder
    tool = load_tool("pack_recordio")
    out = tmp_path / "new" / "deeper" / "faces"
    assert tool.main([str(root), str(out), "--no-progress"]) == 0
    assert f"created output folder {out.parent}" in capsys.readouterr().out
    assert len(RecordIOFaceDataset(out.with_suffix(".rec"), out.with_suffix(".idx"))) == len(expected)
    (tmp_path / "afile").write_text("x")
    assert tool.main([str(root), str(tmp_path / "afile" / "faces"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output folder {tmp_path / 'afile'} is a file" in err
    (root / "bob" / "0.png").write_bytes(b"")  # found before packing starts, with the count
    (root / "alice" / "1.jpg").write_bytes(b"")
    assert tool.main([str(root), str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alice/1.jpg is empty (0 bytes); 2 of 6 images are missing or empty" in err
    assert not (tmp_path / "o2.rec").exists()


def test_face_dataset_refuses_a_truncated_rec_at_start(image_folder, tmp_path):
    root, _ = image_folder
    packed = pack_image_folder(root, tmp_path / "out", header=True, progress=False)
    data = packed.rec_path.read_bytes()
    last = max(int(line.split("\t")[1]) for line in packed.idx_path.read_text().splitlines())
    packed.rec_path.write_bytes(data[:last + 10])  # the last (identity) record cut after its part header
    with pytest.raises(RecordIOError, match=r"out\.rec, byte offset \d+, key 9: .*the last record indexed by"):
        RecordIOFaceDataset(packed.rec_path, packed.idx_path)
    reader = RecordIOReader(packed.rec_path, packed.idx_path)  # the reader alone still opens (reads fail per record)
    assert reader.read(1)
