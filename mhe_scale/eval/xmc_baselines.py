"""Reference predictors of XMC benchmarks, over the same sparse features the heads see.

All return (scores [M, top], ids [M, top]) best first, so the same metrics and the same micro-F1
threshold tuning apply to them as to a trained head.

  most frequent   every row gets the `top` most frequent training labels, score = training frequency.
  kNN             label votes of the k most similar training rows: score(l) = sum over the k nearest
                  rows j (cosine = dot product of L2-normalised TF-IDF rows) of sim_j * [l in y_j].
  OvR ridge       one least-squares linear model per label on the multi-hot targets,
                  W = (X^T X + lambda I)^(-1) X^T Y (scikit-learn Ridge, Cholesky, no intercept): each
                  label's column is its own one-vs-rest model, all solved with one factorisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def to_scipy(crow: Tensor, col: Tensor, values: Tensor, num_features: int) -> Any:
    """CSR parts (as XMCDataset stores them) -> scipy.sparse.csr_matrix float32 [N, F]."""
    import scipy.sparse

    return scipy.sparse.csr_matrix((values.numpy(), col.numpy(), crow.numpy()), shape=(crow.numel() - 1, num_features))


def multi_hot_csr(targets: Tensor, num_classes: int) -> Any:
    """targets [N, L] padded with -1 -> scipy CSR float32 [N, C] of 0/1 (a repeated label counts once)."""
    import scipy.sparse

    rows, cols = (targets >= 0).nonzero(as_tuple=True)
    m = scipy.sparse.csr_matrix((np.ones(rows.numel(), np.float32), (rows.numpy(), targets[rows, cols].numpy())),
                                shape=(targets.shape[0], num_classes))
    m.data[:] = 1.0  # duplicates were summed
    return m


def most_frequent_labels(label_counts: Tensor, top: int) -> Tensor:
    """Ids [top] of the `top` most frequent labels of label_counts [C], most frequent first (ties: lower id first)."""
    return label_counts.sort(descending=True, stable=True).indices[:top]


def popularity_predictions(label_counts: Tensor, num_rows: int, top: int) -> tuple[Tensor, Tensor]:
    """The `top` most frequent training labels (ties: lower id first) for each of num_rows rows."""
    order = most_frequent_labels(label_counts, top)
    scores = label_counts[order].float()
    return scores.expand(num_rows, -1).clone(), order.expand(num_rows, -1).clone()


def knn_predictions(train_x: Any, train_y: Any, query_x: Any, ks: Sequence[int], top: int,
                    chunk: int = 512) -> dict[int, tuple[Tensor, Tensor]]:
    """{k: (scores, ids)} of the k-nearest-neighbour label votes, for every k in ks at once.

    train_x [N, F], query_x [M, F]: scipy CSR with L2-normalised rows; train_y: scipy CSR [N, C] 0/1.
    Chunks of `chunk` query rows: one sparse product [chunk, N], one top-max(ks), one vote product each k."""
    import scipy.sparse

    kmax = min(max(ks), train_x.shape[0])
    train_t = train_x.T.tocsr()
    out: dict[int, list[tuple[Tensor, Tensor]]] = {k: [] for k in ks}
    for start in range(0, query_x.shape[0], chunk):  # a loop over chunks of rows
        sims = torch.from_numpy((query_x[start:start + chunk] @ train_t).toarray())
        nbr_s, nbr_i = sims.topk(kmax, dim=1)
        n = sims.shape[0]
        for k in ks:
            kk = min(k, kmax)
            w = scipy.sparse.csr_matrix((nbr_s[:, :kk].reshape(-1).numpy(), nbr_i[:, :kk].reshape(-1).numpy(),
                                         np.arange(0, n * kk + 1, kk)), shape=(n, train_x.shape[0]))
            votes = torch.from_numpy((w @ train_y).toarray())
            out[k].append(votes.topk(min(top, votes.shape[1]), dim=1))
    return {k: (torch.cat([s for s, _ in v]), torch.cat([i for _, i in v])) for k, v in out.items()}


def frequent_columns(train_x: Any, num_columns: int) -> np.ndarray:
    """Ids of the num_columns features present in the most training rows (ascending ids)."""
    df = np.bincount(train_x.indices, minlength=train_x.shape[1])
    keep = np.argsort(-df, kind="stable")[:num_columns]
    return np.sort(keep)


def ridge_ovr(train_x: Any, train_y: Any, alpha: float) -> np.ndarray:
    """One-vs-rest least squares on multi-hot targets: coefficients float32 [C, F] (scikit-learn Ridge)."""
    from sklearn.linear_model import Ridge

    model = Ridge(alpha=alpha, fit_intercept=False, solver="cholesky")
    model.fit(train_x, train_y.toarray())
    return np.asarray(model.coef_, dtype=np.float32)


def linear_predictions(x: Any, coef: np.ndarray, top: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """(scores, ids) of the top labels of x [M, F] @ coef.T [F, C], chunk by chunk of rows."""
    parts = []
    for start in range(0, x.shape[0], chunk):
        scores = torch.from_numpy(np.asarray(x[start:start + chunk] @ coef.T))
        parts.append(scores.topk(min(top, scores.shape[1]), dim=1))
    return torch.cat([s for s, _ in parts]), torch.cat([i for _, i in parts])
