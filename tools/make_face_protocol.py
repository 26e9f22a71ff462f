"""Identity-disjoint train / verification protocol from a folder of aligned faces (IMAGES/<identity>/*.jpg).

    python tools/make_face_protocol.py ../shared/data/celeba-249/images runs/celeba249_protocol \\
        --train-identities 200 [--seed 0] [--folds 10] [--pairs-per-fold 300] [--template-size 4]

Writes OUT/train.rec (+ .idx, .lst: train on it with data.path=OUT/train.rec), OUT/verification.bin
(LFW-style pairs of the other identities; eval.verification or tools/eval_verification.py --bin),
OUT/pairs.tsv, OUT/IJBC/ (templates for tools/eval_ijb.py --root OUT) and OUT/protocol.json.
The rules (split, folds, balance, templates, galleries) are in mhe_scale/data/face_protocol.py and
docs/face.md. OUT must not exist; it appears whole or not at all. Errors: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from mhe_scale.data.face_protocol import ProtocolError, make_face_protocol


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="folder with one subfolder of aligned face images per identity")
    p.add_argument("out", help="new output folder")
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--train-identities", type=int, help="number of training identities")
    side.add_argument("--train-fraction", type=float, help="fraction of the identities used for training")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the pairs and the templates")
    p.add_argument("--folds", type=int, default=10, help="identity-disjoint verification folds (LFW: 10)")
    p.add_argument("--pairs-per-fold", type=int, default=300,
                   help="genuine (and as many impostor) pairs per fold at most (LFW: 300); fewer when a fold's "
                        "identities allow fewer")
    p.add_argument("--template-size", type=int, default=4, help="images per IJB-style template (at least)")
    p.add_argument("--max-impostor-pairs", type=int, default=1_000_000,
                   help="1:1 template impostor pairs kept at most (drawn uniformly when there are more)")
    p.add_argument("--progress", action="store_true", help="progress bar while packing the training RecordIO")
    args = p.parse_args(argv)
    try:
        rec = make_face_protocol(args.images, args.out, num_train=args.train_identities,
                                 train_fraction=args.train_fraction, seed=args.seed, folds=args.folds,
                                 pairs_per_fold=args.pairs_per_fold, template_size=args.template_size,
                                 max_impostor_pairs=args.max_impostor_pairs, progress=args.progress)
    except (ProtocolError, OSError) as err:
        print(f"make_face_protocol: error: {err}", file=sys.stderr)
        return 2
    t, v, j = rec["train"], rec["verification"], rec["ijb"]
    print(f"train: {t['identities']} identities, {t['images']} images -> {args.out}/train.rec")
    print(f"verification: {v['identities']} identities, {v['images']} images, {v['pairs']} pairs "
          f"({v['genuine_per_fold']} genuine + {v['impostors_per_fold']} impostor per fold) -> {args.out}/verification.bin")
    print(f"IJB-style: {j['templates']} templates, {j['template_pairs']} 1:1 pairs ({j['genuine_template_pairs']} "
          f"genuine), galleries {j['gallery_G1']} + {j['gallery_G2']}, {j['probes']} probes -> {args.out}/IJBC")
    return 0


if __name__ == "__main__":
    sys.exit(main())
