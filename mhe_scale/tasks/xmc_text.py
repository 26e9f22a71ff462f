"""XMC on raw text: a HF transformer encoder (last-k [CLS] features) + an MHE head (and optionally a
baseline head, e.g. full BCE `fc`), fine-tuned end to end and scored with P@k, nDCG@k, PSP@k.

    mhe-scale train configs/xmc/reuters_minilm.yaml [head.name=mhp ...]

Data: data.text_format raw | jsonl | reuters (see mhe_scale.data.xmc_text), tokenised once with the
model's own tokenizer into the datasets cache; with data.streaming=true the training split is read
and tokenised as training goes instead (mhe_scale.data.text_stream). The engine's loop feeds the model
(inputs = {input_ids, attention_mask}, targets [B, L] padded with -1): TokenizedTextDataset pads
each batch to its longest member in `__getitems__`, so fit / evaluate need no collate argument.
Output as the other tasks: {output_dir}/config.yaml, results.json, results.md, plus label_map.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mhe_scale.config import ExperimentConfig, HeadConfig
from mhe_scale.data.text_batches import TokenizedTextDataset, tokenize
from mhe_scale.data.text_stream import TextBatchStream, count_rows_and_labels
from mhe_scale.data.xmc_text import (TextFormatError, detect_format, jsonl_label_names, label_names,
                                     load_text_splits, split_rows, write_label_map)
from mhe_scale.tasks.xmc_evaluate import evaluate
from mhe_scale.engine.loop import fit
from mhe_scale.engine.run_identity import run_config
from mhe_scale.engine.model import Classifier, build_optimizers, build_run_head, count_parameters, optimizer_state_numel
from mhe_scale.eval.xmc import XMCMetrics, inverse_propensity
from mhe_scale.models.text import TextEncoderConfig, build_text_encoder, load_tokenizer
from mhe_scale.data.xmc_text import TextDataConfig
from mhe_scale.tasks.registry import register_task
from mhe_scale.tasks.report import head_label, resume_record, run_folder, train_each_head
from mhe_scale.tasks.paths import config_path_candidates

POPULARITY = "most frequent (train)"


@dataclass(kw_only=True)
class XmcTextConfig(ExperimentConfig):
    task: str = "xmc_text"
    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass(frozen=True)
class TextXMCData:
    """Tokenised splits of a text corpus and the training label statistics."""

    train: TokenizedTextDataset | TextBatchStream
    test: TokenizedTextDataset
    label_names: list[str]
    label_counts: Tensor
    """Training frequency N_l of each label [C]."""
    inv_propensity: Tensor
    """w_l = 1 / p_l [C] float64 for PSP@k."""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def resolve_text_path(path: str | None) -> Path:
    """data.path from the working directory, else from the repository root."""
    if not path:
        raise ValueError("data.path is not set; point it at the corpus folder (raw / jsonl) or the Reuters JSON file, "
                         "e.g. data.path=../shared/data/reuters21578-modapte-test/test_data.json")
    candidates = config_path_candidates(path)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = " nor as ".join(map(str, candidates))
    raise FileNotFoundError(f"data.path={path!r} exists neither as {tried}; download the dataset (see the config's "
                            "header) and point data.path at it")


def load_text_xmc(cfg: TextDataConfig, tokenizer: Any) -> TextXMCData:
    """Read, split (reuters), tokenise (cached) and count labels; propensities from the training split."""
    path = resolve_text_path(cfg.path)
    if cfg.streaming:
        return load_streamed_text_xmc(cfg, path, tokenizer)
    splits = load_text_splits(cfg.text_format, path, list(cfg.text_fields), cfg.test_fraction, cfg.seed, cfg.cache_dir,
                              cfg.eval_split)
    out = []
    for ds, limit in ((splits.train, cfg.max_train_points), (splits.test, cfg.max_test_points)):
        if limit is not None:
            ds = ds.select(range(min(int(limit), len(ds))))
        tokens = tokenize(ds, tokenizer, cfg.max_length, cfg.num_proc, cfg.cache_dir)
        out.append(TokenizedTextDataset(tokens, tokenizer.pad_token_id or 0))
    train, test = out
    num_classes = len(splits.label_names)
    flat, _ = train.flat_labels()
    counts = torch.bincount(flat, minlength=num_classes)
    w = inverse_propensity(counts, len(train), cfg.propensity_a, cfg.propensity_b)
    return TextXMCData(train, test, splits.label_names, counts, w)


def load_streamed_text_xmc(cfg: TextDataConfig, path: Path, tokenizer: Any) -> TextXMCData:
    """data.streaming: the training split as a TextBatchStream (one counting pass), the test split cached."""
    fmt = detect_format(path) if cfg.text_format == "auto" else cfg.text_format
    common = dict(text_fields=list(cfg.text_fields), test_fraction=cfg.test_fraction, seed=cfg.seed,
                  cache_dir=cfg.cache_dir)
    rows = split_rows(fmt, path, "train", streaming=True, **common)
    if cfg.max_train_points is not None:
        rows = rows.take(int(cfg.max_train_points))
    test_rows = split_rows(fmt, path, cfg.eval_split, **common)
    if cfg.max_test_points is not None:
        test_rows = test_rows.select(range(min(int(cfg.max_test_points), len(test_rows))))
    num_train, counts = count_rows_and_labels(rows)
    names = label_names(fmt, path, test=test_rows)
    if counts.numel() > len(names):
        if fmt != "jsonl" or jsonl_label_names(path) is not None:
            raise TextFormatError(f"{path}: the training split uses label id {counts.numel() - 1} but the corpus "
                                  f"names only {len(names)} labels")
        names = names + [str(i) for i in range(len(names), counts.numel())]  # ids without a label file
    counts = torch.cat([counts, counts.new_zeros(len(names) - counts.numel())])
    test = TokenizedTextDataset(tokenize(test_rows, tokenizer, cfg.max_length, cfg.num_proc, cfg.cache_dir),
                                tokenizer.pad_token_id or 0)
    train = TextBatchStream(rows, num_train, tokenizer, cfg.max_length, cfg.shuffle_buffer)
    w = inverse_propensity(counts, num_train, cfg.propensity_a, cfg.propensity_b)
    return TextXMCData(train, test, names, counts, w)


def popularity_metrics(data: TextXMCData, ks: list[int]) -> dict[str, float]:
    """Metrics of predicting the max(ks) most frequent training labels for every test point."""
    top = data.label_counts.topk(min(max(ks), data.num_classes)).indices
    metrics = XMCMetrics(ks=tuple(ks), inv_propensity=data.inv_propensity)
    for targets in data.test.label_batches():
        metrics.update(top.expand(len(targets), -1), targets)
    return metrics.compute()


def train_text_head(cfg: ExperimentConfig, head_cfg: HeadConfig, data: TextXMCData, accelerator,
                    folder: str | None = None) -> dict[str, Any]:
    """Fresh encoder from the pretrained weights (same seed for every head) + the head; train, evaluate."""
    torch.manual_seed(cfg.train.seed)
    encoder = build_text_encoder(cfg.model)
    head = build_run_head(head_cfg, cfg.dist.shard_head, encoder.num_features, data.num_classes, True,
                          seed=cfg.train.seed)
    model = Classifier(encoder, head)
    optimizer, head_optimizer = build_optimizers(cfg.optim, model)
    accelerator.print(f"[{head_label(head_cfg)}] {type(encoder.model).__name__}({encoder.extra_repr()})\n{head!r}")
    folder = folder or run_folder(head_cfg)
    run_dir = Path(cfg.train.output_dir) / folder

    def evaluate_now(ema=None, save: bool = False) -> dict[str, float]:  # every process: metrics of the whole set
        return evaluate(model, data.test, list(cfg.eval.ks), cfg.train.eval_batch_size, data.inv_propensity,
                        desc=f"eval {head_cfg.name}", ema=ema, accelerator=accelerator,
                        predictions_to=run_dir / "predictions.txt" if save else None,
                        prediction_k=cfg.eval.prediction_k)

    result = fit(model, optimizer, data.train, cfg.train, accelerator, desc=f"train {head_cfg.name}", out_dir=run_dir,
                 head_optimizer=head_optimizer, eval_fn=evaluate_now, run_name=folder,
                 run_config=run_config(cfg, head_cfg))
    start = time.perf_counter()
    metrics = evaluate_now(result.ema, save=cfg.eval.prediction_k > 0)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    costs = {"train s": result.seconds, "eval s": time.perf_counter() - start,
             "samples/s": result.samples_per_second,
             "head params (K)": count_parameters(head) / 1e3,
             "encoder params (M)": count_parameters(encoder) / 1e6,
             "encoder trainable (M)": trainable / 1e6,
             "head optim state (K)": optimizer_state_numel(head_optimizer or optimizer, list(head.parameters())) / 1e3,
             "final loss": result.last_loss}
    return {"metrics": metrics, "costs": costs, **resume_record(result)}


@register_task("xmc_text", XmcTextConfig, "extreme multi-label classification of raw text with a local HF "
               "encoder (LightXML-style) + head", data_names=("xmc_text",))
def run_xmc_text(cfg: ExperimentConfig, accelerator) -> dict[str, dict[str, Any]]:
    """Train cfg.head (and cfg.eval.baseline if set) on the text corpus at cfg.data.path; print and save tables."""
    from mhe_scale.tasks.report import write_results

    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model.path)
    data = load_text_xmc(cfg.data, tokenizer)
    fmt = cfg.data.text_format if cfg.data.text_format != "auto" else detect_format(resolve_text_path(cfg.data.path))
    flat, per_point = data.test.flat_labels()
    accelerator.print(f"{fmt} text {cfg.data.path}: {len(data.train):,} train / {len(data.test):,} test documents, "
                      f"C={data.num_classes:,} labels, {float(per_point.float().mean()):.2f} labels per test document, "
                      f"max_length={cfg.data.max_length} ({time.perf_counter() - start:.1f}s)")
    if accelerator.is_main_process:
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_label_map(out / "label_map.json", data.label_names)
    results = train_each_head(cfg, lambda head_cfg, folder: train_text_head(cfg, head_cfg, data, accelerator, folder))
    results[POPULARITY] = {"metrics": popularity_metrics(data, list(cfg.eval.ks)), "costs": {}}
    write_results(cfg, results, accelerator)
    return results
