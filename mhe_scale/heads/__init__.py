"""Classification heads behind one interface (see heads/base.py); built by name via create_head."""

from mhe_scale.heads.base import (ClassifierHead, HeadOutput, create_head, head_arguments, head_class,
                                  list_heads, register_head)
from mhe_scale.heads.linear import FullyConnectedHead
from mhe_scale.heads.margins import CombinedMargin, make_margin
from mhe_scale.heads.mhc import MultiHeadCascadeHead
from mhe_scale.heads.mhp import MultiHeadProductHead
from mhe_scale.heads.mhs import MultiHeadSamplingHead
from mhe_scale.heads.partial_fc import PartialFCHead

__all__ = ["ClassifierHead", "HeadOutput", "create_head", "head_arguments", "head_class", "list_heads",
           "register_head", "FullyConnectedHead", "CombinedMargin", "make_margin", "MultiHeadCascadeHead", "MultiHeadProductHead",
           "MultiHeadSamplingHead", "PartialFCHead"]
