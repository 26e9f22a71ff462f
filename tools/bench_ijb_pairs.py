"""Benchmark IJB 1:1 pair scoring at IJB-C size on synthetic template features; prints a markdown table.

    python tools/bench_ijb_pairs.py --pairs 15658489 --templates 23124 --dim 512 --threads 1

Templates come in subjects of --per-subject (features = subject vector + noise, L2-normalised);
--genuine pairs join two templates of one subject, the rest are random pairs. Timed:
  ours      mhe_scale.eval.ijb.score_pairs over all pairs (gathered batches, pairs presorted)
  baseline  numpy, chunks of --baseline-chunk pairs: einsum('ij,ij->i', F[a], F[b]) (the usual
            IJB script), run on the first --baseline-pairs pairs and extrapolated linearly
  roc       roc() + tar_at_far() over all scores (sort + cumsum)
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from mhe_scale.eval.ijb import FARS, roc, score_pairs, tar_at_far


def synthetic(pairs: int, templates: int, dim: int, per_subject: int, genuine: int, noise: float, seed: int):
    """-> (template features [T, D] unit norm, idx1 [P], idx2 [P], labels bool [P])."""
    g = torch.Generator().manual_seed(seed)
    subj = torch.arange(templates) // per_subject
    centers = torch.randn(int(subj.max()) + 1, dim, generator=g)
    feats = F.normalize(centers[subj] + noise * torch.randn(templates, dim, generator=g), dim=1)
    i = torch.randint(0, templates, (pairs,), generator=g)
    j = torch.randint(0, templates, (pairs,), generator=g)
    gi = i[:genuine]  # partner in the same subject block
    j[:genuine] = ((gi // per_subject) * per_subject + torch.randint(0, per_subject, (genuine,), generator=g)).clamp_(
        max=templates - 1)
    perm = torch.randperm(pairs, generator=g)
    i, j = i[perm], j[perm]
    return feats, i, j, subj[i] == subj[j]


def timed(fn, *args):
    """-> ((wall seconds, process CPU seconds), fn(*args))."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return (time.perf_counter() - w, time.process_time() - c), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=15658489, help="IJB-C 1:1 has 15,658,489 pairs")
    p.add_argument("--templates", type=int, default=23124, help="IJB-C 1:1 has 23,124 templates")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--genuine", type=int, default=19557, help="IJB-C 1:1 has 19,557 genuine pairs")
    p.add_argument("--per-subject", type=int, default=6)
    p.add_argument("--noise", type=float, default=2.0, help="template noise / subject spread (sets the TARs)")
    p.add_argument("--batch-size", type=int, default=1024, help="pairs per batch in score_pairs")
    p.add_argument("--baseline-pairs", type=int, default=2_000_000, help="pairs the baseline really scores")
    p.add_argument("--baseline-chunk", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default); on a loaded machine more threads can be far slower")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    feats, i, j, labels = synthetic(args.pairs, args.templates, args.dim, args.per_subject, args.genuine,
                                   args.noise, args.seed)

    (t_ours, c_ours), scores = timed(score_pairs, feats, i, j, args.batch_size)

    nb = min(args.baseline_pairs, args.pairs)
    fn, a, b = feats.numpy(), i[:nb].numpy(), j[:nb].numpy()
    base = np.empty(nb, np.float32)

    def baseline() -> None:
        for s in range(0, nb, args.baseline_chunk):
            e = min(s + args.baseline_chunk, nb)
            base[s:e] = np.einsum("ij,ij->i", fn[a[s:e]], fn[b[s:e]])

    (t_base, c_base), _ = timed(baseline)
    t_base, c_base = t_base * args.pairs / nb, c_base * args.pairs / nb
    diff = float(np.abs(base - scores[:nb].numpy()).max())

    (t_roc, c_roc), (far, tar, _) = timed(roc, scores, labels)
    (t_tar, c_tar), tars = timed(tar_at_far, far, tar, FARS)
    t_roc, c_roc = t_roc + t_tar, c_roc + c_tar

    print(f"pairs {args.pairs:,}, templates {args.templates:,}, dim {args.dim}, genuine {int(labels.sum()):,}, "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size}; max |ours - baseline| {diff:.1e}")
    print("| step | wall s | CPU s | pairs/s (wall) |")
    print("|---|---:|---:|---:|")
    print(f"| score_pairs (ours, all pairs) | {t_ours:.1f} | {c_ours:.1f} | {args.pairs / t_ours:,.0f} |")
    print(f"| numpy einsum, {args.baseline_chunk:,}-pair chunks ({nb:,} pairs, extrapolated) | {t_base:.1f} | "
          f"{c_base:.1f} | {args.pairs / t_base:,.0f} |")
    print(f"| speed-up (baseline / ours) | {t_base / t_ours:.2f}x | {c_base / c_ours:.2f}x | |")
    print(f"| roc + tar_at_far ({len(far):,} ROC points) | {t_roc:.1f} | {c_roc:.1f} | {args.pairs / t_roc:,.0f} |")
    print("TAR@FAR: " + ", ".join(f"{f:g}: {v:.4f}" for f, v in zip(FARS, tars.tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
