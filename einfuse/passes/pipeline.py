"""The named pipelines, as one readable function."""
from __future__ import annotations

import re

from .manager import Pass, parse_pipeline

#: Each named pipeline as pipeline text:
#: * ``default``: canonicalize, fuse every attention into FuseMax's 1-pass cascade, defer what
#:   else waits for a reduction (LayerNorm's centring: 3 passes -> 2), canonicalize again (the
#:   Einsums these replaced are dead), sort each mixture-of-experts block's rows by expert (``moe``);
#: * ``unfused``: canonicalize only (attention stays the 3-pass cascade);
#: * ``none``: the captured cascade as it is.
#:
#: ``codegen`` stands for the target's codegen pipeline (its backend's: operand layouts, then
#: ``group-kernels``), which a compile runs after the named one: ``default,codegen`` shows the IR
#: exactly as code generation receives it.
NAMED_TEXT = {"default": "canonicalize,fuse-attention,defer,canonicalize,moe", "unfused": "canonicalize", "none": ""}
NAMED = tuple(NAMED_TEXT)


def pipeline(name_or_text: str, codegen: str = "group-kernels") -> list[Pass]:
    """The passes of a named pipeline or of pipeline text, in which a named pipeline may stand
    for its passes (``default,group-kernels``) and ``codegen`` for the pipeline text ``codegen``."""
    named = {**NAMED_TEXT, "codegen": codegen}
    items = re.split(r",(?![^{]*\})", name_or_text)   # (commas outside option braces)
    text = ",".join(t for t in (named.get(item.strip(), item) for item in items) if t.strip())
    return parse_pipeline(text) if text else []
