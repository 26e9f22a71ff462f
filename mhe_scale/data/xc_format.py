"""Extreme Classification Repository sparse text format (read, write), plain label lists, ranked predictions.

    N F L                        header: points, features, labels
    l1,l2,... f:v f:v ...        one line per point, 0-based ids; a point without labels has an
     f:v f:v ...                 empty label field, so its line starts with a space

Reading splits each line in Python once and converts all tokens in bulk (Delicious, 12,920 points,
in well under a second); only when a token does not parse does a slow pass look for the line to
name in the error. Features become a torch sparse CSR matrix [N, F] float32 (columns sorted within
each row), labels a LongTensor [N, Lmax] padded with -1 (see mhe_scale.labels.targets).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mhe_scale.labels.codec import PAD
from mhe_scale.labels.targets import pad_label_lists


@dataclass
class XCData:
    """A dataset read from an XC-format file.

    features: sparse CSR float32 [N, F] (None when read with features=False).
    labels: LongTensor [N, Lmax] of label ids, rows padded with -1 (Lmax >= 1).
    """

    features: Tensor | None
    labels: Tensor
    num_features: int
    num_labels: int

    @property
    def num_points(self) -> int:
        return int(self.labels.shape[0])


def read_xc_format(path: str | os.PathLike, features: bool = True) -> XCData:
    """Read an XC-format file [N, F] with L labels.

    features=False parses (and checks) only the labels, e.g. for evaluation; features is then None.
    """
    path = Path(path)
    header, *body = _read_lines(path) or [""]
    n, nf, nl = _parse_header(path, header)
    while len(body) > n and not body[-1].strip():  # tolerate blank lines at the end of the file
        body.pop()
    if len(body) != n:
        raise ValueError(f"{path}: header says N={n} points but {len(body)} lines follow it; "
                         f"fix the header's first number or the data lines")
    lab_fields: list[str] = []
    lab_counts: list[int] = []
    feat_tokens: list[str] = []
    feat_counts: list[int] = []
    for line in body:  # one split per line; every conversion below is in bulk
        toks = line.split()
        if toks and not line[0].isspace() and ":" not in toks[0]:
            lab_fields.append(toks[0])
            lab_counts.append(toks[0].count(",") + 1)
            toks = toks[1:]
        else:
            lab_counts.append(0)
        if features:
            feat_tokens += toks
            feat_counts.append(len(toks))
    try:
        labels = np.fromiter(map(int, ",".join(lab_fields).split(",")), np.int64) if lab_fields else np.zeros(0, np.int64)
        if features:
            text = " ".join(feat_tokens)
            if not _all_id_value(text, len(feat_tokens)):
                raise ValueError("a feature token is not 'id:value'")
            parts = text.replace(":", " ").split()
            cols = np.fromiter(map(int, parts[0::2]), np.int64, count=len(feat_tokens))
            with np.errstate(over="ignore"):  # overflow to inf is reported by _check_finite with its line
                values = np.fromiter(map(float, parts[1::2]), np.float32, count=len(feat_tokens))
    except ValueError:
        _raise_first_bad_token(path, body)
        raise
    lab_offsets = _offsets(lab_counts)
    _check_ids(path, labels, lab_offsets, nl, "label", "fix the id or the header's label count L")
    out = XCData(None, _pad(labels, lab_offsets), nf, nl)
    if features:
        feat_offsets = _offsets(feat_counts)
        _check_ids(path, cols, feat_offsets, nf, "feature", "fix the id or the header's feature count F")
        _check_finite(path, cols, values, feat_offsets)
        out.features = _csr(path, cols, values, feat_offsets, n, nf)
    return out


def read_label_lists(path: str | os.PathLike, num_labels: int | None = None) -> Tensor:
    """Plain label file, one line of comma-separated ids per point (empty line = no labels).

    Returns LongTensor [N, Lmax] padded with -1; ids are checked against num_labels when given.
    """
    path = Path(path)
    body = _read_lines(path)
    fields = [line.strip() for line in body]
    counts = [field.count(",") + 1 if field else 0 for field in fields]
    try:
        labels = np.fromiter(map(int, ",".join(f for f in fields if f).split(",")), np.int64) if any(counts) else np.zeros(0, np.int64)
    except ValueError:
        for lineno, field in enumerate(fields, start=1):
            for tok in field.split(",") if field else ():
                if not _is_int(tok):
                    raise ValueError(f"{path}:{lineno}: unparsable label id {tok!r}; a line holds comma-separated "
                                     f"0-based label ids such as '3,17,42' (empty line = no labels)") from None
        raise
    offsets = _offsets(counts)
    _check_ids(path, labels, offsets, num_labels, "label", "fix the id or the number of labels", first_line=1)
    return _pad(labels, offsets)


def write_xc_format(path: str | os.PathLike, features: Tensor, labels: Tensor | Sequence[Sequence[int]],
                    num_features: int | None = None, num_labels: int | None = None) -> None:
    """Write features [N, F] (dense or sparse) and labels ([N, L] padded with -1, or lists) as XC format.

    num_features defaults to F, num_labels to max label id + 1. Values keep 9 significant digits
    (float32 round-trips exactly).
    """
    if not isinstance(labels, Tensor):
        labels = pad_label_lists(labels)
    if labels.dim() == 1:
        labels = labels.unsqueeze(1)
    with _quiet_sparse():
        csr = (features if features.layout == torch.sparse_csr else features.to_sparse_csr()).cpu()
    n, f = csr.shape
    if labels.shape[0] != n:
        raise ValueError(f"features have {n} rows but labels have {labels.shape[0]}; pass one label row per point")
    num_features = f if num_features is None else int(num_features)
    num_labels = int(labels.max()) + 1 if num_labels is None else int(num_labels)
    if num_features < f:
        raise ValueError(f"num_features={num_features} is smaller than the feature matrix width {f}")
    bad = (labels >= num_labels) | (labels < PAD)
    if bool(bad.any()):
        raise ValueError(f"label {int(labels[bad][0])} is outside [0, {num_labels}); raise num_labels")
    crow, col, val = csr.crow_indices().tolist(), csr.col_indices().tolist(), csr.values().float().tolist()
    lines = [f"{n} {num_features} {num_labels}"]
    for i, row in enumerate(labels.tolist()):  # writer for tests and synthetic data, not a hot path
        lab = ",".join(str(y) for y in row if y != PAD)
        feats = " ".join(f"{c}:{v:.9g}" for c, v in zip(col[crow[i]:crow[i + 1]], val[crow[i]:crow[i + 1]]))
        lines.append(f"{lab} {feats}" if feats else (lab or " "))
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def format_predictions(scores: Tensor, ids: Tensor) -> list[str]:
    """Lines of `read_predictions`' format for scores / ids [N, K] (best first; ids < 0 are padding, left out)."""
    lines = []
    for row_scores, row_ids in zip(scores.float().tolist(), ids.tolist()):
        lines.append(" ".join(f"{i}:{v:.6g}" for i, v in zip(row_ids, row_scores) if i >= 0))
    return lines


def read_predictions(path: str | os.PathLike) -> tuple[Tensor, Tensor | None]:
    """Ranked predictions, one line per point: space-separated 'id:score' pairs, best first.

    Bare ids without scores are accepted too (the order is the ranking), but not mixed with pairs
    in one file; an empty line means no predictions. Scores must not increase along a line and must
    not be nan.
    Returns ids LongTensor [N, K] padded with -1 and scores float32 [N, K] padded with -inf
    (None for a file of bare ids).
    """
    path = Path(path)
    body = _read_lines(path)
    tokens: list[str] = []
    counts: list[int] = []
    for line in body:  # one split per line; conversions in bulk
        toks = line.split()
        tokens += toks
        counts.append(len(toks))
    text = " ".join(tokens)
    scored = ":" in text
    try:
        if scored and not _all_id_value(text, len(tokens)):
            raise ValueError("not every token is 'id:score'")
        parts = text.replace(":", " ").split()
        ids = np.fromiter(map(int, parts[0::2] if scored else parts), np.int64, count=len(tokens))
        scores = np.fromiter(map(float, parts[1::2]), np.float32, count=len(tokens)) if scored else None
    except ValueError:
        for lineno, line in enumerate(body, start=1):
            for tok in line.split():
                fid, sep, value = tok.partition(":")
                if not (_is_int(fid) and (sep == ":") == scored and (not scored or _is_float(value))):
                    form = "'id:score' pairs such as '17:0.93'" if scored else "bare label ids"
                    raise ValueError(f"{path}:{lineno}: unparsable prediction {tok!r}; this file holds {form} "
                                     f"(use one form for the whole file), best first, separated by spaces") from None
        raise
    offsets = _offsets(counts)
    _check_ids(path, ids, offsets, None, "predicted label", "leave missing predictions out", first_line=1)
    ids_t = _pad(ids, offsets)
    if scores is None:
        return ids_t, None
    score_t = _pad(scores.astype(np.float64), offsets, fill=float("-inf")).float()
    if bool(torch.isnan(score_t).any()):
        raise ValueError(f"{path}:{int(torch.isnan(score_t).any(1).nonzero()[0]) + 1}: a score is nan; the ranking "
                         f"and any threshold need numbers (did the model diverge?)")
    rising = (score_t[:, 1:] > score_t[:, :-1]) & (ids_t[:, 1:] >= 0)
    if bool(rising.any()):
        row = int(rising.any(1).nonzero()[0])
        raise ValueError(f"{path}:{row + 1}: scores increase along the line; write each line's pairs best first "
                         f"(sorted by score, descending)")
    return ids_t, score_t


def _read_lines(path: Path) -> list[str]:
    """The file's lines (UTF-8; a leading byte-order mark is dropped); a byte that is not UTF-8
    raises ValueError naming path:line (a binary or compressed file, or another encoding)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as err:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):  # error path only: find the line to name
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as line_err:
                    raise ValueError(f"{path}:{lineno}: byte {raw[line_err.start:line_err.start + 1]!r} at column "
                                     f"{line_err.start + 1} is not UTF-8 text; this reader takes plain text files "
                                     f"(is it binary, compressed or in another encoding? decompress or re-encode "
                                     f"it as UTF-8)") from None
        raise ValueError(f"{path}: not UTF-8 text ({err.reason}); re-encode it as UTF-8") from None


def _check_finite(path: Path, cols: np.ndarray, values: np.ndarray, offsets: np.ndarray) -> None:
    """Raise naming the line and feature of the first nan/inf value (float32 overflow included)."""
    bad = ~np.isfinite(values)
    if bad.any():
        j = int(np.argmax(bad))
        lineno = int(np.searchsorted(offsets, j, side="right")) - 1 + 2
        raise ValueError(f"{path}:{lineno}: feature {int(cols[j])} has value {float(values[j])}, not a finite "
                         f"float32 (nan, inf, or |v| > 3.4e38); it would turn the loss into nan: fix or drop it")


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _parse_header(path: Path, header: str) -> tuple[int, int, int]:
    parts = header.split()
    if len(parts) != 3 or not all(_is_int(p) and int(p) >= 0 for p in parts):
        raise ValueError(f"{path}:1: bad header {header.strip()!r}; the first line must be 'N F L' (three "
                         f"non-negative integers: points, features, labels), e.g. '4880 1836 159'")
    n, nf, nl = (int(p) for p in parts)
    return n, nf, nl


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _all_id_value(text: str, count: int) -> bool:
    """True iff `text` is `count` tokens 'a:b' joined by single spaces, a and b non-empty (vectorised)."""
    if count == 0:
        return True
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    pos = np.flatnonzero((raw == ord(" ")) | (raw == ord(":")))
    seps = raw[pos]
    return (len(pos) == 2 * count - 1 and bool((seps[0::2] == ord(":")).all())
            and bool((seps[1::2] == ord(" ")).all()) and pos[0] > 0
            and pos[-1] < len(raw) - 1 and bool((np.diff(pos) > 1).all()))


def _raise_first_bad_token(path: Path, body: list[str]) -> None:
    """Slow pass that names the first token the bulk conversion choked on."""
    for lineno, line in enumerate(body, start=2):
        toks = line.split()
        if toks and not line[0].isspace() and ":" not in toks[0]:
            for tok in toks[0].split(","):
                if not _is_int(tok):
                    raise ValueError(f"{path}:{lineno}: unparsable label id {tok!r} in {toks[0]!r}; the label "
                                     f"field is comma-separated 0-based ids such as '3,17,42'") from None
            toks = toks[1:]
        for tok in toks:
            fid, sep, value = tok.partition(":")
            try:
                int(fid), float(value)
                ok = bool(sep)
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{path}:{lineno}: unparsable feature token {tok!r}; features are "
                                 f"'feature_id:value' pairs such as '12:0.5' separated by spaces") from None


def _offsets(counts: list[int]) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _check_ids(path: Path, ids: np.ndarray, offsets: np.ndarray, limit: int | None, what: str, fix: str,
               first_line: int = 2) -> None:
    """Raise naming the line of the first id outside [0, limit) (only the sign is checked if limit is None)."""
    bad = (ids < 0) if limit is None else ((ids < 0) | (ids >= limit))
    if bad.any():
        j = int(np.argmax(bad))
        lineno = int(np.searchsorted(offsets, j, side="right")) - 1 + first_line
        bound = "ids are 0-based" if limit is None else f"the valid ids are 0..{limit - 1}"
        raise ValueError(f"{path}:{lineno}: {what} id {int(ids[j])} is out of range ({bound}); {fix}")


def _pad(labels: np.ndarray, offsets: np.ndarray, fill: float = PAD) -> Tensor:
    """Flat values + row offsets [N+1] -> [N, max(1, Lmax)] padded with `fill` (-1 for ids)."""
    counts = np.diff(offsets)
    width = max(1, int(counts.max(initial=0)))
    out = np.full((len(counts), width), fill, labels.dtype)
    rows = np.repeat(np.arange(len(counts)), counts)
    out[rows, np.arange(len(labels)) - offsets[rows]] = labels
    return torch.from_numpy(out)


def _csr(path: Path, cols: np.ndarray, values: np.ndarray, offsets: np.ndarray, n: int, nf: int) -> Tensor:
    """Sort columns within rows, reject repeated feature ids, build torch sparse CSR [n, nf]."""
    rows = np.repeat(np.arange(n), np.diff(offsets))
    order = np.lexsort((cols, rows))
    cols, values = cols[order], values[order]
    repeat = (cols[1:] == cols[:-1]) & (rows[1:] == rows[:-1])
    if repeat.any():
        j = int(np.argmax(repeat))
        raise ValueError(f"{path}:{int(rows[j]) + 2}: feature id {int(cols[j])} appears twice on this line; "
                         f"keep one 'id:value' pair per feature")
    with _quiet_sparse():
        return torch.sparse_csr_tensor(torch.from_numpy(offsets), torch.from_numpy(cols), torch.from_numpy(values),
                                       size=(n, nf), dtype=torch.float32, check_invariants=False)


@contextmanager
def _quiet_sparse() -> Iterator[None]:
    """Silence torch's 'sparse CSR support is in beta' notice (a notice, not a problem here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield
