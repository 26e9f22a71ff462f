"""Image classification batches through NVIDIA DALI: the same presets as image_dataset.py.

`DALIImageLoader(records, batch_size, preset=..., train=...)` yields (images float32 [B, 3, S, S],
labels int64 [B]). Reader: `fn.readers.file` over the files of a `FileImageRecords` (folder or list
file), `fn.readers.mxnet` over a `RecordIOImageRecords` (.rec/.idx: ImageNet im2rec files and the
archive cache). Decoding: "cpu" with device_id=None, "mixed" (nvJPEG) on GPU `device_id`.
Augmentation per preset (image_dataset.transform_preset):
- "none": decode -> normalise; `flip` 0.0 / 1.0 forces mirroring off / on, else a coin flip.
- "cifar": train = pad 4 with zeros + random 32 crop + flip, eval = normalise (images must be S x S).
- "imagenet": train = `fn.decoders.image_random_crop` (area (0.08, 1), ratio (3/4, 4/3), 10
  attempts) + resize S x S + flip; eval = resize shorter side S*256/224 + centre crop S.
Where the operations coincide (decode + normalise + forced flip) the output equals the PIL path
(tests/test_image_data.py), and the cifar pad-crop yields exactly PIL's 9 x 9 windows; random
choices come from DALI's RNG, not the per-sample numpy streams, and DALI's resampling (imagenet
presets) differs from PIL's, so those outputs agree in distribution only.
Order: file list order / .rec file order when shuffle=False; shuffle uses DALI's buffered shuffle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor

from mhe_scale.data.image_dataset import PRESET_DEFAULTS
from mhe_scale.data.image_folder import FileImageRecords, ImageRecords, RecordIOImageRecords

DALI_PRESETS = ("none", "cifar", "imagenet")


def dali_available() -> bool:
    """True when nvidia.dali and its PyTorch plugin import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _mirror(flip: float):
    from nvidia.dali import fn

    if flip <= 0.0:
        return 0
    if flip >= 1.0:
        return 1
    return fn.random.coin_flip(probability=flip)


def _graph(encoded, preset: str, train: bool, size: int, flip: float, decoder: str,
           mean: Sequence[float], std: Sequence[float]):
    """DALI nodes: encoded bytes -> float32 CHW normalised images (mean/std in [0, 1] units)."""
    from nvidia.dali import fn, types

    cmn = dict(dtype=types.FLOAT, output_layout="CHW", mean=[255.0 * m for m in mean],
               std=[255.0 * s for s in std], mirror=_mirror(flip))
    if preset == "imagenet" and train:
        images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                               num_attempts=10)
        images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
        return fn.crop_mirror_normalize(images, **cmn)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    if preset == "imagenet":
        images = fn.resize(images, resize_shorter=round(size * 256 / 224), antialias=True)
        return fn.crop_mirror_normalize(images, crop=(size, size), **cmn)
    if preset == "cifar" and train:
        pad = 4
        images = fn.crop(images, crop=(size + 2 * pad, size + 2 * pad), out_of_bounds_policy="pad", fill_values=0)
        offsets = [i / (2 * pad) for i in range(2 * pad + 1)]  # the 9 integer offsets, uniformly, as PIL's
        return fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=fn.random.uniform(values=offsets),
                                        crop_pos_y=fn.random.uniform(values=offsets), **cmn)
    return fn.crop_mirror_normalize(images, **cmn)


class DALIImageLoader:
    """One shard's (images float32 [B, 3, S, S], labels int64 [B]) batches of `records` via DALI.

    Args:
        records: FileImageRecords (fn.readers.file) or RecordIOImageRecords (fn.readers.mxnet).
        batch_size: B. preset: "none", "cifar" or "imagenet" (module docstring). train: train or
            eval augmentation. size: output side S (default 32 cifar, 224 imagenet).
        flip: mirroring probability in training (eval and preset "none" use it as given too;
            0.0 / 1.0 are exact). mean, std: per-channel RGB in [0, 1] units (default: the preset's).
        device_id: None = CPU pipeline; an int = "mixed" decoding and outputs on that GPU.
        shuffle, seed, num_threads, shard_id, num_shards, drop_last: DALI reader / iterator options.
    Iterating runs one epoch; batches are copies owned by torch.
    """

    def __init__(self, records: ImageRecords, batch_size: int, *, preset: str = "cifar", train: bool = True,
                 size: int | None = None, flip: float = 0.5, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, device_id: int | None = None, shuffle: bool = False,
                 seed: int = 0, num_threads: int = 2, shard_id: int = 0, num_shards: int = 1,
                 drop_last: bool = False, shuffle_buffer: int = 4096) -> None:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if preset not in DALI_PRESETS:
            raise ValueError(f"unknown DALI preset {preset!r}; choose one of {DALI_PRESETS}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
        family_size, family_mean, family_std = PRESET_DEFAULTS["imagenet" if preset == "imagenet" else "cifar"]
        size = size or family_size
        mean, std = mean or family_mean, std or family_std
        flip = flip if (train or preset == "none") else 0.0
        decoder = "cpu" if device_id is None else "mixed"
        reader_args = dict(random_shuffle=shuffle, shard_id=shard_id, num_shards=num_shards, name="reader",
                           initial_fill=shuffle_buffer)
        if isinstance(records, FileImageRecords):
            files = [records.path(i) for i in range(len(records))]
            labels = records.labels.tolist()

            def read():
                return fn.readers.file(files=files, labels=labels, **reader_args)
        elif isinstance(records, RecordIOImageRecords):
            rec, idx = str(records.rec_path), str(records.idx_path)

            def read():
                encoded, labels = fn.readers.mxnet(path=[rec], index_path=[idx], **reader_args)
                return encoded, labels[0]  # first value of the IRHeader label(s)
        else:
            raise TypeError(f"DALIImageLoader reads FileImageRecords or RecordIOImageRecords, got "
                            f"{type(records).__name__}")

        @pipeline_def
        def pipeline():
            encoded, labels = read()
            images = _graph(encoded, preset, train, size, flip, decoder, mean, std)
            return images, fn.cast(labels, dtype=types.INT64)

        self._pipe = pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
        self._pipe.build()
        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        self._iterator = DALIGenericIterator(self._pipe, ["images", "labels"], reader_name="reader",
                                             last_batch_policy=policy, auto_reset=True)

    def __len__(self) -> int:
        return len(self._iterator)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for (batch,) in self._iterator:
            yield batch["images"], batch["labels"].reshape(-1)
