"""Rewrites of the cascade: the pass manager, its context and instruments, and the passes."""
from .canonicalize import Canonicalize
from .defer import Defer
from .fuse_attention import FuseAttention
from .group_kernels import GroupKernels
from .moe import Moe
from .layout import MaterializeOperands, PackWeights, TransposeWeights
from .manager import Instruments, Pass, PassContext, PassError, PassManager, parse_pipeline, register
from .pipeline import NAMED, pipeline
from .quantize import Quantize

__all__ = ["Canonicalize", "Defer", "FuseAttention", "GroupKernels", "Instruments", "MaterializeOperands", "Moe", "NAMED",
           "PackWeights", "Pass", "PassContext", "PassError", "PassManager", "Quantize", "TransposeWeights", "parse_pipeline",
           "pipeline", "register"]
