"""Row-sparse optimizers for sampled heads (Partial FC, MHS, the MHC label table).

A step of a sampled head reads, updates and stores state only for the rows it touched; rows that
were skipped are brought up to date lazily, when they are next read (see docs/engine.md,
"Row-sparse head updates").
"""

from mhe_scale.optim.row_sparse import RowSparseAdamW, RowSparseSGD, build_row_sparse_optimizer
from mhe_scale.optim.rows import (enable_row_sparse, gather_rows, is_row_sparse, refresh_all, row_sparse_leaves)

__all__ = ["RowSparseAdamW", "RowSparseSGD", "build_row_sparse_optimizer", "enable_row_sparse", "gather_rows",
           "is_row_sparse", "refresh_all", "row_sparse_leaves"]
