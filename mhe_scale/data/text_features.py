"""Feature vectors of a raw-text XMC corpus for the xmc task's MLP encoder, computed once and cached.

  text_tfidf  scikit-learn's TfidfVectorizer fitted on the TRAINING split only (sublinear tf
              1 + ln tf, smoothed idf, L2 per row, the max_features most frequent terms of train,
              terms in >= min_df training documents); every split is transformed with it.
              Cached as one .npz per split (CSR parts, no pickle).
  text_embed  a frozen pretrained encoder (default the MiniLM the project ships): the
              attention-masked token mean of the last layer, L2-normalised, at max_length tokens.
              Computed once per split (documents sorted by length so batches pad little) and
              cached as .npy, so training epochs never re-run the transformer.

Cache keys: the kind, its parameters, the model (text_embed) and the stamps (path, size, mtime)
of every corpus file, plus the point limits; a changed file or setting computes anew. Files are
written atomically (temporary name + rename) under data.cache_dir.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from mhe_scale.data.text_batches import _arrow_ragged, pad_ragged
from mhe_scale.data.xmc_dataset import XcDataConfig, XMCDataset
from mhe_scale.labels.codec import PAD

_CACHE_VERSION = "text_features-1"  # bump when a feature recipe changes
TEXT_FEATURE_KINDS = ("text_tfidf", "text_embed")


def first_rows(rows: Any, limit: int | None = None) -> Any:
    """The first `limit` rows of a Dataset (all when None)."""
    return rows if limit is None else rows.select(range(min(int(limit), len(rows))))


def split_labels(rows: Any) -> Tensor:
    """targets [N, L] padded with -1 of a Dataset's labels column (read column-wise)."""
    return pad_ragged(*_arrow_ragged(rows.with_format("arrow")[:]["labels"]), PAD)


def split_texts(rows: Any) -> list[str]:
    return rows.with_format("arrow")[:]["text"].to_pylist()


def cache_file(cache_dir: str | os.PathLike, kind: str, split: str, key: Sequence[Any], suffix: str) -> Path:
    """{cache_dir}/{kind}-{split}-{sha1 of the key}{suffix}."""
    digest = hashlib.sha1(json.dumps([_CACHE_VERSION, kind, *key], default=str).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{kind}-{split}-{digest}{suffix}"


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------ TF-IDF
def tfidf_vectorizer(max_features: int | None, sublinear_tf: bool, min_df: int) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(sublinear_tf=sublinear_tf, max_features=max_features, min_df=min_df,
                           dtype=np.float32, strip_accents="unicode")


def tfidf_features(train_texts: Sequence[str], other_texts: Sequence[Sequence[str]], max_features: int | None,
                   sublinear_tf: bool = True, min_df: int = 2) -> list[Any]:
    """scipy CSR float32 [N_s, F] for train and each other split, the vectorizer fitted on train only."""
    vec = tfidf_vectorizer(max_features, sublinear_tf, min(min_df, max(1, len(train_texts))))
    out = [vec.fit_transform(train_texts)]
    return out + [vec.transform(texts) for texts in other_texts]


def save_csr(path: Path, matrix: Any) -> None:
    import scipy.sparse

    _write_atomic(path, lambda tmp: scipy.sparse.save_npz(tmp, matrix.tocsr(), compressed=False))


def load_csr(path: Path) -> Any:
    import scipy.sparse

    return scipy.sparse.load_npz(path)  # np.load(allow_pickle=False) inside: nothing is unpickled


def csr_to_torch(matrix: Any) -> Tensor:
    """scipy CSR [N, F] -> torch sparse CSR float32 (as XMCDataset takes)."""
    import warnings

    m = matrix.tocsr()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                       torch.from_numpy(m.indices.astype(np.int64)),
                                       torch.from_numpy(m.data.astype(np.float32)), size=m.shape,
                                       check_invariants=False)


# ------------------------------------------------------------------ frozen encoder embeddings
@torch.no_grad()
def embed_texts(texts: Sequence[str], model: str, max_length: int, batch_size: int = 32) -> np.ndarray:
    """float32 [N, D]: L2-normalised mean-pooled last-layer states of a frozen HF encoder, eval mode."""
    from mhe_scale.models.text import HFTextEncoder, load_tokenizer

    tokenizer = load_tokenizer(model)
    encoder = HFTextEncoder(model, last_k_cls=1, dropout=0.0, pooling="mean").eval()
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    order = np.argsort([len(i) for i in ids], kind="stable")
    out = np.zeros((len(texts), encoder.num_features), dtype=np.float32)
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):  # a loop over batches, not documents
        index = order[start:start + batch_size]
        lengths = torch.tensor([len(ids[i]) for i in index])
        flat = torch.tensor([t for i in index for t in ids[i]], dtype=torch.long)
        batch = pad_ragged(flat, lengths, pad)
        mask = (torch.arange(batch.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        feats = encoder({"input_ids": batch, "attention_mask": mask})
        out[index] = torch.nn.functional.normalize(feats, dim=1).numpy()
    return out


def save_dense(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    _write_atomic(path, write)


def load_dense(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def dense_to_torch(array: np.ndarray) -> Tensor:
    """[N, D] float32 array -> torch sparse CSR (every value stored; XMCDataset densifies per batch)."""
    import warnings

    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    n, d = x.shape
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.arange(0, n * d + 1, d, dtype=torch.long),
                                       torch.arange(d, dtype=torch.long).repeat(n), x.reshape(-1), size=(n, d),
                                       check_invariants=False)


def xmc_datasets(features: Sequence[Tensor], labels: Sequence[Tensor]) -> list[XMCDataset]:
    """XMCDataset per split from torch CSR features and padded targets."""
    return [XMCDataset(x, y) for x, y in zip(features, labels)]


# ------------------------------------------------------------------ the xmc task's text_* data kinds
@dataclass(frozen=True)
class TextFeatureData:
    """Feature datasets of the training split and of the eval split, with the corpus's label names."""

    train: XMCDataset
    eval: XMCDataset
    label_names: list[str]
    text_format: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mhe_scale"


def _model_key(model: str) -> list[Any]:
    from mhe_scale.data.xmc_text import file_stamps
    from mhe_scale.models.text import resolve_model_path

    folder = resolve_model_path(model)
    return [str(folder), file_stamps(sorted(p for p in folder.iterdir() if p.is_file()))]


def load_text_features(cfg: XcDataConfig, path: Path) -> TextFeatureData:
    """data.name text_tfidf | text_embed (cfg: the xmc task's data section): read train and
    data.eval_split of the corpus at `path`, compute or load the cached features of both."""
    from mhe_scale.data.xmc_text import EVAL_SPLITS, detect_format, label_names, split_rows

    if cfg.name not in TEXT_FEATURE_KINDS:
        raise ValueError(f"data.name={cfg.name!r} is not a text feature kind; choose one of {TEXT_FEATURE_KINDS}")
    if cfg.eval_split not in EVAL_SPLITS:
        raise ValueError(f"data.eval_split={cfg.eval_split!r} is not known; choose one of {EVAL_SPLITS}")
    fmt = detect_format(path) if cfg.text_format == "auto" else cfg.text_format
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    common = dict(text_fields=list(cfg.text_fields), seed=cfg.seed, cache_dir=str(cache / "rows"))
    datasets = {s: split_rows(fmt, path, s, **common) for s in ("train", cfg.eval_split)}
    names = label_names(fmt, path, datasets["train"], datasets[cfg.eval_split])
    limits = {"train": cfg.max_train_points, cfg.eval_split: cfg.max_test_points}
    rows = {s: first_rows(ds, limits[s]) for s, ds in datasets.items()}
    prints = {s: [ds._fingerprint, limits[s]] for s, ds in datasets.items()}
    if cfg.name == "text_tfidf":
        params = [cfg.max_features, cfg.min_df, cfg.sublinear_tf]
        files = {s: cache_file(cache, cfg.name, s, [*prints["train"], *prints[s], params], ".npz") for s in rows}
        if not all(f.is_file() for f in files.values()):
            other = [s for s in rows if s != "train"]
            mats = tfidf_features(split_texts(rows["train"]), [split_texts(rows[s]) for s in other], cfg.max_features,
                                  cfg.sublinear_tf, cfg.min_df)
            for s, m in zip(["train", *other], mats):
                save_csr(files[s], m)
        feats = {s: csr_to_torch(load_csr(f)) for s, f in files.items()}
    else:
        params = [_model_key(cfg.embed_model), cfg.max_length]
        feats = {}
        for s in rows:
            file = cache_file(cache, cfg.name, s, [*prints[s], params], ".npy")
            if not file.is_file():
                save_dense(file, embed_texts(split_texts(rows[s]), cfg.embed_model, cfg.max_length,
                                             cfg.embed_batch_size))
            feats[s] = dense_to_torch(load_dense(file))
    train, test = (XMCDataset(feats[s], split_labels(rows[s])) for s in ("train", cfg.eval_split))
    return TextFeatureData(train, test, names, fmt)
