"""`mhe-scale plan`: set-ups keep the global batch, head advice, probe bookkeeping, and files the engine runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mhe_scale.plan import probe
from mhe_scale.plan.advice import head_costs, mhc_groups, recommend
from mhe_scale.plan.candidates import PlanContext, Setup, breakdown, enumerate_setups, rank
from mhe_scale.plan.cli import parse_size
from mhe_scale.plan.memory import ActivationLine, HeadSpec

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo" / "mhp_synthetic.yaml")
SMALL = ["data.num_classes=1000", "data.num_train=256", "data.num_test=32", "train.epochs=1", "train.batch_size=32",
         "eval.baseline=null", "model.hidden=32", "model.num_features=16", "train.threads=1"]


def _ctx(**kw) -> PlanContext:
    lines = {(p, False): ActivationLine(1e6, 1e5) for p in ("fp32", "bf16")}
    return PlanContext(2_000_000, 500_000, lines, **kw)


def _base(world=4, b=64, accum=2) -> Setup:
    head = HeadSpec("fc", 100_000, 128, sharded=True)
    return Setup(world, b, accum, None, False, False, "fp32", False, head, "fc")


def test_setups_keep_global_batch_and_valid_offload():
    base = _base()
    setups = enumerate_setups(base, _ctx(gpus_per_node=2))
    assert len(setups) > 100
    assert {s.global_batch for s in setups} == {512}
    assert {s.world for s in setups} == {2, 4, 8}
    assert not any(s.offload_param and s.zero_stage != 3 for s in setups)
    assert not any(s.offload_optimizer and not s.zero_stage for s in setups)


def test_ranking_puts_fitting_setups_first_and_they_fit():
    base, ctx = _base(), _ctx()
    ranked = rank(enumerate_setups(base, ctx), ctx, 1.3 * 2 ** 30, base)
    fits = [r.fits for r in ranked]
    assert fits[0] and fits == sorted(fits, reverse=True)
    for r in ranked[:20]:
        assert r.peak == breakdown(r.setup, ctx).device and (r.peak <= 1.3 * 2 ** 30) == r.fits
    assert ranked[0].setup.head_label == "fc"  # the config's head is kept when it fits
    assert ranked[0].setup.world == base.world  # and the machines asked for


@pytest.mark.parametrize("c", [53, 159])
def test_small_c_full_fc_is_smaller_than_mhc(c):
    """At small C the MHE heads save nothing: the real MHC head (meta device) is larger than the real FC."""
    from mhe_scale.heads import create_head

    d = 768
    with torch.device("meta"):
        fc = create_head("fc", in_features=d, num_classes=c)
        mhc = create_head("mhc", in_features=d, num_classes=c, num_groups=mhc_groups(c, 1))
    assert sum(p.numel() for p in mhc.parameters()) > sum(p.numel() for p in fc.parameters())
    costs = head_costs(c, d, 1, 32)
    assert recommend(costs, 2 ** 30).startswith("full FC fits")


def test_mhc_group_rule_fills_groups_and_is_near_sqrt():
    for c, k in [(2_059_906, 1), (670_091, 10), (3993, 10), (159, 1)]:
        g = mhc_groups(c, k)
        assert -(-c // -(-c // g)) == g  # the labels fill exactly G groups
        assert 0.5 < g / (k * c) ** 0.5 < 2.0


def test_large_c_advice_picks_a_cheaper_head_when_fc_does_not_fit():
    costs = head_costs(2_059_906, 512, 8, 128)
    fc = next(c for c in costs if c.label == "fc")
    line = recommend(costs, fc.total / 2)
    assert line.startswith("full FC needs") and "fits at" in line


def test_small_group_mhs_is_offered_and_narrower_than_partial_fc_at_large_c():
    """At 2,059,906 classes on 8 ranks with 128 rows each, MHS with 32-member groups scores at most
    1,024 groups x 32 columns over all ranks, Partial FC 0.1 206K: its logits are far smaller."""
    costs = {c.label: c for c in head_costs(2_059_906, 512, 8, 128)}
    small = costs["mhs [64373, 32]"]
    assert small.spec.sizes == (64373, 32) and 64373 * 32 >= 2_059_906
    assert small.logits_bytes < costs["partial_fc 0.1"].logits_bytes / 10
    assert "mhs [64373, 32]" not in {c.label for c in head_costs(100_000 // 25, 512, 8, 128)}  # small C: square only


def test_counts_below_one_are_refused_naming_the_flag(capsys):
    from mhe_scale.plan.cli import parse_args

    for argv in (["c.yaml", "--gpus", "0"], ["c.yaml", "--nodes", "-1"], ["c.yaml", "--probe-steps", "0"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert f"{argv[1]} must be >= 1" in capsys.readouterr().err
    assert parse_args(["c.yaml", "--gpus", "8"]).gpus == 8


def test_parse_size():
    assert parse_size("80GB") == 80 * 2 ** 30 and parse_size("512MiB") == 512 * 2 ** 20 and parse_size("24g") == 24 * 2 ** 30
    with pytest.raises(ValueError, match="--gpu-mem"):
        parse_size("lots")


def test_fit_recovers_a_planted_activation_line():
    ctx = _ctx(device="cpu")
    a, b = replace(_base(), micro_batch=32, accum=4), _base()

    def measured(s: Setup) -> float:  # everything but activations/runtime, plus a planted 5 MB + 0.3 MB * b
        terms = [t for t in breakdown(s, ctx).terms if t.name not in ("activations", "runtime", "process group")]
        return sum(t.device + t.host for t in terms) + 5e6 + 3e5 * s.micro_batch

    rows = [probe.ProbeResult(s, "ok", measured(s)) for s in (a, b)]
    line = probe.fit_activations(rows[0], rows[1], ctx)
    assert line.base == pytest.approx(5e6) and line.per_sample == pytest.approx(3e5)
    third = replace(_base(), micro_batch=16, accum=8)
    out = probe.fit_and_predict(rows + [probe.ProbeResult(third, "ok", measured(third))], ctx)
    assert out[2].predicted == pytest.approx(out[2].peak) and not out[2].fitted_on and out[0].fitted_on


def test_rows_use_the_line_of_their_world_size_and_the_measured_process_group():
    """Planted: each rank of a W > 1 run costs 70 MB more than one process (the process group). Lines fitted at
    W = 1 and W = 2 predict a different W = 2 set-up exactly, and a W = 4 row from the W = 1 line + 70 MB."""
    ctx = _ctx(device="cpu")

    def measured(s: Setup) -> float:
        terms = [t for t in breakdown(s, ctx).terms if t.name not in ("activations", "runtime", "process group")]
        return sum(t.device + t.host for t in terms) + 5e6 + 3e5 * s.micro_batch + (70e6 if s.world > 1 else 0.0)

    mhp = HeadSpec("mhp", 100_000, 128)
    fit = [Setup(w, b, 256 // (w * b), 2, False, False, "fp32", False, mhp, "mhp") for w in (1, 2) for b in (32, 128)]
    others = [replace(_base(world=2, b=64, accum=2), zero_stage=2),
              replace(_base(world=4, b=32, accum=2), zero_stage=3)]
    rows = [probe.ProbeResult(s, "ok", measured(s)) for s in fit + others]
    lines, used = probe.fit_lines(rows, ctx)
    assert set(lines) == {("fp32", False, 1), ("fp32", False, 2)} and used == {0, 1, 2, 3}
    assert probe.process_group_cost(lines, ("fp32", False, 2)) == pytest.approx(70e6)
    out = probe.fit_and_predict(rows, ctx)
    assert [r.fitted_on for r in out] == [True] * 4 + [False] * 2
    for r in out:
        assert r.predicted == pytest.approx(r.peak)


def test_process_group_term_only_with_several_ranks():
    from mhe_scale.plan.memory import CPU_PROCESS_GROUP_BYTES, EngineSpec, RunSpec, estimate

    head = HeadSpec("fc", 1000, 16)
    run = RunSpec(1e6, 1e5, EngineSpec(zero_stage=2, device="cpu"), head, world=1, micro_batch=8)
    assert "process group" not in [t.name for t in estimate(run).terms]
    two = estimate(replace(run, world=2))
    assert two.get("process group").device == CPU_PROCESS_GROUP_BYTES
    assert estimate(replace(run, world=2, process_group_bytes=1e6)).get("process group").device == 1e6
    assert "process group" not in [t.name for t in estimate(replace(run, world=2, process_group_bytes=0.0)).terms]


def test_probe_reports_oom_and_failure_without_raising(monkeypatch, tmp_path):
    script = ("import json,os,sys; p=os.environ['MHE_PLAN_PROBE_OUT']; "
              "open(p+'/rank0.json','w').write(json.dumps({'oom': True, 'error': 'CUDA out of memory'})); sys.exit(3)")
    monkeypatch.setattr(probe, "probe_command", lambda s, c, o: [sys.executable, "-c", script])
    assert probe.run_probe(_base(), "x.yaml", [], 30).status == "oom"
    monkeypatch.setattr(probe, "probe_command", lambda s, c, o: [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    assert probe.run_probe(_base(), "x.yaml", [], 30).status == "oom"
    monkeypatch.setattr(probe, "probe_command", lambda s, c, o: [sys.executable, "-c", "raise SystemExit('bad key')"])
    r = probe.run_probe(_base(), "x.yaml", [], 30)
    assert r.status == "failed" and "bad key" in r.detail


def test_plan_writes_files_the_engine_runs(tmp_path, capsys):
    """plan -> deepspeed.json / accelerate.yaml / overrides.txt; the engine trains with them as written (1 process)."""
    from mhe_scale.cli import main

    out = tmp_path / "plan"
    rc = main(["plan", DEMO, *SMALL, f"train.output_dir={tmp_path / 'run'}", "--gpus", "1", "--gpu-mem", "2GB",
               "--device", "cpu", "--zero", "2", "--keep-head", "--precision", "fp32", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "per-rank memory as configured" in text and "accelerate launch --config_file" in text
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == "auto"
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed's silent default would be 1.0
    assert "DEEPSPEED" in (out / "accelerate.yaml").read_text()
    overrides = (out / "overrides.txt").read_text().split()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run([sys.executable, "-m", "mhe_scale.train", DEMO, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "results.json").is_file()
    assert "DeepSpeed" in proc.stdout + proc.stderr or (tmp_path / "run" / "config.yaml").is_file()


def test_probe_timeout_ends_the_process_tree(monkeypatch, tmp_path):
    """A probe over its time is a 'timeout' row; its whole process group is ended (no stray workers)."""
    pid_file = tmp_path / "pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    monkeypatch.setattr(probe, "probe_command", lambda s, c, o: [sys.executable, "-c", script])
    r = probe.run_probe(_base(), "x.yaml", [], 3)
    assert r.status == "timeout"
    grandchild = int(pid_file.read_text())
    import time

    time.sleep(0.5)
    state = Path(f"/proc/{grandchild}/stat")
    assert not state.exists() or state.read_text().split()[2] == "Z"  # gone (or a zombie awaiting its reaper)


def test_unsupported_task_is_one_line_error(capsys):
    from mhe_scale.cli import main

    rc = main(["plan", str(ROOT / "configs" / "xmc" / "bibtex.yaml"), "--gpus", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "synthetic" in err and len(err.strip().splitlines()) == 1


def test_sharded_head_options_update_row_sparsely_as_the_default_does():
    """optim.head_update=auto makes a class-sharded partial_fc / mhc / mhs row-sparse: the planner prices them so."""
    from mhe_scale.plan.advice import head_options

    for world, sparse in ((8, True), (1, False)):
        for label, spec in head_options(2_059_906, 512, world):
            assert spec.row_sparse == (sparse and spec.name in ("partial_fc", "mhc", "mhs")), label


def test_probe_peak_starts_at_fit(monkeypatch):
    """probe_run measures from the engine's fit on: a large tensor freed before fit (the task's data set-up)
    is in setup_rss_peak, not in the peak the memory model is compared with."""
    from mhe_scale.plan import probe_run

    if probe_run.vm_hwm() is None or not probe_run.reset_hwm():
        pytest.skip("no /proc/self/status VmHWM or clear_refs here")
    monkeypatch.setattr(probe_run, "_SETUP_PEAK", [])
    big = torch.ones(64 * 2 ** 20)  # 256 MiB, touched
    del big
    seen = {}
    probe_run._mark_fit(lambda: seen.setdefault("fit", probe_run.vm_hwm()))()
    assert probe_run._SETUP_PEAK[0] - seen["fit"] > 200 * 2 ** 20


def test_out_naming_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    from mhe_scale.cli import main

    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    for out in (taken, taken / "sub"):
        rc = main(["plan", DEMO, *SMALL, "--device", "cpu", "--out", str(out)])
        captured = capsys.readouterr()
        assert rc == 2 and captured.out == ""
        assert captured.err.splitlines() == [f"error: --out {out}: {taken} is a file, not a folder; give a folder for "
                                             "deepspeed.json, accelerate.yaml and overrides.txt (created if missing)"]
    assert taken.read_text() == "mine\n"


def test_a_budget_below_every_set_up_without_its_head_is_refused(tmp_path, capsys):
    """--gpu-mem 1MB printed 'no head fits -1033.7 MiB' and exited 0; now one line naming the flag, exit 2."""
    from mhe_scale.cli import main

    out = tmp_path / "plan"
    rc = main(["plan", DEMO, *SMALL, "--device", "cpu", "--gpu-mem", "1MB", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and not out.exists()
    (line,) = captured.err.splitlines()
    assert line.startswith("error: --gpu-mem=1MB (1.0 MiB per rank) is less than the smallest set-up needs besides "
                           "its head (")
    rc = main(["plan", DEMO, *SMALL, "--device", "cpu", "--gpu-mem", "2GB", "--out", str(out)])
    assert rc == 0 and "no head fits -" not in capsys.readouterr().out and (out / "overrides.txt").is_file()
