"""Image retrieval evaluation: embeddings at any resolution, exact search, mAP / mP@k / N-S score,
and the standard protocols read from their own files (no pickles).

    rset = holidays("…/holidays", rotations="holidays-rotate.yaml")   # or ukbench / revisited / copydays
    metrics = evaluate(rset, embed, largest_side=500)                 # embed: images [B,3,H,W] -> [B,D]

Protocols (what each reads; layouts as released):
- INRIA Holidays: `root/jpg/NNNNNN.jpg` (1491). Group = id // 100; the group's first image (id % 100
  == 0) is the query, the other images of its group are the positives, the query itself is ignored.
  "Rotated" Holidays: a table {file name: degrees} (YAML/JSON, MultiGrain's holidays-rotate.yaml)
  of images to turn clockwise by that angle (the upright versions).
- UKBench: `root/*.jpg` (10200), sorted; groups of 4 consecutive images; every image is a query and
  the N-S score is the mean number of its group (itself included) among its 4 nearest (max 4).
- Revisited Oxford / Paris (Radenović et al. 2018): `root/jpg/<name>.jpg` and the ground-truth file
  with keys imlist, qimlist, gnd[i] = {bbx, easy, hard, junk}. The original release is a pickle,
  which we never unpickle: give a JSON conversion (same keys, 0-based ids; docs/multigrain.md).
  Queries are cropped to bbx. easy: positives easy, junk junk+hard; medium: easy+hard / junk;
  hard: hard / junk+easy.
- Copydays: originals `root/NNNNNN.jpg` (157), variants `root/<transform>[/<level>]/NNNNNN.jpg`
  (crops/NN, jpegqual/NN, strong); group = id // 100 (the original is id // 100 * 100). Queries:
  the variants (optionally of some transforms only); database: the originals + distractor images
  (a folder searched recursively, the first N in sorted order); the one positive is the original.
- A labelled folder (`labelled_folder`): `root/<class or instance>/<image>` (the image folder
  layout of data/image_folder.py); every image is a query, the other images of its class are its
  positives, the query itself is left out of its own ranking. Reported: mAP (plain average
  precision: the mean over positives of the precision at each one's rank) and recall@k (the
  percentage of queries with a positive among their k nearest), over the queries that have a
  positive (a class of one image has none; counted in queries_without_positives).

Average precision is the interpolation of these benchmarks' own scripts (Holidays' holidays_map,
revisitop's compute_ap): with positives at ranks r_0 < r_1 < … (0-based, junk removed),
AP = Σ_j ((j / r_j, or 1 if r_j = 0) + (j + 1) / (r_j + 1)) / 2 / n_positives.
mP@k (revisitop): k' = min(k, rank of the last positive + 1); precision at k'.

Images are decoded, embedded and dropped in chunks of a few batches (memory: one chunk of images,
not the benchmark); queries are ranked in blocks of at most RANK_BLOCK_ENTRIES query x database
entries (UKBench's 10,200 x 10,200 ranking and its masks are never whole); each pass can show a
progress bar. `largest_side` resizes every image so its largest side is s*; `upsample_limit` caps
how far a smaller image is enlarged (tools/eval_retrieval.py passes the run's training resolution,
so 32-pixel images are not blown up 15x to s* = 500 unless asked).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

Protocol = tuple[list[list[int]], list[list[int]]]  # per query: positives, junk (database indices)
RANK_BLOCK_ENTRIES = 1 << 22
"""score() ranks queries in blocks of at most this many query x database entries (4M)."""


@dataclass(frozen=True)
class ImageRef:
    """One image to embed: a file, a clockwise rotation in degrees, an optional crop box (x0, y0, x1, y1)."""

    path: str
    rotation: int = 0
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class SameLabel:
    """Positives by label: query q's positives are the database images labelled query_labels[q],
    except database image self_index[q] (the query itself; -1 for none), which is left out of its ranking."""

    database_labels: Tensor
    """int64 [N]"""
    query_labels: Tensor
    """int64 [Q]"""
    self_index: Tensor
    """int64 [Q]"""


@dataclass
class RetrievalSet:
    """A benchmark: database and query images, and per protocol the positives / junk of each query
    (lists of database indices, or a SameLabel rule)."""

    name: str
    database: list[ImageRef]
    queries: list[ImageRef]
    protocols: dict[str, Protocol | SameLabel] = field(default_factory=dict)
    ns_score: bool = False
    """UKBench: report the N-S score (mean positives among the 4 nearest)."""


# ---------------------------------------------------------------- images and embeddings


def target_side(side: int, largest_side: int, upsample_limit: int | None = None) -> int:
    """The largest side an image whose largest side is `side` is resized to: largest_side, except that
    an image smaller than largest_side is enlarged at most to upsample_limit (None: no cap), never shrunk."""
    if side >= largest_side or upsample_limit is None:
        return largest_side
    return max(side, min(largest_side, upsample_limit))


def load_image(ref: ImageRef, largest_side: int | None = None, upsample_limit: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3]: decoded, rotated clockwise, cropped, largest side resized to `largest_side` (no crop;
    a smaller image is enlarged at most to `upsample_limit`, see target_side)."""
    try:
        with Image.open(ref.path) as im:
            im = im.convert("RGB")
            if ref.rotation % 360:
                im = im.rotate(-ref.rotation, expand=True)
            if ref.box is not None:
                im = im.crop(tuple(int(round(v)) for v in ref.box))
            if largest_side is not None:
                w, h = im.size
                scale = target_side(max(w, h), largest_side, upsample_limit) / max(w, h)
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                if size != (w, h):
                    im = im.resize(size, Image.BILINEAR)
            return np.asarray(im)
    except (OSError, ValueError) as err:
        raise ValueError(f"{ref.path}: cannot read image ({err})") from None


class ResizeLargestSide:
    """Transform uint8 [H, W, 3] -> uint8 with its largest side = size, aspect kept, no crop (s* testing)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"largest side must be >= 1, got {size}")
        self.size = size

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        h, w = image.shape[:2]
        scale = self.size / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size == (w, h):
            return image
        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.BILINEAR))


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [H, W, 3] -> normalised float32 [3, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@torch.no_grad()
def embed_by_size(embed: Callable[[Tensor], Tensor], images: Sequence[Tensor], batch_size: int = 32,
                  device: torch.device | str = "cpu") -> Tensor:
    """images (each [3, H, W], any sizes) -> L2-normalised embeddings [N, D] in input order.

    Images of equal size are batched together (up to batch_size); batch_size=1 embeds one at a time."""
    if not images:
        raise ValueError("embed_by_size: no images")
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape[1:]), []).append(i)
    out: Tensor | None = None
    for indices in by_size.values():
        for lo in range(0, len(indices), batch_size):
            chunk = indices[lo:lo + batch_size]
            e = embed(torch.stack([images[i] for i in chunk]).to(device)).float()
            if out is None:
                out = e.new_empty(len(images), e.shape[1])
            out[torch.tensor(chunk, device=e.device)] = e
    return torch.nn.functional.normalize(out, dim=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- search and metrics


def search(queries: Tensor, database: Tensor, k: int | None = None, block: int = 4096,
           use_faiss: bool | None = None) -> tuple[Tensor, Tensor]:
    """Exact inner-product search: queries [Q, D], database [N, D] -> (scores, ids) [Q, k] best first.

    Blocks of `block` queries are scored by one matmul each (memory block x N). faiss (IndexFlatIP)
    is used when installed and use_faiss is not False. k=None ranks the whole database."""
    k = database.shape[0] if k is None else min(k, database.shape[0])
    if use_faiss is not False:
        try:
            import faiss  # type: ignore[import-not-found]
        except ImportError:
            if use_faiss:
                raise ImportError("search(use_faiss=True) needs faiss: pip install faiss-cpu") from None
        else:
            index = faiss.IndexFlatIP(database.shape[1])
            index.add(database.detach().float().cpu().numpy())
            scores, ids = index.search(queries.detach().float().cpu().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(ids).long()
    scores, ids = [], []
    for lo in range(0, queries.shape[0], block):
        s, i = (queries[lo:lo + block] @ database.t()).topk(k, dim=1)
        scores.append(s)
        ids.append(i)
    return torch.cat(scores), torch.cat(ids)


def _masks(protocol: Protocol, num_database: int) -> tuple[Tensor, Tensor]:
    positives, junk = protocol
    pos = torch.zeros(len(positives), num_database, dtype=torch.bool)
    bad = torch.zeros_like(pos)
    for q, (p, j) in enumerate(zip(positives, junk)):
        pos[q, list(p)] = True
        bad[q, list(j)] = True
    return pos, bad & ~pos


def query_metrics(ranking: Tensor, positives: Tensor, junk: Tensor, ks: Sequence[int] = (1, 5, 10)
                  ) -> tuple[Tensor, dict[int, Tensor]]:
    """ranking [Q, N] database ids best first (whole database); positives, junk bool [Q, N] by id ->
    (AP [Q] float64, nan for a query without positives; {k: P@k' [Q]}), the benchmarks' definitions
    (module docstring)."""
    pos = positives.gather(1, ranking)
    kept = ~junk.gather(1, ranking)
    rank = kept.cumsum(1) - 1                            # 0-based rank among non-junk results
    hit = pos & kept
    j = hit.cumsum(1) - 1                                # index of each positive among positives
    npos = hit.sum(1)
    r, jj = rank.double(), j.double()
    prec0 = torch.where(r > 0, jj / r.clamp_min(1), torch.ones_like(r))
    terms = torch.where(hit, (prec0 + (jj + 1) / (r + 1)) / 2, torch.zeros_like(r))
    ap = terms.sum(1) / npos.clamp_min(1)
    ap = torch.where(npos > 0, ap, torch.full_like(ap, math.nan))
    last = torch.where(hit, rank + 1, torch.zeros_like(rank)).amax(1)   # 1-based rank of the last positive
    within = {}
    for k in ks:
        kq = torch.minimum(last, torch.full_like(last, k)).clamp_min(1)
        within[k] = (hit & (rank + 1 <= kq[:, None])).sum(1).double() / kq.double()
    return ap, within


def _mean_percent(values: Tensor, valid: Tensor) -> float:
    return 100 * float(values[valid].double().mean()) if bool(valid.any()) else math.nan


def ranking_metrics(ranking: Tensor, positives: Tensor, junk: Tensor, ks: Sequence[int] = (1, 5, 10)
                    ) -> dict[str, float | list[float]]:
    """ranking [Q, N] database ids best first (whole database); positives, junk bool [Q, N] by id.

    -> {"mAP", "mP@k" for k in ks, "ap": per-query AP (nan for queries without positives)}; means
    over the queries that have positives, in percent."""
    ap, within = query_metrics(ranking, positives, junk, ks)
    valid = ~ap.isnan()
    out: dict[str, float | list[float]] = {"mAP": _mean_percent(ap, valid)}
    out.update({f"mP@{k}": _mean_percent(within[k], valid) for k in ks})
    out["ap"] = ap.tolist()
    return out


def ns_rows(ranking: Tensor, positives: Tensor) -> Tensor:
    """UKBench: positives among each query's 4 first results, int64 [Q]."""
    return positives.gather(1, ranking[:, :4]).sum(1)


def ns_score(ranking: Tensor, positives: Tensor) -> float:
    """UKBench N-S score: mean number of positives among the 4 first results (in [0, 4])."""
    return float(ns_rows(ranking, positives).double().mean())


def same_label_metrics(ranking: Tensor, rule: SameLabel, queries: Tensor, ks: Sequence[int] = (1, 5, 10)
                       ) -> tuple[Tensor, dict[int, Tensor]]:
    """ranking [B, N] database ids best first (whole database) of the queries `queries` [B] (indices into
    rule's query arrays) -> (AP [B] float64, nan without positives; {k: bool [B] a positive in the top k}).

    The query's own image (rule.self_index) is removed from its ranking; AP = mean over positives of
    (positives up to it) / (its 1-based rank)."""
    pos = rule.database_labels[ranking] == rule.query_labels[queries, None]
    kept = ranking != rule.self_index[queries, None]
    hit = pos & kept
    rank = (kept.cumsum(1) - 1).double()                 # 0-based rank without the query itself
    nth = hit.cumsum(1).double()                          # positives up to and including each entry
    npos = hit.sum(1)
    ap = torch.where(hit, nth / (rank + 1), torch.zeros_like(rank)).sum(1) / npos.clamp_min(1)
    ap = torch.where(npos > 0, ap, torch.full_like(ap, math.nan))
    first = torch.where(hit, rank, torch.full_like(rank, math.inf)).amin(1)  # 0-based rank of the first positive
    return ap, {k: first < k for k in ks}


def score(rset: RetrievalSet, query_emb: Tensor, database_emb: Tensor, ks: Sequence[int] = (1, 5, 10),
          use_faiss: bool | None = None, progress: bool = False) -> dict[str, float]:
    """Metrics of every protocol of rset from L2-normalised embeddings ([Q, D], [N, D]).

    Queries are ranked in blocks of at most RANK_BLOCK_ENTRIES query x database entries (each block
    searched once for all protocols); per-query values are gathered, then averaged. Protocol lists:
    mAP, mP@k (and N-S for UKBench); SameLabel: mAP, recall@k, queries, queries_without_positives."""
    n, q = database_emb.shape[0], query_emb.shape[0]
    block = max(1, RANK_BLOCK_ENTRIES // max(n, 1))
    rows: dict[str, tuple[list[Tensor], dict[int, list[Tensor]], list[Tensor]]] = {
        name: ([], {k: [] for k in ks}, []) for name in rset.protocols}
    with tqdm(total=q, desc=f"rank {rset.name}", unit="query", mininterval=1.0, disable=not progress) as bar:
        for lo in range(0, q, block):
            queries = torch.arange(lo, min(lo + block, q))
            ranking = search(query_emb[queries], database_emb, use_faiss=use_faiss)[1].cpu()
            for name, protocol in rset.protocols.items():
                aps, per_k, ns = rows[name]
                if isinstance(protocol, SameLabel):
                    ap, values = same_label_metrics(ranking, protocol, queries, ks)
                else:
                    pos, junk = _masks((protocol[0][lo:lo + len(queries)], protocol[1][lo:lo + len(queries)]), n)
                    ap, values = query_metrics(ranking, pos, junk, ks)
                    if rset.ns_score:
                        ns.append(ns_rows(ranking, pos))
                aps.append(ap)
                for k in ks:
                    per_k[k].append(values[k])
            bar.update(len(queries))
    out: dict[str, float] = {}
    for name, protocol in rset.protocols.items():
        prefix = "" if len(rset.protocols) == 1 else f"{name}/"
        aps, per_k, ns = rows[name]
        ap = torch.cat(aps)
        valid = ~ap.isnan()
        if isinstance(protocol, SameLabel):
            if not bool(valid.any()):
                raise ValueError(f"{rset.name}: no query has a positive (every class holds one image): mAP and "
                                 "recall@k are undefined")
            out[f"{prefix}mAP"] = _mean_percent(ap, valid)
            out.update({f"{prefix}recall@{k}": _mean_percent(torch.cat(per_k[k]), valid) for k in ks})
            out.update({f"{prefix}queries": int(len(ap)), f"{prefix}queries_without_positives": int((~valid).sum())})
        else:
            out[f"{prefix}mAP"] = _mean_percent(ap, valid)
            out.update({f"{prefix}mP@{k}": _mean_percent(torch.cat(per_k[k]), valid) for k in ks})
            if rset.ns_score:
                out[f"{prefix}N-S"] = float(torch.cat(ns).double().mean())
    return out


def embed_images(refs: Sequence[ImageRef], embed: Callable[[Tensor], Tensor], largest_side: int | None = None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 batch_size: int = 32, device: torch.device | str = "cpu", upsample_limit: int | None = None,
                 progress: bool = False, desc: str = "embed") -> Tensor:
    """L2-normalised embeddings [len(refs), D] in order; images are loaded (load_image), embedded by size
    (embed_by_size) and dropped in chunks of 4 batches, so memory holds one chunk of images."""
    if not refs:
        raise ValueError("embed_images: no images")
    chunk = 4 * batch_size
    parts = []
    with tqdm(total=len(refs), desc=desc, unit="img", mininterval=1.0, disable=not progress) as bar:
        for lo in range(0, len(refs), chunk):
            images = [to_tensor(load_image(ref, largest_side, upsample_limit), mean, std)
                      for ref in refs[lo:lo + chunk]]
            parts.append(embed_by_size(embed, images, batch_size, device).cpu())
            bar.update(len(images))
    return torch.cat(parts)


def evaluate(rset: RetrievalSet, embed: Callable[[Tensor], Tensor], largest_side: int | None = None,
             mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
             batch_size: int = 32, device: torch.device | str = "cpu", ks: Sequence[int] = (1, 5, 10),
             use_faiss: bool | None = None, upsample_limit: int | None = None, progress: bool = False
             ) -> dict[str, float]:
    """Embed every distinct image of rset once (largest side resized to largest_side, no crop; smaller
    images enlarged at most to upsample_limit) and score; progress: bars on stderr (tqdm)."""
    refs = list(dict.fromkeys(rset.database + rset.queries))
    where = {ref: i for i, ref in enumerate(refs)}
    emb = embed_images(refs, embed, largest_side, mean, std, batch_size, device, upsample_limit, progress,
                       f"embed {rset.name}")
    db = emb[torch.tensor([where[r] for r in rset.database])]
    qs = emb[torch.tensor([where[r] for r in rset.queries])]
    return score(rset, qs, db, ks, use_faiss, progress)


# ---------------------------------------------------------------- protocols


def _image_id(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        raise ValueError(f"{path}: expected a numeric file name such as 100000.jpg") from None


def _read_table(path: str | Path) -> dict:
    """A YAML or JSON mapping (yaml.safe_load reads both; never a pickle)."""
    import yaml

    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        raise ValueError(f"{path}: pickles are never loaded; convert it to JSON (docs/multigrain.md)")
    try:
        table = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not a readable YAML/JSON mapping ({err})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(table).__name__}")
    return table


def holidays(root: str | Path, rotations: str | Path | None = None) -> RetrievalSet:
    """INRIA Holidays from root/jpg/*.jpg; rotations: table {name: clockwise degrees} (rotated Holidays)."""
    files = sorted(Path(root, "jpg").glob("*.jpg"))
    if not files:
        raise ValueError(f"{Path(root, 'jpg')}: no .jpg images (expected the Holidays layout root/jpg/NNNNNN.jpg)")
    turn = {}
    if rotations is not None:
        for name, deg in _read_table(rotations).items():
            if not isinstance(deg, int) or deg % 90:
                raise ValueError(f"{rotations}: entry {name!r}: {deg!r} is not a multiple of 90 degrees")
            turn[str(name)] = deg
    database = [ImageRef(str(f), turn.get(f.name, 0)) for f in files]
    groups: dict[int, list[int]] = {}
    for i, f in enumerate(files):
        groups.setdefault(_image_id(f) // 100, []).append(i)
    queries, positives, junk = [], [], []
    for members in groups.values():
        q = members[0]
        queries.append(database[q])
        positives.append(members[1:])
        junk.append([q])
    return RetrievalSet("holidays" + ("-rotated" if rotations else ""), database, queries,
                        {"holidays": (positives, junk)})


def ukbench(root: str | Path) -> RetrievalSet:
    """UKBench from root/*.jpg: groups of 4 consecutive (sorted) images; every image a query."""
    files = sorted(Path(root).glob("*.jpg"))
    if not files or len(files) % 4:
        raise ValueError(f"{root}: UKBench needs a multiple of 4 images root/ukbenchNNNNN.jpg, found {len(files)}")
    database = [ImageRef(str(f)) for f in files]
    positives = [list(range(i // 4 * 4, i // 4 * 4 + 4)) for i in range(len(files))]
    return RetrievalSet("ukbench", database, list(database), {"ukbench": (positives, [[] for _ in files])},
                        ns_score=True)


def _read_gnd(path: Path) -> dict:
    if path.suffix != ".json":
        raise ValueError(f"{path}: give the ground truth as .json (keys imlist, qimlist, gnd); "
                         "pickles are never loaded (docs/multigrain.md shows the conversion)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from None


def revisited(root: str | Path, gnd_file: str | Path) -> RetrievalSet:
    """Revisited Oxford / Paris: images root/jpg/<name>.jpg, ground truth gnd_file (.json, 0-based ids)."""
    path = Path(gnd_file)
    cfg = _read_gnd(path)
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"{path}: missing key {key!r} (expected imlist, qimlist, gnd)")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{path}: {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries")
    n = len(cfg["imlist"])
    database = [ImageRef(str(Path(root, "jpg", f"{name}.jpg"))) for name in cfg["imlist"]]
    queries, settings = [], {"easy": ([], []), "medium": ([], []), "hard": ([], [])}
    for i, (name, g) in enumerate(zip(cfg["qimlist"], cfg["gnd"])):
        for key in ("bbx", "easy", "hard", "junk"):
            if key not in g:
                raise ValueError(f"{path}: gnd[{i}] lacks {key!r}")
        bad = [v for key in ("easy", "hard", "junk") for v in g[key] if not 0 <= int(v) < n]
        if bad:
            raise ValueError(f"{path}: gnd[{i}] refers to image {bad[0]} outside imlist (0..{n - 1})")
        queries.append(ImageRef(str(Path(root, "jpg", f"{name}.jpg")), 0, tuple(float(v) for v in g["bbx"])))
        easy, hard, junk = list(g["easy"]), list(g["hard"]), list(g["junk"])
        for setting, (pos, jnk) in (("easy", (easy, junk + hard)), ("medium", (easy + hard, junk)),
                                    ("hard", (hard, junk + easy))):
            settings[setting][0].append(pos)
            settings[setting][1].append(jnk)
    return RetrievalSet(path.stem.replace("gnd_", ""), database, queries, settings)


def copydays(root: str | Path, distractors: str | Path | None = None, max_distractors: int = 10_000,
             transforms: Sequence[str] | None = None) -> RetrievalSet:
    """Copydays: originals root/*.jpg, variants root/<transform>/**/*.jpg; transforms filters the
    variants by their first folder (e.g. ["strong"]); distractors: a folder of extra database images."""
    root = Path(root)
    originals = sorted(root.glob("*.jpg"))
    if not originals:
        raise ValueError(f"{root}: no originals root/NNNNNN.jpg (expected the Copydays layout)")
    group_of = {}
    for i, f in enumerate(originals):
        gid = _image_id(f)
        if gid % 100:
            raise ValueError(f"{f}: an original's id must end in 00 (variants live in sub-folders)")
        group_of[gid // 100] = i
    database = [ImageRef(str(f)) for f in originals]
    if distractors is not None:
        extra = sorted(p for p in Path(distractors).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        database += [ImageRef(str(p)) for p in extra[:max_distractors]]
    queries, positives = [], []
    for f in sorted(p for p in root.rglob("*.jpg") if p.parent != root):
        kind = f.relative_to(root).parts[0]
        if transforms is not None and kind not in transforms:
            continue
        gid = _image_id(f) // 100
        if gid not in group_of:
            raise ValueError(f"{f}: no original {gid * 100}.jpg in {root}")
        queries.append(ImageRef(str(f)))
        positives.append([group_of[gid]])
    if not queries:
        raise ValueError(f"{root}: no variant images" + (f" of transforms {list(transforms)}" if transforms else ""))
    return RetrievalSet("copydays", database, queries, {"copydays": (positives, [[] for _ in queries])})


def labelled_folder(root: str | Path) -> RetrievalSet:
    """root/<class>/<image> (data/image_folder.folder_records): every image a query, the other images of
    its class its positives, the query itself left out; ValueError if no class holds two images."""
    from mhe_scale.data.image_folder import folder_records

    records = folder_records(root)
    labels = torch.from_numpy(records.labels)
    if int(torch.bincount(labels).max()) < 2:
        raise ValueError(f"{root}: every class folder holds one image; a query needs another image of its class")
    refs = [ImageRef(records.path(i)) for i in range(len(records))]
    rule = SameLabel(labels, labels, torch.arange(len(refs)))
    return RetrievalSet(f"folder:{Path(root).name}", refs, list(refs), {"folder": rule})


PROTOCOLS = ("holidays", "ukbench", "roxford5k", "rparis6k", "copydays", "folder")
