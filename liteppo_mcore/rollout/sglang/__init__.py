"""The SGLang rollout engine: the production path on GPUs, built on SGLang's public HTTP API.

Importing this package never imports SGLang; only the functions that need it (launching, serializing
CUDA tensors, joining the weights-update group) do, inside themselves. See docs/sglang.md.
"""

from .build import build_sglang_engine
from .client import SGLangServerError
from .engine import SGLangEngine
from .version import SGLangVersionError, check_sglang_version

__all__ = ["build_sglang_engine", "SGLangEngine", "SGLangServerError", "SGLangVersionError",
           "check_sglang_version"]
