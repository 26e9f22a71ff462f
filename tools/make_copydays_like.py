"""A Copydays-style copy-detection benchmark from CIFAR-10 test images, in Copydays' file layout.

    python tools/make_copydays_like.py ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz OUT \
        --originals 200 --distractors 2000

OUT/copydays/NNNN00.jpg             originals (the first `originals` test images, class-interleaved)
OUT/copydays/crops/{50,80}/NNNN00.jpg   centred crops keeping 50 / 80 % of the area (not resized)
OUT/copydays/jpegqual/{10,30}/NNNN00.jpg  JPEG re-encoded at quality 10 / 30
OUT/copydays/scale/50/NNNN00.jpg    downscaled to half size
OUT/copydays/strong/NNNN01.jpg      rotated 20 degrees (expanded) + colour change
OUT/copydays/strong/NNNN02.jpg      70 % crop + half size + horizontal flip + JPEG 30
OUT/distractors/NNNNN.jpg           other test images (never an original)
Read by mhe_scale.eval.retrieval.copydays(OUT/copydays, OUT/distractors). Deterministic.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps


def test_images(archive: Path) -> list[tuple[str, bytes]]:
    """(member name, JPEG bytes) of the archive's test/<class>/*.jpg, class-interleaved, sorted."""
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(archive) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-3] == "test" and m.name.lower().endswith(".jpg"):
                by_class.setdefault(parts[-2], []).append((m.name, tar.extractfile(m).read()))
    if not by_class:
        raise SystemExit(f"error: {archive} has no test/<class>/*.jpg members (expected the CIFAR-10 JPEG archive)")
    lists = [sorted(v) for _, v in sorted(by_class.items())]
    return [x for group in zip(*lists) for x in group]


def crop_area(im: Image.Image, fraction: float) -> Image.Image:
    w, h = im.size
    s = fraction ** 0.5
    cw, ch = max(1, round(w * s)), max(1, round(h * s))
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch))


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def variants(im: Image.Image) -> dict[str, Image.Image]:
    """relative path (without the id) -> image."""
    w, h = im.size
    half = im.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR)
    strong1 = ImageEnhance.Color(ImageEnhance.Brightness(im.rotate(-20, expand=True, resample=Image.BILINEAR))
                                 .enhance(1.3)).enhance(0.5)
    small = crop_area(im, 0.7)
    strong2 = jpeg(ImageOps.mirror(small.resize((max(1, small.size[0] // 2), max(1, small.size[1] // 2)),
                                                Image.BILINEAR)), 30)
    return {"crops/50": crop_area(im, 0.5), "crops/80": crop_area(im, 0.8), "jpegqual/10": jpeg(im, 10),
            "jpegqual/30": jpeg(im, 30), "scale/50": half, "strong/+1": strong1, "strong/+2": strong2}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("archive")
    ap.add_argument("out")
    ap.add_argument("--originals", type=int, default=200)
    ap.add_argument("--distractors", type=int, default=2000)
    args = ap.parse_args(argv)
    images = test_images(Path(args.archive))
    if args.originals + args.distractors > len(images):
        raise SystemExit(f"error: {args.originals} + {args.distractors} images requested, the archive has {len(images)}")
    root, dist = Path(args.out, "copydays"), Path(args.out, "distractors")
    for i, (_, data) in enumerate(images[: args.originals]):
        gid = 2000 + i
        im = Image.open(io.BytesIO(data)).convert("RGB")
        (root).mkdir(parents=True, exist_ok=True)
        im.save(root / f"{gid}00.jpg", quality=95)
        for rel, var in variants(im).items():
            folder, _, suffix = rel.partition("/")
            if suffix.startswith("+"):
                path = root / folder / f"{gid}{int(suffix[1:]):02d}.jpg"
            else:
                path = root / folder / suffix / f"{gid}00.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            var.save(path, quality=95)
    dist.mkdir(parents=True, exist_ok=True)
    for j, (_, data) in enumerate(images[args.originals: args.originals + args.distractors]):
        (dist / f"{j:05d}.jpg").write_bytes(data)
    print(f"{args.originals} originals x 7 variants in {root}, {args.distractors} distractors in {dist}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
