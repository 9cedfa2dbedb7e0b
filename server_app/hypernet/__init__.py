"""Hypernetworks: MH-pFedHN's chunked generator (:mod:`.chunked`, heads in
:mod:`.heads`) and pFedHN's per-tensor one (:mod:`.per_tensor`), both behind the
interface of :mod:`.generator`."""

from .chunked import HyperNetwork, reference_init_
from .generator import ClientGenerator
from .heads import (
    HEAD_TYPES,
    ChunkHead,
    HeadType,
    LowRankHeads,
    PositionHeads,
    SharedHead,
    check_head_type,
    head_parameter_count,
    make_head,
)
from .per_tensor import PerTensorHyperNetwork

__all__ = [
    "HEAD_TYPES",
    "ChunkHead",
    "ClientGenerator",
    "HeadType",
    "HyperNetwork",
    "LowRankHeads",
    "PerTensorHyperNetwork",
    "PositionHeads",
    "SharedHead",
    "check_head_type",
    "head_parameter_count",
    "make_head",
    "reference_init_",
]
