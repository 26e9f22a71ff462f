"""SGD (momentum, L2 weight decay) and AdamW that update only the rows a step touched.

Semantics (docs/engine.md, "Row-sparse head updates"). Every row r keeps `row_step[r]`, the
number of optimizer steps its weight and state already reflect; the parameter's `step` counts the
steps taken. A row skipped by k steps (zero gradient in each) is caught up when it is next read
(gather_rows) or stepped, or when the whole parameter is read (refresh_all: eval, predict, save):
  * SGD, torch semantics (buf = mu*buf + g + wd*p; p -= lr*buf): with g = 0 one step is the linear
    map (p, buf) <- A (p, buf), A = [[1 - lr*wd, -lr*mu], [wd, mu]]; k steps are A^k, computed
    exactly (2x2 powers by squaring, float64). Exact with respect to the dense update.
  * AdamW, torch semantics: m <- beta1^k m, v <- beta2^k v exactly; the parameter moves by the sum
    of the k skipped updates, each decayed by (1 - lr*wd), where skipped step s = s0 + j uses
    lr * mhat_s / (sqrt(vhat_s) + eps * sqrt(vhat_s / v_hat0)), i.e. eps scaled like the decayed
    sqrt(v) (mhat, vhat bias-corrected at step s; v_hat0 = v at s0 without correction). That is
    the dense update exactly when eps = 0 and differs by O(eps / sqrt(v)) otherwise; terms with
    beta1^j / beta2^(j/2) < 1e-20 are dropped.
  * The lr of each skipped step: with `set_lr_schedule(lr_at)` (the engine passes its LambdaLR) every
    skipped step t uses lr_at(group, t): SGD multiplies the per-step matrices A_t (one product per
    distinct start, float64), AdamW sums each step's term with its own lr and the later steps' decay
    (1 - lr_u*wd): exact under any schedule. Without it, the group's CURRENT lr stands for every skipped
    step: exact when the lr was constant over the skipped window, an approximation otherwise.
  * catch_up="replay" (optim.head_catch_up) instead applies the k skipped steps one by one, through the
    same float32 operations as a touched row's step (`_update` with a zero gradient, torch's own order):
    bit for bit the dense optimizer, at the dense optimizer's cost for those rows (k passes per row).
    The closed forms above round differently (float64 products, one rounding), so they match the dense
    update to float rounding per catch-up, which a chaotic run (the face configs) amplifies: docs/engine.md.
Parameters not marked row-sparse get the ordinary dense update (same formulas, k = 0).
State tensors shaped like the parameter (momentum_buffer / exp_avg / exp_avg_sq) and row_step
(shape p.shape[:row_ndim]) are per row, so shard checkpoints reshard them with the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from mhe_scale.optim.rows import ROWS_ATTR, RowGradients, rows_of

REFRESH_CHUNK_ROWS = 1 << 16
"""A full refresh (eval, predict, state_dict) catches skipped rows up this many at a time: its transient
copies (4 for SGD with momentum, 7 for AdamW) then cost at most 7 x 65,536 x D x 4 bytes (0.9 GiB at
D = 512) however many rows the shard holds (a 2M-class shard on 8 ranks: 3.4 GiB at once before)."""

ADAM_TAIL = 1e-20
"""AdamW catch-up drops skipped-step terms whose factor beta1^j / beta2^(j/2) is below this."""


def _mat_power(a: Tensor, ks: Tensor) -> Tensor:
    """a [2, 2] float64, ks [K] int64 >= 0 -> a^ks [K, 2, 2] (binary exponentiation, vectorised)."""
    out = torch.eye(2, dtype=a.dtype, device=a.device).expand(ks.numel(), 2, 2).clone()
    base = a.expand(ks.numel(), 2, 2).clone()
    ks = ks.clone()
    while bool((ks > 0).any()):  # log2(max k) iterations, at catch-up only
        odd = (ks & 1).bool()
        out = torch.where(odd[:, None, None], out @ base, out)
        base = base @ base
        ks = ks >> 1
    return out


def _suffix_products(factors: list[float]) -> Tensor:
    """factors f_1..f_W -> float64 [W + 1]: out[i] = f_{i+1} * ... * f_W (out[W] = 1)."""
    f = torch.tensor(factors + [1.0], dtype=torch.float64)
    return torch.flip(torch.cumprod(torch.flip(f, [0]), 0), [0]) if factors else f


def _window_products(lrs: list[float], base: int, step: int, starts: list[int], mu: float, wd: float) -> Tensor:
    """SGD under a schedule: for each start s0 (>= base), A_step ... A_{s0+1} with A_t = [[1 - lr_t wd,
    -lr_t mu], [wd, mu]] and lr_t = lrs[t - base - 1] -> float64 [len(starts), 2, 2]."""
    wanted = set(starts)
    out = {step: (1.0, 0.0, 0.0, 1.0)}
    p00, p01, p10, p11 = 1.0, 0.0, 0.0, 1.0  # A_step ... A_t, built from the latest step backwards
    for t in range(step, base, -1):
        lr = lrs[t - base - 1]
        a00, a01, a10, a11 = 1.0 - lr * wd, -lr * mu, wd, mu
        p00, p01, p10, p11 = (p00 * a00 + p01 * a10, p00 * a01 + p01 * a11,
                              p10 * a00 + p11 * a10, p10 * a01 + p11 * a11)
        if t - 1 in wanted:
            out[t - 1] = (p00, p01, p10, p11)
    return torch.tensor([out[s] for s in starts], dtype=torch.float64).view(-1, 2, 2)


def _adamw_window(lrs: list[float], base: int, step: int, s0: Tensor, horizon: int, b1: float, b2: float,
                  wd: float) -> tuple[Tensor, Tensor]:
    """AdamW's catch-up coefficients per distinct start s0 [K] (float64, >= base), each skipped step
    t = s0+1..step at its own lr_t = lrs[t - base - 1]: (S(s0), R_s0) with
        S(s0) = sum_j R_t lr_t b1^j / b2^(j/2) sqrt(1 - b2^t) / (1 - b1^t),  t = s0 + j, j <= horizon,
        R_t = prod_{u=t+1..step} (1 - lr_u wd)  (the decay of the later steps; R_s0 decays the row).
    A loop over the offsets j with [K] vectors: memory O(K + window)."""
    lr = torch.tensor(lrs, dtype=torch.float64)                         # steps base+1 .. step
    suffix = _suffix_products([1.0 - x * wd for x in lrs])              # suffix[i] = R_{base + i}
    t = torch.arange(base + 1, step + 1, dtype=torch.float64)
    c = suffix[1:] * lr * torch.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)   # R_t lr_t sqrt(1-b2^t)/(1-b1^t)
    total = torch.zeros_like(s0)
    for j in range(1, horizon + 1):
        steps = s0 + j
        term = c[(steps - base - 1).clamp(0, len(lrs) - 1).long()] * ((b1 ** j) / (b2 ** (j / 2)))
        total += torch.where(steps <= step, term, torch.zeros_like(term))
    return total, suffix[(s0 - base).long()]


CATCH_UPS = ("closed_form", "replay")
"""How skipped steps are applied (module doc): closed_form (O(1) passes per row) or replay (bit-exact)."""


class _RowSparseBase(torch.optim.Optimizer):
    """Shared bookkeeping: per-param step, per-row row_step, catch-up hook, sparse/dense dispatch."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], catch_up: str = "closed_form") -> None:
        if catch_up not in CATCH_UPS:
            raise ValueError(f"{type(self).__name__}: catch_up={catch_up!r} is not one of {CATCH_UPS}")
        super().__init__(params, defaults)
        self.catch_up = catch_up
        self._lr_at: Callable[[int, int], float] | None = None
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                rg: RowGradients | None = getattr(p, ROWS_ATTR, None)
                if rg is not None:
                    rg.refresh = self._refresher(p, index)

    def set_lr_schedule(self, lr_at: Callable[[int, int], float] | None) -> None:
        """lr_at(group_index, t) -> the lr that optimizer step t (1-based) of that group uses (the engine
        passes its LambdaLR's base_lr * factor(t - 1)). The catch-up then applies every skipped step at its
        own lr: exact under any schedule. None (default): the group's current lr for every skipped step."""
        self._lr_at = lr_at

    def _window_lrs(self, group: dict[str, Any], first: int, last: int) -> list[float] | None:
        """lrs of steps first..last (inclusive), or None when there is no schedule or they all equal the
        group's current lr (then the constant-lr catch-up is exact)."""
        if self._lr_at is None or last < first:
            return None
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        lrs = [float(self._lr_at(index, t)) for t in range(first, last + 1)]
        now = float(group["lr"])
        return None if all(lr == now for lr in lrs) else lrs

    def _refresher(self, p: Tensor, index: int):
        def refresh(ids: Tensor | None) -> tuple[Tensor, list[Tensor]] | None:
            with torch.no_grad():  # the group is looked up now: load_state_dict / schedules replace its values
                return self._catch_up(p, self.param_groups[index], ids)
        return refresh

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            for key in self._buffers():
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            rg: RowGradients | None = getattr(p, ROWS_ATTR, None)
            if rg is not None:
                state["row_step"] = torch.zeros(p.shape[:rg.row_ndim], dtype=torch.int64, device=p.device)
        missing = [k for k in ("step", *self._buffers()) if k not in state]
        if getattr(p, ROWS_ATTR, None) is not None and "row_step" not in state:
            missing.append("row_step")
        if missing:
            raise ValueError(f"{type(self).__name__}: the loaded optimizer state of a {tuple(p.shape)} parameter lacks "
                             f"{missing} (saved by the dense optimizer?): resume with optim.head_update=dense, or "
                             "start a fresh run to switch to the sparse update")
        if "row_step" in state and state["row_step"].dtype != torch.int64:  # load_state_dict casts to p's dtype
            state["row_step"] = state["row_step"].round().long()
        return state

    def _buffers(self) -> tuple[str, ...]:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts every state tensor to its parameter's dtype: turn the per-row steps back into int64."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "row_step" in state and state["row_step"].dtype != torch.int64:
                state["row_step"] = state["row_step"].round().long()

    def _catch_up(self, p: Tensor, group: dict[str, Any], ids: Tensor | None) -> tuple[Tensor, list[Tensor]] | None:
        """Apply the skipped steps to rows `ids` (None: all rows) so they reflect state["step"] steps.
        For ids: -> (rows [U, ...], [state rows]) caught up (fresh tensors, also written back), or None."""
        state = self._state(p)
        rg: RowGradients = getattr(p, ROWS_ATTR)
        row_step = state["row_step"].view(-1)
        step = int(state["step"])
        if ids is None:
            ids = torch.nonzero(row_step < step).squeeze(1)  # host sync: full refreshes only
            for chunk in ids.split(REFRESH_CHUNK_ROWS):  # bounded transient memory (REFRESH_CHUNK_ROWS)
                self._catch_up(p, group, chunk)
            return None
        last = row_step[ids]
        skipped = step - last
        if skipped.numel() == 0:
            return None
        apply = self._replay_skipped if self.catch_up == "replay" else self._apply_skipped
        caught = apply(p, rg.row_ndim, state, group, ids, last, skipped)
        row_step[ids] = step
        return caught

    def _replay_skipped(self, p: Tensor, row_ndim: int, state: dict[str, Tensor], group: dict[str, Any],
                        ids: Tensor, last: Tensor, skipped: Tensor) -> tuple[Tensor, list[Tensor]]:
        """catch_up="replay": each skipped step t (last < t <= step) through `_update` with a zero gradient at
        that step's lr, rows ordered by their last step so that the rows still behind at t are a prefix:
        the dense optimizer's float32 operations on these rows, in its order (bit for bit). Costs the sum of
        the rows' skipped steps in row passes (the dense optimizer's work on them, deferred); its transient copies
        (the rows and their state, sorted, then in ids' order) are no more than the closed form's."""
        step = int(state["step"])
        order = torch.argsort(last, stable=True)
        ids_sorted, last_sorted = ids.index_select(0, order), last.index_select(0, order)
        view = rows_of(p.data, row_ndim)
        full = [rows_of(state[k], row_ndim) for k in self._buffers()]
        rows = view.index_select(0, ids_sorted)
        bufs = [b.index_select(0, ids_sorted) for b in full]
        first = int(last_sorted[0]) + 1
        behind = torch.searchsorted(last_sorted, torch.arange(first, step + 1, device=last.device)).tolist()  # sync
        lrs = self._window_lrs(group, first, step)
        zero = torch.zeros((), dtype=rows.dtype, device=rows.device)  # expanded: a zero gradient of no memory
        for i, n in enumerate(behind):
            at = group if lrs is None else dict(group, lr=lrs[i])
            self._update(rows[:n], zero.expand_as(rows[:n]), [b[:n] for b in bufs], at, first + i)  # in place
        view.index_copy_(0, ids_sorted, rows)
        for b, nb in zip(full, bufs):
            b.index_copy_(0, ids_sorted, nb)
        del rows, bufs  # written back: read again in ids' own order (what gather_rows hands the step)
        return view.index_select(0, ids), [b.index_select(0, ids) for b in full]

    def _apply_skipped(self, p: Tensor, row_ndim: int, state: dict[str, Tensor], group: dict[str, Any],
                       ids: Tensor, last: Tensor, skipped: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Catch rows `ids` up in p and its state (written back) -> (rows, [state rows]), fresh tensors."""
        raise NotImplementedError

    def _update(self, rows: Tensor, grad: Tensor, bufs: list[Tensor], group: dict[str, Any], step: int) -> tuple:
        """One step of the rule on rows [U, ...] with their gradient, IN PLACE on rows and buffers -> (rows, buffers)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("row-sparse optimizers take no closure")
        for group in self.param_groups:
            for p in group["params"]:
                rg: RowGradients | None = getattr(p, ROWS_ATTR, None)
                if rg is None:
                    if p.grad is None:
                        continue
                    state = self._state(p)
                    t = int(state["step"]) + 1
                    self._update(p.data, p.grad, [state[k] for k in self._buffers()], group, t)  # in place
                    state["step"] += 1
                    continue
                state = self._state(p)
                merged = rg.coalesce()
                if merged is None:
                    state["step"] += 1  # nothing touched: every row is now one step behind
                    continue
                ids, leaf = merged
                if not rg.fresh:  # gather_rows caught these rows up unless it ran before this optimizer existed
                    self._catch_up(p, group, ids)
                t = int(state["step"]) + 1
                view = rows_of(p.data, rg.row_ndim)
                bufs = [rows_of(state[k], rg.row_ndim) for k in self._buffers()]
                cached = rg.cached_state()
                if cached is not None:  # one gather caught these rows up: its leaf and state copies are current
                    rows, buf_rows = leaf.detach(), cached
                else:
                    rows, buf_rows = view.index_select(0, ids), [b.index_select(0, ids) for b in bufs]
                new, new_bufs = self._update(rows, leaf.grad, buf_rows, group, t)
                view.index_copy_(0, ids, new)
                for b, nb in zip(bufs, new_bufs):
                    b.index_copy_(0, ids, nb)
                state["step"] += 1
                state["row_step"].view(-1)[ids] = t

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                rg: RowGradients | None = getattr(p, ROWS_ATTR, None)
                if rg is not None:
                    rg.clear()


class RowSparseSGD(_RowSparseBase):
    """torch.optim.SGD (momentum, dampening 0, no nesterov, L2 weight decay) with row-sparse updates."""

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 catch_up: str = "closed_form") -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"RowSparseSGD: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got lr={lr}, "
                             f"momentum={momentum}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, catch_up)

    def _buffers(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.defaults["momentum"] > 0 else ()

    def _update(self, rows, grad, bufs, group, step):  # in place on rows and bufs (fresh copies or p itself)
        d = grad.add(rows, alpha=group["weight_decay"]) if group["weight_decay"] else grad
        if group["momentum"] > 0:
            buf = bufs[0].mul_(group["momentum"]).add_(d)
            return rows.add_(buf, alpha=-group["lr"]), [buf]
        return rows.add_(d, alpha=-group["lr"]), []

    def _apply_skipped(self, p, row_ndim, state, group, ids, last, skipped):
        lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
        step = int(state["step"])
        view = rows_of(p.data, row_ndim)
        rows = view.index_select(0, ids)  # index_select / index_copy_: faster than [ids] indexing on CPU
        shape = (-1,) + (1,) * (rows.dim() - 1)
        if mu == 0.0:  # p <- prod over the skipped steps of (1 - lr_t*wd) p
            lrs = self._window_lrs(group, step - int(skipped.max()) + 1, step) if self._lr_at is not None else None
            if lrs is None:
                factor = torch.pow(1.0 - lr * wd, skipped.double())
            else:
                suffix = _suffix_products([1.0 - x * wd for x in lrs])  # [W + 1]: prod of steps > first - 1 + i
                factor = suffix.to(skipped.device)[len(lrs) - skipped]
            rows = rows * factor.to(rows.dtype).view(shape)
            view.index_copy_(0, ids, rows)
            return rows, []
        starts, inverse = torch.unique(last, return_inverse=True)
        base = int(starts[0])  # the earliest start: the window is steps base+1 .. step
        lrs = self._window_lrs(group, base + 1, step)
        if lrs is None:  # one lr over the window: A^k by squaring
            a = torch.tensor([[1.0 - lr * wd, -lr * mu], [wd, mu]], dtype=torch.float64, device=p.device)
            m = _mat_power(a, step - starts)[inverse].to(rows.dtype)  # [U, 2, 2]
        else:  # a schedule: A_step ... A_{s0+1} with each step's own lr, one product per distinct start s0
            m = _window_products(lrs, base, step, starts.tolist(), mu, wd).to(p.device)[inverse].to(rows.dtype)
        bufs = rows_of(state["momentum_buffer"], row_ndim)
        buf = bufs.index_select(0, ids)
        new_rows = torch.addcmul(m[:, 0, 0].view(shape) * rows, m[:, 0, 1].view(shape), buf)
        new_buf = buf.mul_(m[:, 1, 1].view(shape)).addcmul_(m[:, 1, 0].view(shape), rows)
        view.index_copy_(0, ids, new_rows)
        bufs.index_copy_(0, ids, new_buf)
        return new_rows, [new_buf]


class RowSparseAdamW(_RowSparseBase):
    """torch.optim.AdamW (no amsgrad) with row-sparse updates (see the module doc for the catch-up)."""

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, catch_up: str = "closed_form") -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"RowSparseAdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}, catch_up)

    def _buffers(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, rows, grad, bufs, group, step):  # in place on rows and bufs (fresh copies or p itself)
        (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
        rows.mul_(1.0 - lr * group["weight_decay"])
        m = bufs[0].lerp_(grad, 1.0 - b1)  # torch.optim.AdamW's operation: the same rounding
        v = bufs[1].mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        denom = (v.sqrt() / math.sqrt(1.0 - b2 ** step)).add_(eps)
        return rows.addcdiv_(m, denom, value=-lr / (1.0 - b1 ** step)), [m, v]

    def _apply_skipped(self, p, row_ndim, state, group, ids, last, skipped):
        (b1, b2), lr, eps = group["betas"], float(group["lr"]), float(group["eps"])
        step = int(state["step"])
        view = rows_of(p.data, row_ndim)
        m_all, v_all = rows_of(state["exp_avg"], row_ndim), rows_of(state["exp_avg_sq"], row_ndim)
        rows, m, v = view.index_select(0, ids), m_all.index_select(0, ids), v_all.index_select(0, ids)
        shape = (-1,) + (1,) * (rows.dim() - 1)
        starts, inverse = torch.unique(last, return_inverse=True)
        base = int(starts[0])  # the earliest start: the window is steps base+1 .. step
        q = b1 / math.sqrt(b2) if b2 > 0 else 0.0
        horizon = step - base if q == 0.0 or q >= 1.0 else \
            min(step - base, int(math.ceil(math.log(ADAM_TAIL) / math.log(q))) + 1)
        lrs = self._window_lrs(group, base + 1, step) or [lr] * (step - base)  # one lr: the current one
        total, decay_starts = (x.to(p.device) for x in _adamw_window(
            lrs, base, step, starts.double().cpu(), horizon, b1, b2, float(group["weight_decay"])))
        coef = total[inverse].to(rows.dtype).view(shape)
        decay = decay_starts[inverse].to(rows.dtype).view(shape)
        new_rows = decay * rows - coef * m / (v.sqrt() + eps)
        m.mul_(torch.pow(b1, skipped.double()).to(m.dtype).view(shape))
        v.mul_(torch.pow(b2, skipped.double()).to(v.dtype).view(shape))
        view.index_copy_(0, ids, new_rows)
        m_all.index_copy_(0, ids, m)
        v_all.index_copy_(0, ids, v)
        return new_rows, [m, v]


def build_row_sparse_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float,
                               momentum: float, catch_up: str = "closed_form") -> torch.optim.Optimizer:
    """optim.name (sgd | adamw) -> its row-sparse version over `groups` (same hyper-parameters as
    the engine's dense optimizers: torch defaults for betas / eps); catch_up: optim.head_catch_up."""
    if name == "sgd":
        return RowSparseSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, catch_up=catch_up)
    if name == "adamw":
        return RowSparseAdamW(groups, lr=lr, weight_decay=weight_decay, catch_up=catch_up)
    raise ValueError(f"optim.name={name!r} has no row-sparse version; choose adamw or sgd")
