"""Evaluation metrics: XMC precision / R-Precision / nDCG / propensity-scored metrics, micro-F1 at a tuned threshold."""

from mhe_scale.eval.xmc import XMCMetrics, format_table, inverse_propensity, label_counts, xmc_metrics
from mhe_scale.eval.xmc_f1 import micro_f1, tune_micro_f1_threshold

__all__ = ["XMCMetrics", "format_table", "inverse_propensity", "label_counts", "micro_f1",
           "tune_micro_f1_threshold", "xmc_metrics"]
