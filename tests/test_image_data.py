"""Image classification data: readers (folder, list file, RecordIO, archive cache), transforms,
per-sample reproducible augmentation across DataLoader workers, and DALI == PIL where they coincide."""

import io
import json
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import load_tool

from mhe_scale.data.dali_image import dali_available
from mhe_scale.data.decoded_cache import decode_in_memory
from mhe_scale.data.image_archive import archive_records, build_archive_cache
from mhe_scale.data.image_dataset import ImageClassificationDataset, transform_preset
from mhe_scale.data.image_folder import RecordIOImageRecords, folder_records, list_file_records
from mhe_scale.data.image_source import ImageDataConfig, image_records
from mhe_scale.data.image_transforms import (Compose, Normalize, RandomCropPad, RandomHorizontalFlip,
                                             RandomResizedCrop, ToTensor, UndecodableImageError)
from mhe_scale.data.recordio import IRHeader, RecordIOError, RecordIOWriter, pack_image_record

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali cannot be imported")
CLASSES = ["dog", "cat", "bird"]  # deliberately unsorted: labels must follow sorted names


def jpeg(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """ROOT/<class>/<i>.jpg: 3 classes x (2, 3, 4) images, plus a non-image file to ignore."""
    root = tmp_path / "images"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(2 + c):
            (root / name / f"{i}.jpg").write_bytes(jpeg(10 * c + i))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_reader_sorts_classes(image_root):
    records = folder_records(image_root)
    assert records.classes == ["bird", "cat", "dog"]
    assert records.labels.tolist() == [0] * 4 + [1] * 3 + [2] * 2
    assert records.path(0) == str(image_root / "bird" / "0.jpg")
    assert records.read(8) == (image_root / "dog" / "1.jpg").read_bytes()


def test_list_file_reader_and_its_errors(image_root, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("cat/1.jpg 7\n\nbird/0.jpg 3\n")
    records = list_file_records(listing, image_root)
    assert records.labels.tolist() == [7, 3] and records.num_classes == 8
    assert records.read(1) == (image_root / "bird" / "0.jpg").read_bytes()
    listing.write_text("cat/1.jpg 7\nbird/0.jpg three\n")
    with pytest.raises(ValueError, match=f"{listing}:2: expected 'relative/path label'"):
        list_file_records(listing, image_root)
    listing.write_text("cat/1.jpg 7\ncat/9.jpg 1\n")
    with pytest.raises(FileNotFoundError, match=f"{listing}:2: image .*cat/9.jpg does not exist"):
        list_file_records(listing, image_root)
    records = list_file_records(listing, image_root, check_exists=False)  # fails at read, naming both
    with pytest.raises(FileNotFoundError, match=f"cat/9.jpg \\(listed at {listing}:2\\)"):
        records.read(1)


def test_undecodable_image_error_names_the_file(image_root):
    (image_root / "cat" / "0.jpg").write_bytes(b"not a jpeg")
    dataset = ImageClassificationDataset(folder_records(image_root))
    with pytest.raises(UndecodableImageError, match="cat/0.jpg: 10 image bytes do not decode"):
        dataset[4]


def test_recordio_imagenet_style_float_labels(tmp_path):
    rec, idx = tmp_path / "val.rec", tmp_path / "val.idx"
    labels = [998.0, 0.0, 3.0]
    with RecordIOWriter(rec, idx) as writer:
        for key, label in enumerate(labels):  # im2rec: one float label in the header, flag 0
            writer.write(key, pack_image_record(IRHeader(0, label, key, 0), jpeg(key, (20, 30))))
    records = RecordIOImageRecords(rec, idx)
    assert records.labels.dtype == np.int64 and records.labels.tolist() == [998, 0, 3]
    assert records.read(2) == jpeg(2, (20, 30))
    image, label = ImageClassificationDataset(records)[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32 and label == 998
    with RecordIOWriter(rec, idx) as writer:
        writer.write(0, pack_image_record(IRHeader(0, 1.0, 0, 0), b"garbage"))
    with pytest.raises(UndecodableImageError, match=f"{rec}, record key 0"):
        ImageClassificationDataset(RecordIOImageRecords(rec, idx))[0]


def make_archive(path: Path, top: str = "") -> dict[str, bytes]:
    """A tar.gz of <split>/<class>/<file>.jpg with classes written in UNsorted order."""
    members = {}
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", 3), ("test", 1)):
            for c, name in enumerate(CLASSES):
                for i in range(count):
                    data = jpeg(100 * c + 10 * i + len(split))
                    info = tarfile.TarInfo(f"{top}{split}/{name}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    members[f"{split}/{name}/{i:04d}.jpg"] = data
        readme = tarfile.TarInfo(f"{top}README")
        readme.size = 2
        tar.addfile(readme, io.BytesIO(b"hi"))
    return members


def test_archive_cache_converts_once_and_rebuilds_when_changed(tmp_path):
    archive, cache = tmp_path / "tiny.tar.gz", tmp_path / "cache"
    members = make_archive(archive)
    train = archive_records(archive, cache, "train", progress=False)
    assert train.classes == ["bird", "cat", "dog"]
    assert train.labels.tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0]  # archive order, relabelled sorted
    assert train.read(3) == members["train/cat/0000.jpg"]
    test = archive_records(archive, cache, "test", progress=False)
    assert test.labels.tolist() == [2, 1, 0] and test.read(2) == members["test/bird/0000.jpg"]
    folder = cache / "tiny"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"] == {"test": 3, "train": 9} and manifest["size"] == archive.stat().st_size
    assert sorted(p.name for p in cache.iterdir()) == ["tiny"]  # no temporary folders left
    stamp = (folder / "train.rec").stat().st_mtime_ns
    assert build_archive_cache(archive, cache, progress=False) == folder
    assert (folder / "train.rec").stat().st_mtime_ns == stamp  # reused, not rebuilt
    make_archive(archive, top="")  # same content, new mtime -> rebuilt
    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))
    build_archive_cache(archive, cache, progress=False)
    assert (folder / "train.rec").stat().st_mtime_ns != stamp
    small = archive_records(archive, cache, "train", limit_per_class=2, progress=False)
    assert small.labels.tolist() == [2, 2, 1, 1, 0, 0]
    with pytest.raises(KeyError, match="no split 'val'"):
        archive_records(archive, cache, "val", progress=False)


def test_archive_cache_member_layout_error(tmp_path):
    archive = tmp_path / "nested.tar.gz"
    make_archive(archive, top="cifar/")
    with pytest.raises(ValueError, match="member 'cifar/train/dog/0000.jpg' is not <split>/<class>/<file>"):
        build_archive_cache(archive, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # the failed build left nothing behind
    records = archive_records(archive, tmp_path / "cache", "train", strip_components=1, progress=False)
    assert len(records) == 9


def test_real_cifar10_archive_cache(shared_data, tmp_path):
    archive = shared_data / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not present")
    train = archive_records(archive, tmp_path, "train", limit_per_class=5, progress=False)
    test = archive_records(archive, tmp_path, "test", limit_per_class=5, progress=False)
    assert train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck"]
    assert train.labels.tolist() == np.repeat(np.arange(10), 5).tolist() and len(test) == 50
    with tarfile.open(archive) as tar:  # record 7 = the 3rd image of automobile
        assert train.read(7) == tar.extractfile("train/automobile/0002.jpg").read()
    image, label = ImageClassificationDataset(train, transform_preset("cifar", True))[7]
    assert image.shape == (3, 32, 32) and label == 1


def test_random_crop_pad_known_answer_and_zero_padding():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    crops = {RandomCropPad(4, 2)(image, np.random.default_rng(s)).tobytes() for s in range(200)}
    assert len(crops) == 25  # every one of the 5 x 5 window positions appears
    padded = np.zeros((8, 8, 3), dtype=np.uint8)
    padded[2:6, 2:6] = image
    windows = {padded[t:t + 4, l:l + 4].tobytes() for t in range(5) for l in range(5)}
    assert crops == windows


def test_random_resized_crop_area_and_ratio_within_bounds():
    rrc = RandomResizedCrop(8)
    for seed in range(300):
        height, width = [(100, 100), (60, 200), (200, 50)][seed % 3]
        top, left, h, w = rrc.get_box(height, width, np.random.default_rng(seed))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert 0.08 - 0.02 <= h * w / (height * width) <= 1.0  # rounding of w, h
        assert 3 / 4 * (1 - 0.05) <= w / h <= 4 / 3 * (1 + 0.05)
    # a 1000 x 10 strip: no attempt fits, the fallback is the centred crop of ratio 3/4
    assert rrc.get_box(1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)
    out = rrc(np.zeros((40, 30, 3), dtype=np.uint8), np.random.default_rng(0))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8


def test_to_tensor_normalise_known_answer():
    image = np.zeros((1, 2, 3), dtype=np.uint8)
    image[0, 1] = (255, 51, 0)
    out = Compose([ToTensor(), Normalize((0.5, 0.2, 0.0), (0.5, 0.1, 2.0))])(image, np.random.default_rng(0))
    expected = torch.tensor([[[-1.0, 1.0]], [[-2.0, 0.0]], [[0.0, 0.0]]])
    assert out.shape == (3, 1, 2) and torch.allclose(out, expected, atol=1e-6)


def loader_images(dataset, workers: int, batch_sampler=None) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=None if batch_sampler else 4, batch_sampler=batch_sampler,
                        num_workers=workers, shuffle=False)
    return torch.cat([x for x, _ in loader])


def test_augmentation_depends_on_seed_epoch_index_only(image_root):
    dataset = ImageClassificationDataset(folder_records(image_root), transform_preset("cifar", True), seed=5)
    first = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert first.shape == (9, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, torch.stack([dataset[i][0] for i in reversed(range(9))]).flip(0))
    assert torch.equal(first, loader_images(dataset, 2))  # worker processes draw the same crops
    dataset.set_epoch(1)
    second = loader_images(dataset, 0)
    assert not torch.equal(first, second)
    assert torch.equal(second, torch.stack([dataset[(1, i)][0] for i in range(9)]))
    assert torch.equal(first, torch.stack([dataset[(0, i)][0] for i in range(9)]))
    other_seed = ImageClassificationDataset(dataset.records, dataset.transform, seed=6)
    assert not torch.equal(first, torch.stack([other_seed[(0, i)][0] for i in range(9)]))


def test_set_epoch_reaches_persistent_workers(image_root):
    dataset = ImageClassificationDataset(folder_records(image_root), transform_preset("cifar", True), seed=1)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        epochs.append(torch.cat([x for x, _ in loader]))
    for epoch in range(2):
        assert torch.equal(epochs[epoch], torch.stack([dataset[(epoch, i)][0] for i in range(9)]))


def test_imagenet_presets_shapes(image_root):
    (image_root / "cat" / "big.jpg").write_bytes(jpeg(0, (300, 400)))
    records = folder_records(image_root)
    for train in (True, False):
        image, _ = ImageClassificationDataset(records, transform_preset("imagenet", train))[4]
        assert image.shape == (3, 224, 224)
    with pytest.raises(ValueError, match="unknown transform preset 'mnist'"):
        transform_preset("mnist", True)


@needs_dali
@pytest.mark.parametrize("source", ["folder", "recordio"])
def test_dali_cpu_equals_pil_where_operations_coincide(image_root, tmp_path, source):
    from mhe_scale.data.dali_image import DALIImageLoader

    records = folder_records(image_root)
    if source == "recordio":
        rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
        with RecordIOWriter(rec, idx) as writer:
            for i in range(len(records)):
                writer.write(i, pack_image_record(IRHeader(0, float(records.labels[i]), i, 0), records.read(i)))
        records = RecordIOImageRecords(rec, idx)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    for flip in (0.0, 1.0):
        pil = ImageClassificationDataset(records, Compose([RandomHorizontalFlip(flip), ToTensor(),
                                                           Normalize(mean, std)]))
        expected = torch.stack([pil[i][0] for i in range(len(pil))])
        batches = list(DALIImageLoader(records, 4, preset="none", flip=flip, mean=mean, std=std))
        images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        assert labels.dtype == torch.int64 and labels.tolist() == records.labels.tolist()
        pixel_error = ((images - expected) * torch.tensor(std).view(3, 1, 1) * 255).abs().max().item()
        assert pixel_error < 1e-3  # identical decoded pixels; only float rounding of the normalisation


@needs_dali
def test_dali_presets_shapes(image_root):
    from mhe_scale.data.dali_image import DALIImageLoader

    records = folder_records(image_root)
    for preset, size in (("cifar", 32), ("imagenet", 48)):
        for train in (True, False):
            images, labels = next(iter(DALIImageLoader(records, 3, preset=preset, train=train, size=size)))
            assert images.shape == (3, 3, size, size) and images.dtype == torch.float32
            assert math.isfinite(images.sum().item())


def test_bench_tool_runs_on_a_tiny_archive(tmp_path, capsys):
    make_archive(tmp_path / "cifar10-jpeg.tar.gz")
    bench = load_tool("bench_image_pipeline")
    assert bench.main([str(tmp_path), str(tmp_path / "cache"), "--images", "8", "--batch", "4", "--workers", "0",
                       "--dali-threads", "1" if dali_available() else "0"]) == 0
    out = capsys.readouterr().out
    assert "built in" in out and "| PIL, DataLoader num_workers=0 |" in out


@needs_dali
def test_dali_cifar_pad_crop_gives_exactly_the_pil_windows(image_root, tmp_path):
    from mhe_scale.data.dali_image import DALIImageLoader

    listing = tmp_path / "same.txt"
    listing.write_text("cat/0.jpg 0\n" * 1000)
    records = list_file_records(listing, image_root)
    pixels = ToTensor()(np.asarray(Image.open(image_root / "cat" / "0.jpg").convert("RGB")), None)
    padded = torch.zeros(3, 40, 40)
    padded[:, 4:36, 4:36] = pixels * 255
    windows = {padded[:, t:t + 32, l:l + 32].round().to(torch.uint8).numpy().tobytes(): (t, l)
               for t in range(9) for l in range(9)}
    offsets = []
    for images, _ in DALIImageLoader(records, 250, preset="cifar", train=True, flip=0.0, mean=(0.0,) * 3,
                                     std=(1 / 255,) * 3):  # output = raw pixel values
        offsets += [windows[x.round().to(torch.uint8).numpy().tobytes()] for x in images]  # KeyError: not a window
    assert len(set(offsets)) == 81  # every offset appears
    edge = sum(t in (0, 8) for t, _ in offsets)  # uniform over 9 rows: 2/9 * 1000 = 222 (sd 13)
    assert 170 < edge < 280


class _CountingRecords:
    """records wrapper counting read() calls (to see that the decoded cache reads each image only once)."""

    def __init__(self, records) -> None:
        self.inner, self.reads = records, 0
        self.labels, self.num_classes = records.labels, records.num_classes

    def __len__(self) -> int:
        return len(self.inner)

    def read(self, index: int) -> bytes:
        self.reads += 1
        return self.inner.read(index)

    def describe(self, index: int) -> str:
        return self.inner.describe(index)


def test_decoded_cache_gives_the_decoded_path_samples_and_reads_each_image_once(image_root):
    records = _CountingRecords(folder_records(image_root))
    for train in (True, False):
        plain = ImageClassificationDataset(folder_records(image_root), transform_preset("cifar", train), seed=3)
        cached = ImageClassificationDataset(decode_in_memory(records, 1024), transform_preset("cifar", train), seed=3)
        for epoch in (0, 1, 0):  # the cache is not altered by an epoch's crops / flips
            for i in range(len(plain)):
                (a, ya), (b, yb) = plain[(epoch, i)], cached[(epoch, i)]
                assert torch.equal(a, b) and ya == yb
    assert records.reads == 2 * len(plain)  # once per cache, when it is built
    assert torch.equal(loader_images(cached, 2), torch.stack([cached[i][0] for i in range(len(cached))]))
    with pytest.raises(ValueError, match="read-only"):  # a transform writing into the cache fails loudly
        cached.records.decoded(0)[0, 0, 0] = 1


# ---- issue 22: paths stay under their root, binary lists, start-up checks, limit_per_class note ---------
def test_list_paths_that_leave_the_root_are_refused(image_root, tmp_path):
    (tmp_path / "secret.jpg").write_bytes(jpeg(1))
    listing = tmp_path / "train.txt"
    for line, shown in ((f"../secret.jpg 0", "'../secret.jpg'"), ("cat/../../secret.jpg 1", "'cat/../../secret.jpg'")):
        listing.write_text(f"cat/1.jpg 7\n{line}\n")
        with pytest.raises(ValueError, match=f"{listing}:2: path {shown} resolves outside its root {image_root}"):
            list_file_records(listing, image_root)
        with pytest.raises(ValueError, match=f"{listing}:2: path {shown} resolves outside"):
            list_file_records(listing, image_root, check_exists=False)  # refused without touching the file
    listing.write_text("cat/../bird/0.jpg 2\n")  # `..` that stays inside is fine
    assert list_file_records(listing, image_root).path(0) == str(image_root / "bird" / "0.jpg")


def test_binary_list_file_is_one_line_naming_file_and_line(image_root, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_bytes(b"cat/1.jpg 7\nbird/\xff.jpg 3\n")
    with pytest.raises(ValueError, match=rf"{listing}:2: not UTF-8 text \(byte 0xff at column 6\)"):
        list_file_records(listing, image_root)
    listing.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # an image given as the list
    with pytest.raises(ValueError, match=rf"{listing}:1: not UTF-8 text \(byte 0x89 at column 1\)"):
        list_file_records(listing, image_root)
    listing.write_bytes(b"cat/1.jpg 7\nca\x00t/0.jpg 1\n")
    with pytest.raises(ValueError, match=f"{listing}:2: expected 'relative/path label'"):
        list_file_records(listing, image_root)


def test_missing_and_empty_images_are_counted_at_start(image_root, tmp_path):
    listing = tmp_path / "train.txt"
    (image_root / "cat" / "0.jpg").write_bytes(b"")
    listing.write_text("".join(f"{p} 0\n" for p in ["cat/1.jpg", "cat/9.jpg", "cat/0.jpg", "cat", "x/1.jpg",
                                                     "x/2.jpg", "bird/0.jpg"]))
    with pytest.raises(FileNotFoundError) as err:
        list_file_records(listing, image_root)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{listing}:2: image {image_root / 'cat' / '9.jpg'} does not exist")
    assert "5 of 7 images are missing or empty" in message
    assert f"cat/0.jpg (listed at {listing}:3) is empty (0 bytes); " in message
    assert f"(listed at {listing}:4) is not a regular file; ..." in message and "x/1.jpg" not in message
    cfg = ImageDataConfig(format="folder", path=str(image_root), test_path=str(image_root))
    with pytest.raises(FileNotFoundError, match=r"image .*cat/0.jpg is empty \(0 bytes\); 1 of 9 images"):
        image_records(cfg)
    cfg.check_images = False
    assert len(image_records(cfg)[0]) == 9


def test_list_test_root(image_root, tmp_path):
    val = tmp_path / "val"
    (val / "cat").mkdir(parents=True)
    (val / "cat" / "v.jpg").write_bytes(jpeg(3))
    (tmp_path / "train.txt").write_text("cat/1.jpg 1\n")
    (tmp_path / "test.txt").write_text("cat/v.jpg 1\n")
    cfg = ImageDataConfig(format="list", path=str(tmp_path / "train.txt"), test_path=str(tmp_path / "test.txt"),
                          root=str(image_root))
    with pytest.raises(FileNotFoundError, match=r"test.txt:1: image .*images/cat/v.jpg does not exist"):
        image_records(cfg)
    cfg.test_root = str(val)
    train, test = image_records(cfg)
    assert train.path(0) == str(image_root / "cat" / "1.jpg") and test.path(0) == str(val / "cat" / "v.jpg")


def test_limit_per_class_says_it_shrinks_the_test_split(tmp_path, capsys):
    archive = tmp_path / "tiny.tar.gz"
    make_archive(archive)  # 3 train and 1 test image per class
    cfg = ImageDataConfig(path=str(archive), cache_dir=str(tmp_path / "cache"), limit_per_class=2)
    image_records(cfg, progress=False)
    assert capsys.readouterr().err == ""
    image_records(cfg)  # test split untouched (1 per class <= 2): no note
    assert "note:" not in capsys.readouterr().err
    cfg.limit_per_class, cfg.test_split, cfg.train_split = 1, "train", "test"  # the 'train' split loses 6 of 9
    image_records(cfg)
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "data.limit_per_class=1 applies to the test split too: it keeps 3 of 9 'train'" in notes[0]


def test_limit_per_class_is_refused_where_it_would_be_ignored(image_root, tmp_path):
    """It cut only archives: a list / folder / .rec run with data.limit_per_class=N used every image, no word."""
    (tmp_path / "train.txt").write_text("cat/0.jpg 0\ndog/0.jpg 1\n")
    cfg = ImageDataConfig(format="list", path=str(tmp_path / "train.txt"), test_path=str(tmp_path / "train.txt"),
                          root=str(image_root), limit_per_class=1)
    with pytest.raises(ValueError, match=r"data.limit_per_class=1: only data.format=archive takes it \(with list"):
        image_records(cfg)
    cfg.format, cfg.path, cfg.test_path = "folder", str(image_root), str(image_root)
    with pytest.raises(ValueError, match=r"only data.format=archive takes it \(with folder"):
        image_records(cfg)
    cfg.limit_per_class = None
    assert len(image_records(cfg)[0]) == len(folder_records(image_root))
    archive = tmp_path / "tiny.tar.gz"
    make_archive(archive)
    with pytest.raises(ValueError, match=r"data.limit_per_class=0: must be >= 1"):
        image_records(ImageDataConfig(path=str(archive), cache_dir=str(tmp_path / "cache"), limit_per_class=0))


def test_truncated_rec_fails_at_start_naming_the_last_record(tmp_path):
    rec, idx = tmp_path / "v.rec", tmp_path / "v.idx"
    with RecordIOWriter(rec, idx) as writer:
        for key in range(4):
            writer.write(key, pack_image_record(IRHeader(0, float(key), key, 0), jpeg(key)))
    size = rec.stat().st_size
    os.truncate(rec, size - 40)  # an interrupted copy: the last record is cut
    with pytest.raises(RecordIOError, match=r"v\.rec, byte offset \d+, key 3: part length .* past the end of the file"
                                            r".*the last record indexed by .*v\.idx does not fit"):
        RecordIOImageRecords(rec, idx)
    os.truncate(rec, 16)  # most .idx offsets now point past the end: counted
    with pytest.raises(RecordIOError, match=r"v\.idx, key 1: offset \d+ leaves no room .* 3 of 4 entries point "
                                            r"outside the \.rec .*\(also key 2, key 3\)"):
        RecordIOImageRecords(rec, idx)


def test_training_on_a_list_that_leaves_its_root_is_one_line_rc_2(image_root, tmp_path, capsys):
    from mhe_scale.train import main as train_main

    listing = tmp_path / "train.txt"
    listing.write_text("cat/1.jpg 0\n../../../../../../../../etc/hostname 1\n")  # read and trained on, rc 0, before
    rc = train_main(["configs/classify/base_cifar.yaml", "data.format=list", f"data.path={listing}",
                     f"data.test_path={listing}", f"data.root={image_root}", f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"error: {listing}:2: path '../../../../../../../../etc/hostname' resolves outside its root" in err
