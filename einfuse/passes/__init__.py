"""Rewrites of the cascade: the pass manager, its instruments, and the passes."""
from .canonicalize import Canonicalize
from .defer import Defer
from .fuse_attention import FuseAttention
from .group_kernels import GroupKernels
from .manager import Instruments, Pass, PassError, PassManager, parse_pipeline, register
from .pipeline import NAMED, pipeline

__all__ = ["Canonicalize", "Defer", "FuseAttention", "GroupKernels", "Instruments", "NAMED", "Pass", "PassError", "PassManager", "parse_pipeline",
           "pipeline", "register"]
