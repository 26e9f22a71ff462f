"""Row-sparse SGD / AdamW against torch's dense optimizers on the dense (zero-filled) gradient."""

from __future__ import annotations

import math

import pytest
import torch

from mhe_scale.optim import RowSparseAdamW, RowSparseSGD, enable_row_sparse, gather_rows, refresh_all, row_sparse_leaves

R, D = 12, 5


def _schedule(steps: int) -> list[list[int]]:
    """Rows touched per step: row 0 every step, row 1 never, others skipped then touched."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        rows = sorted({0, *torch.randperm(R - 2, generator=g)[:3].add(2).tolist()})
        out.append(rows)
    return out


def _weight(sparse: bool) -> tuple[torch.nn.Parameter, torch.Tensor]:
    """The [R, D] weight (row-sparse when asked) and the target its rows are pulled to."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(R, D))
    if sparse:
        enable_row_sparse(w)
    return w, torch.randn(R, D, generator=torch.Generator().manual_seed(1))


def _run(kind: str, sparse: bool, steps: int = 9, eps: float = 1e-30, accumulate: int = 1) -> torch.Tensor:
    w, target = _weight(sparse)
    if kind == "sgd":
        cls = RowSparseSGD if sparse else torch.optim.SGD
        opt = cls([w], lr=0.1, momentum=0.9, weight_decay=0.05)
    else:
        cls = RowSparseAdamW if sparse else torch.optim.AdamW
        opt = cls([w], lr=0.05, betas=(0.9, 0.99), eps=eps, weight_decay=0.1)
    for rows in _schedule(steps):
        ids = torch.tensor(rows)
        for _ in range(accumulate):  # micro-batches share rows: grads must sum
            picked = gather_rows(w, ids, unique=True) if sparse else w[ids]
            ((picked - target[ids]) ** 2).sum().div(accumulate).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return refresh_all(w).detach().clone()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_sparse_equals_dense_with_exact_catch_up(kind: str, accumulate: int) -> None:
    dense, sparse = _run(kind, False, accumulate=accumulate), _run(kind, True, accumulate=accumulate)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-7)


def test_adamw_default_eps_is_close_to_dense() -> None:
    """With eps=1e-8 the catch-up scales eps like sqrt(v) (documented): close, not bitwise."""
    dense, sparse = _run("adamw", False, eps=1e-8), _run("adamw", True, eps=1e-8)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


def _naive_adamw_rule(p, m, v, k, s0, lr, b1, b2, eps, wd):
    """The documented skipped-step rule applied one step at a time (scalar loop)."""
    for j in range(1, k + 1):
        s = s0 + j
        p = p * (1 - lr * wd)
        mj, vj = m * b1 ** j, v * b2 ** j
        vhat = vj / (1 - b2 ** s)
        p = p - lr * (mj / (1 - b1 ** s)) / (vhat.sqrt() + eps * (vhat / v).sqrt())
    return p, m * b1 ** k, v * b2 ** k


def test_adamw_follows_documented_rule_with_eps() -> None:
    w = torch.nn.Parameter(torch.randn(3, D, dtype=torch.float64))
    enable_row_sparse(w)
    opt = RowSparseAdamW([w], lr=0.01, betas=(0.8, 0.95), eps=1e-2, weight_decay=0.3)
    gather_rows(w, torch.tensor([0, 1]), unique=True).pow(2).sum().backward()
    opt.step(); opt.zero_grad()
    state = opt.state[w]
    p0, m0, v0 = w.detach()[1].clone(), state["exp_avg"][1].clone(), state["exp_avg_sq"][1].clone()
    for _ in range(6):  # row 1 skipped 6 steps, row 0 touched
        gather_rows(w, torch.tensor([0]), unique=True).pow(2).sum().backward()
        opt.step(); opt.zero_grad()
    refresh_all(w)
    p, m, v = _naive_adamw_rule(p0, m0, v0, 6, 1, 0.01, 0.8, 0.95, 1e-2, 0.3)
    torch.testing.assert_close(w.detach()[1], p, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["exp_avg_sq"][1], v, rtol=1e-10, atol=1e-12)


def test_untouched_rows_are_not_read_or_written_until_needed() -> None:
    w = torch.nn.Parameter(torch.randn(R, D))
    enable_row_sparse(w)
    opt = RowSparseSGD([w], lr=0.1, momentum=0.9, weight_decay=0.1)
    before = w.detach().clone()
    for _ in range(3):
        gather_rows(w, torch.tensor([0, 2]), unique=True).sum().backward()
        opt.step(); opt.zero_grad()
    assert torch.equal(w.detach()[3:], before[3:])  # lazy: stale until read
    assert opt.state[w]["row_step"].tolist()[:4] == [3, 0, 3, 0]
    refresh_all(w)
    assert not torch.equal(w.detach()[3:], before[3:])  # weight decay caught up
    assert opt.state[w]["row_step"].min().item() == 3


def test_clip_leaves_hold_the_summed_row_gradient() -> None:
    w = torch.nn.Parameter(torch.zeros(R, D))
    enable_row_sparse(w)
    RowSparseSGD([w], lr=0.1)
    gather_rows(w, torch.tensor([1, 2]), unique=True).sum().backward()
    gather_rows(w, torch.tensor([2, 5, 2])).sum().backward()  # duplicates inside one gather too
    (leaf,) = row_sparse_leaves([w])
    dense = torch.zeros(R, D)
    dense.index_add_(0, torch.tensor([1, 2, 2, 5, 2]), torch.ones(5, D))
    assert math.isclose(leaf.grad.norm().item(), dense.norm().item(), rel_tol=1e-6)


def test_dense_optimizer_state_is_refused_with_the_fix() -> None:
    w = torch.nn.Parameter(torch.zeros(R, D))
    dense = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones(R, D)
    dense.step()
    enable_row_sparse(w)
    sparse = RowSparseSGD([w], lr=0.1, momentum=0.9)
    sparse.load_state_dict(dense.state_dict())
    with pytest.raises(ValueError, match="head_update=dense"):
        gather_rows(w, torch.tensor([1]), unique=True)


def _run_scheduled(kind: str, sparse: bool, steps: int = 12, catch_up: str = "closed_form",
                   eps: float = 1e-30) -> torch.Tensor:
    """_run's rows and loss, with a LambdaLR (warm-up then cosine) on the optimizer; the row-sparse one
    is told the schedule (as the engine's ShardedHeadTraining does)."""
    w, target = _weight(sparse)
    extra = {"catch_up": catch_up} if sparse else {}
    if kind == "sgd":
        opt = (RowSparseSGD if sparse else torch.optim.SGD)([w], lr=0.1, momentum=0.9, weight_decay=0.05, **extra)
    elif kind == "sgd_plain":
        opt = (RowSparseSGD if sparse else torch.optim.SGD)([w], lr=0.1, momentum=0.0, weight_decay=0.05, **extra)
    else:
        opt = (RowSparseAdamW if sparse else torch.optim.AdamW)([w], lr=0.05, betas=(0.9, 0.99), eps=eps,
                                                                weight_decay=0.1, **extra)

    def factor(s: int) -> float:
        return (s + 1) / 3 if s < 3 else 0.5 * (1 + math.cos(math.pi * (s - 3) / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if sparse:
        opt.set_lr_schedule(lambda index, t: scheduler.base_lrs[index] * scheduler.lr_lambdas[index](t - 1))
    for rows in _schedule(steps):
        ids = torch.tensor(rows)
        picked = gather_rows(w, ids, unique=True) if sparse else w[ids]
        ((picked - target[ids]) ** 2).sum().backward()
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
    return refresh_all(w).detach().clone()


@pytest.mark.parametrize("kind", ["sgd", "sgd_plain", "adamw"])
def test_catch_up_is_exact_under_a_schedule(kind: str) -> None:
    """Skipped rows are caught up with each skipped step's own lr (a warm-up + cosine schedule): equal to
    the dense update; without the schedule the catch-up would use the current lr (documented gap)."""
    dense, sparse = _run_scheduled(kind, False), _run_scheduled(kind, True)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["sgd", "sgd_plain", "adamw"])
def test_replay_catch_up_is_the_dense_update_bit_for_bit(kind: str) -> None:
    """catch_up="replay" applies each skipped step through the touched rows' own float32 operations (torch's):
    the weights equal torch's dense optimizer exactly (torch.equal) under warm-up + cosine, AdamW with its
    default eps included; the closed form rounds differently (within 1e-6 above, not bitwise)."""
    dense = _run_scheduled(kind, False, eps=1e-8)
    assert torch.equal(_run_scheduled(kind, True, catch_up="replay", eps=1e-8), dense)


def test_replay_catch_up_keeps_rows_lazy_and_refuses_unknown_modes() -> None:
    """Replay still reads a skipped row only when it is needed (row_step stays behind until then), and hands
    the gather the caught-up rows in the order asked for."""
    w, _ = _weight(True)
    opt = RowSparseSGD([w], lr=0.1, momentum=0.9, weight_decay=0.05, catch_up="replay")
    for ids in ([0, 3], [3], [3]):
        gather_rows(w, torch.tensor(ids), unique=True).sum().backward()
        opt.step()
        opt.zero_grad()
    (state,) = opt.state.values()
    assert state["row_step"][[0, 3, 5]].tolist() == [1, 3, 0]
    reference = w.detach().clone()
    rows = gather_rows(w, torch.tensor([5, 0, 3]), unique=True)  # rows 5 and 0 are 3 and 2 steps behind
    assert torch.equal(rows[2], reference[3]) and not torch.equal(rows[1], reference[0])
    assert torch.equal(rows, w.detach()[[5, 0, 3]])  # written back, returned in the asked order
    assert state["row_step"][[0, 3, 5]].tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="catch_up='lazy'"):
        RowSparseSGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, catch_up="lazy")


def test_a_full_refresh_catches_up_in_bounded_chunks(monkeypatch) -> None:
    """refresh_all (eval, save) catches skipped rows up REFRESH_CHUNK_ROWS at a time (bounded transient
    memory), with the same result as all at once."""
    import mhe_scale.optim.row_sparse as row_sparse

    whole = _run("sgd", True)  # chunk 65,536 >> R: one call
    seen: list[int] = []
    original = row_sparse.RowSparseSGD._apply_skipped

    def spy(self, p, row_ndim, state, group, ids, *rest):
        seen.append(ids.numel())
        return original(self, p, row_ndim, state, group, ids, *rest)

    monkeypatch.setattr(row_sparse, "REFRESH_CHUNK_ROWS", 3)
    monkeypatch.setattr(row_sparse.RowSparseSGD, "_apply_skipped", spy)
    chunked = _run("sgd", True)
    assert torch.equal(chunked, whole)
    assert max(seen) <= 4  # a step gathers <= 4 rows; the final full refresh reads at most 3 at a time
    assert seen[-1] <= 3 and len(seen) > 9  # the final refresh took several chunks
