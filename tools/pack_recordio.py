"""Pack a folder of face images (one subfolder per identity) into MXNet-compatible RecordIO.

    python tools/pack_recordio.py IMAGE_ROOT OUT_PREFIX [--header] [--quality 95] [--pass-through]

Reads IMAGE_ROOT/<identity>/<image> (extensions .jpg .jpeg .png .bmp .webp, any case; other files are
ignored). Writes OUT_PREFIX.rec, .idx and .lst atomically (temporary files renamed when complete);
the folder of OUT_PREFIX is created when missing (and said). Label = position of the identity folder
in sorted order. --header adds the insightface header and identity records (see
mhe_scale/data/face_dataset.py). Refuses, with one line on stderr and exit 2: a missing or empty
IMAGE_ROOT, an image file that is missing, empty or not a regular file (all are stat-ed before
packing starts, counted, the first few named), an image that does not decode (named), an output
folder that is a file. Read the result with mhe_scale.data.face_dataset.RecordIOFaceDataset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mhe_scale.data.face_dataset import pack_image_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image_root", help="folder with one subfolder of images per identity")
    parser.add_argument("out_prefix", help="output path without extension: writes PREFIX.rec/.idx/.lst")
    parser.add_argument("--header", action="store_true",
                        help="insightface layout: header record at key 0, identity records after the images")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoding (1..100)")
    parser.add_argument("--pass-through", action="store_true", help="store the image files' bytes unchanged")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    folder = Path(args.out_prefix).parent
    created = not folder.exists()
    try:
        packed = pack_image_folder(args.image_root, args.out_prefix, header=args.header, quality=args.quality,
                                   pass_through=args.pass_through, progress=not args.no_progress)
    except (OSError, ValueError) as err:  # missing / empty root, bad images, an output folder that is a file
        print(f"error: {err}", file=sys.stderr)
        return 2
    if created:
        print(f"created output folder {folder}")
    print(f"wrote {packed.rec_path} ({packed.num_images} images, {packed.num_classes} identities), "
          f"{packed.idx_path.name}, {packed.lst_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
