"""Label codecs, factorisation and top-k decoding: pure tensor math, no torch.distributed."""

from mhe_scale.labels.codec import PAD, LabelCodec, check_label_range, factorize
from mhe_scale.labels.targets import multi_hot, pad_label_lists
from mhe_scale.labels.topk import product_topk

__all__ = ["PAD", "LabelCodec", "check_label_range", "factorize", "multi_hot", "pad_label_lists", "product_topk"]
