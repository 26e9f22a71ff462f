"""Face training images: NVIDIA DALI pipelines and their PyTorch twin, one augmentation for both.

Every path yields (images float32 [B, 3, S, S] CHW RGB in [-1, 1], labels int64 [B]):
decode -> (resize to S x S when a size is given) -> random horizontal flip (p = 0.5)
-> (x - 127.5) / 127.5, the normalisation of eval/verification.py.

- `DALIFaceLoader`: `fn.readers.mxnet` (sharded by rank, shuffled in a buffer) -> `fn.decoders.image`
  ("mixed" on a GPU, "cpu" with device_id=None) -> `fn.random.coin_flip` + `fn.crop_mirror_normalize`,
  wrapped in a `DALIGenericIterator`; labels are the first value of each record's IRHeader. For
  custom loops (and the engine, once it accepts a loader). DALI visits records in file (byte
  offset) order, whatever the .idx line order.
- `DALIRecordDataset`: map-style; `__getitems__` reads the batch's records and decodes them in one
  DALI run (`fn.external_source`). This is what `engine.fit` can use: its batch sampler fixes the
  sample order, so resume and sharding stay exact. Flips come from torch's global RNG.
- `FaceTransform` on `RecordIOFaceDataset` / `SyntheticFaceDataset`: the PyTorch path, used when
  DALI is disabled or not importable. Without resizing or flipping, DALI's CPU decoder and PIL give
  identical pixels (tests/test_face_pipeline.py).

Insightface layout (header record 0, identity records after the images): DALI's mxnet reader
returns EVERY record, the header and identity records as empty "images" with label arrays, so
`image_record_index` writes a filtered .idx naming only the image records (cached under
`index_dir`, keyed by the files' paths, sizes and mtimes). DALI ends a record where its own length
says, so dropping the records that follow the last image is safe. im2rec files are read as they are.

DALI's own errors name neither file nor record ("nvImageCodec failure '#3'", a failed
"IsDenseTensor()" assert for images of different sizes): `dali_error` re-raises them naming the .rec
file and the record, found by checking the batch's (DALIRecordDataset) or the file's first
PROBE_LIMIT records (DALIFaceLoader, which does not know its batch's keys) with PIL.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mhe_scale.data.face_dataset import RecordIOFaceDataset, decode_image
from mhe_scale.data.recordio import RecordIOError, open_temp_beside

PIXEL_MEAN = PIXEL_STD = 127.5
PROBE_LIMIT = 50_000  # records checked with PIL to name the one a DALI loader choked on


def dali_available() -> bool:
    """True when nvidia.dali (and its PyTorch plugin) can be imported."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class FaceTransform:
    """uint8 [3, H, W] -> float32 [3, S, S] in [-1, 1], flipped left-right with probability 0.5.

    Args:
        flip: random horizontal flip (torch's global RNG, so a resumed run replays the flips).
        size: output side S; None keeps the input size (other sizes: bilinear, antialiased).
    """

    def __init__(self, flip: bool = True, size: int | None = None) -> None:
        self.flip, self.size = flip, size

    def __call__(self, image: Tensor) -> Tensor:
        x = image.float()
        if self.size is not None and tuple(x.shape[1:]) != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(2)
        return (x - PIXEL_MEAN) / PIXEL_STD


def image_record_index(dataset: RecordIOFaceDataset, index_dir: str | os.PathLike | None = None) -> Path:
    """The .idx DALI should read: the dataset's own for im2rec files, else a cached copy holding
    only the image records' lines (see the module docstring)."""
    reader = dataset.reader
    if reader.idx_path is None:
        raise ValueError(f"DALI needs the .idx of {reader.rec_path}; pass idx_path (tools/pack_recordio.py writes it)")
    if dataset.layout == "im2rec":
        return reader.idx_path
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in (reader.rec_path, reader.idx_path))
    folder = Path(index_dir) if index_dir is not None else Path(tempfile.gettempdir()) / "mhe_scale_dali"
    out = folder / f"{reader.rec_path.stem}-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}.images.idx"
    if out.is_file():
        return out
    table = np.loadtxt(reader.idx_path, dtype=np.int64, ndmin=2, comments=None, encoding="latin-1")
    keep = table[np.isin(table[:, 0], dataset.keys)]
    folder.mkdir(parents=True, exist_ok=True)
    handle, tmp = open_temp_beside(out, "w")
    try:
        with handle:
            handle.write("".join(f"{k}\t{o}\n" for k, o in keep.tolist()))
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _resize_target(records: RecordIOFaceDataset, size: int | None) -> int | None:
    """The side DALI resizes every image to: `size` when set (a no-op on images already S x S, and
    what lets files of mixed sizes through), else None."""
    return None if size is None or len(records) == 0 else size


def _dali_summary(err: BaseException) -> str:
    """The line of a DALI error that says what failed (the text after 'encountered:')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    after = [i + 1 for i, line in enumerate(lines) if line.startswith("encountered")]
    return lines[after[0]] if after and after[0] < len(lines) else (lines[0] if lines else type(err).__name__)


def _probe_keys(records: RecordIOFaceDataset, keys: np.ndarray | None) -> np.ndarray:
    return records.keys[:PROBE_LIMIT] if keys is None else keys


def dali_error(records: RecordIOFaceDataset, err: RuntimeError, keys: np.ndarray | None = None) -> Exception:
    """A DALI run error (it names no file and no record) -> an error naming the .rec file and, where
    PIL finds it among `keys` (default: the first PROBE_LIMIT records), the record; else `err`."""
    rec, text = records.reader.rec_path, str(err)
    if "IsDenseTensor" in text:  # the batch could not be stacked: images of different sizes
        first = None
        for key in _probe_keys(records, keys).tolist():
            try:
                with Image.open(io.BytesIO(records.reader.read_image(key)[1])) as img:
                    hw = (img.height, img.width)  # header only, no decoding
            except Exception:  # PIL's errors on unreadable bytes vary; the size is what is sought here
                continue
            if first is None:
                first = (key, hw)
            elif hw != first[1]:
                return ValueError(f"{rec}: images of different sizes: key {first[0]} is {first[1][0]}x{first[1][1]} "
                                  f"but key {key} is {hw[0]}x{hw[1]} (H x W); DALI stacks a batch only at one size: "
                                  f"pass size=S (the face config's data.image_size) to resize every image to S x S, "
                                  f"or repack the file at one size")
        return ValueError(f"{rec}: DALI got images of different sizes in one batch ({_dali_summary(err)}); pass "
                          f"size=S to resize every image to S x S, or repack the file at one size")
    if "decoders.image" in text or "nvImageCodec" in text:
        probe = _probe_keys(records, keys)
        for key in probe.tolist():
            try:
                decode_image(records.reader.read_image(key)[1])
            except RecordIOError as bad:
                return RecordIOError(rec, f"DALI cannot decode this record's image ({_dali_summary(err)}; PIL: "
                                     f"{bad.problem}); repack the file without it", records.reader.offset(key), key)
        return RecordIOError(rec, f"DALI cannot decode an image ({_dali_summary(err)}); PIL decodes all "
                             f"{len(probe)} records checked ({'the batch' if keys is not None else 'the first ones'}), "
                             f"so the bad one is elsewhere or only DALI rejects it: check the file with "
                             f"RecordIOFaceDataset (PIL), which names the record")
    return err


def _augment(encoded, mirror, decoder_device: str, resize_to: int | None):
    """DALI graph shared by both pipelines: decode -> resize -> flip + normalise to CHW float."""
    from nvidia.dali import fn, types

    images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
    if resize_to is not None:
        images = fn.resize(images, resize_x=resize_to, resize_y=resize_to, antialias=True)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[PIXEL_MEAN] * 3,
                                    std=[PIXEL_STD] * 3, mirror=mirror)


class DALIFaceLoader:
    """One shard's batches of a RecordIO face file through `fn.readers.mxnet` (module docstring).

    Iterating runs one epoch (the last partial batch dropped when drop_last). Args:
        rec_path, idx_path: the files; layout: as RecordIOFaceDataset ("auto" detects it).
        batch_size: B per shard. shard_id, num_shards: this process's rank and the world size.
        shuffle: shuffle inside a buffer of `shuffle_buffer` records (DALI's random_shuffle).
        flip: random horizontal flips. size: output side S: every image is resized to S x S (a no-op
            on images already that size); None keeps the stored size, which must then be one size.
        device_id: CUDA device for "mixed" decoding and GPU outputs; None: CPU pipeline.
        num_threads: DALI worker threads. seed: DALI's seed. index_dir: where a filtered .idx goes.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike, batch_size: int, *,
                 shard_id: int = 0, num_shards: int = 1, shuffle: bool = True, flip: bool = True,
                 size: int | None = None, device_id: int | None = None, num_threads: int = 2, seed: int = 0,
                 shuffle_buffer: int = 16384, drop_last: bool = True, layout: str = "auto",
                 index_dir: str | os.PathLike | None = None) -> None:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
        records = RecordIOFaceDataset(rec_path, idx_path, layout=layout)
        self.num_classes = records.num_classes
        index = image_record_index(records, index_dir)
        resize_to = _resize_target(records, size)

        @pipeline_def
        def reader_pipeline():
            encoded, labels = fn.readers.mxnet(path=[str(rec_path)], index_path=[str(index)], random_shuffle=shuffle,
                                               initial_fill=shuffle_buffer, shard_id=shard_id, num_shards=num_shards,
                                               name="reader")
            mirror = fn.random.coin_flip(probability=0.5) if flip else 0
            images = _augment(encoded, mirror, "cpu" if device_id is None else "mixed", resize_to)
            return images, fn.cast(labels[0], dtype=types.INT64)  # first value of the header's label(s)

        pipe = reader_pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
        pipe.build()
        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        self._records = records
        try:  # the iterator runs the first batches now
            self._iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name="reader",
                                                 last_batch_policy=policy, auto_reset=True)
        except RuntimeError as err:
            raise dali_error(records, err) from None

    def __len__(self) -> int:
        return len(self._iterator)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = iter(self._iterator)
        while True:
            try:
                (batch,) = next(batches)
            except StopIteration:
                return
            except RuntimeError as err:
                raise dali_error(self._records, err) from None
            yield batch["images"], batch["labels"]


class DALIRecordDataset(Dataset):
    """RecordIOFaceDataset whose batches DALI decodes: give it index batches (a batch sampler).

    Items are (image float32 [3, S, S] in [-1, 1], label int). One `__getitems__` call reads the
    records, draws the flips (torch global RNG) and runs the DALI graph once; `__getitem__` is a
    batch of one. The DALI pipeline is built on first use, in the process that uses it.
    Args: as DALIFaceLoader; max_batch_size bounds the index batches it is given.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None, *,
                 max_batch_size: int = 256, flip: bool = True, size: int | None = None,
                 device_id: int | None = None, num_threads: int = 2, layout: str = "auto") -> None:
        self.records = RecordIOFaceDataset(rec_path, idx_path, layout=layout)
        self.labels, self.num_classes = self.records.labels, self.records.num_classes
        self.max_batch_size, self.flip, self.resize_to = max_batch_size, flip, _resize_target(self.records, size)
        self.device_id, self.num_threads = device_id, num_threads
        self._pipe = None

    def __len__(self) -> int:
        return len(self.records)

    def _pipeline(self):
        if self._pipe is None:
            from nvidia.dali import fn, pipeline_def, types

            @pipeline_def
            def decode_pipeline():
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
                mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
                return _augment(encoded, mirror, "cpu" if self.device_id is None else "mixed", self.resize_to)

            self._pipe = decode_pipeline(batch_size=self.max_batch_size, num_threads=self.num_threads,
                                         device_id=self.device_id, prefetch_queue_depth=1)
            self._pipe.build()
        return self._pipe

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if not 0 < len(indices) <= self.max_batch_size:
            raise ValueError(f"DALIRecordDataset got a batch of {len(indices)} indices; max_batch_size is "
                             f"{self.max_batch_size} (raise it to the loader's batch size)")
        keys = self.records.keys[np.asarray(indices)]
        encoded = [np.frombuffer(self.records.reader.read_image(int(k))[1], dtype=np.uint8) for k in keys]
        flips = (torch.rand(len(keys)) < 0.5) if self.flip else torch.zeros(len(keys), dtype=torch.bool)
        pipe = self._pipeline()
        pipe.feed_input("encoded", encoded)
        pipe.feed_input("mirror", flips.numpy().astype(np.int32))  # outer dimension = the batch
        try:
            (out,) = pipe.run()
            dense = out.as_tensor()
        except RuntimeError as err:
            self._pipe = None  # a failed DALI pipeline is no longer valid
            raise dali_error(self.records, err, keys) from None
        device = "cpu" if self.device_id is None else f"cuda:{self.device_id}"
        images = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        stream = torch.cuda.current_stream(device) if self.device_id is not None else None
        feed_ndarray(dense, images, cuda_stream=stream)  # copies: DALI reuses its buffers next run
        labels = self.labels[np.asarray(indices)].tolist()
        return list(zip(images.unbind(0), labels))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.__getitems__([index])[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pipe": None}  # pipelines do not pickle; each worker builds its own


def build_face_loader(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None, batch_size: int, *,
                      dali: bool = True, shard_id: int = 0, num_shards: int = 1, shuffle: bool = True,
                      flip: bool = True, size: int | None = None, device_id: int | None = None,
                      num_workers: int = 2, seed: int = 0, drop_last: bool = True,
                      index_dir: str | os.PathLike | None = None) -> DALIFaceLoader | DataLoader:
    """(images, labels) batches of one shard: DALIFaceLoader when `dali` and DALI imports, else a
    DataLoader over RecordIOFaceDataset + FaceTransform (DistributedSampler for the shard; pinned
    memory when device_id is set; call loader.sampler.set_epoch(e) per epoch to reshuffle).
    num_workers: DALI threads or DataLoader worker processes."""
    if dali and idx_path is not None and dali_available():
        return DALIFaceLoader(rec_path, idx_path, batch_size, shard_id=shard_id, num_shards=num_shards,
                              shuffle=shuffle, flip=flip, size=size, device_id=device_id,
                              num_threads=max(1, num_workers), seed=seed, drop_last=drop_last, index_dir=index_dir)
    if dali:
        why = "no .idx was given" if idx_path is None else "nvidia.dali cannot be imported"
        warnings.warn(f"DALI requested for {rec_path} but {why}; reading with the PyTorch path instead", stacklevel=2)
    dataset = RecordIOFaceDataset(rec_path, idx_path, transform=FaceTransform(flip, size))
    sampler = DistributedSampler(dataset, num_replicas=num_shards, rank=shard_id, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=device_id is not None, persistent_workers=num_workers > 0)
