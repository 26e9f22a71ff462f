"""Evaluation metrics: XMC precision / nDCG / propensity-scored metrics (more to come)."""

from mhe_scale.eval.xmc import XMCMetrics, format_table, inverse_propensity, label_counts, xmc_metrics

__all__ = ["XMCMetrics", "format_table", "inverse_propensity", "label_counts", "xmc_metrics"]
