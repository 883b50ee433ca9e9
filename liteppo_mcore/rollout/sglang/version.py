"""The SGLang versions this package was written against, and a check with an actionable error.

SGLang's HTTP and weight-sync APIs change between minor releases, so an untested version fails early
with a message rather than late with a confusing payload error.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

MIN_VERSION = (0, 5, 20)
MAX_VERSION_EXCLUSIVE = (0, 6, 0)
SUPPORTED_RANGE = ">=0.5.20,<0.6"


class SGLangVersionError(RuntimeError):
    """The installed (or serving) SGLang is missing or outside the supported range."""


def parse_version(text: str) -> Tuple[int, int, int]:
    """The leading `major.minor.patch` of a version string ("0.5.23.post1" -> (0, 5, 23))."""
    match = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    if not match:
        raise SGLangVersionError(f"cannot read SGLang version {text!r}")
    return tuple(int(part or 0) for part in match.groups())  # type: ignore[return-value]


def is_supported(version: str) -> bool:
    return MIN_VERSION <= parse_version(version) < MAX_VERSION_EXCLUSIVE


def installed_version() -> Optional[str]:
    """The installed sglang distribution's version, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(version: Optional[str] = None, *, where: str = "installed") -> str:
    """Raise `SGLangVersionError` unless `version` (default: the installed one) is supported."""
    if version is None:
        version = installed_version()
    if version is None:
        raise SGLangVersionError(
            "rollout.engine=sglang but SGLang is not installed. It pins its own torch and CUDA "
            f"kernels, so install it in an environment built for it: pip install 'sglang{SUPPORTED_RANGE}' "
            "(see docs/sglang.md), or choose rollout.engine=hf or mcore.")
    if not is_supported(version):
        raise SGLangVersionError(
            f"{where} SGLang {version} is outside the range this code was written for "
            f"({SUPPORTED_RANGE}); its HTTP and weight-sync APIs may differ. Install "
            f"'sglang{SUPPORTED_RANGE}' or choose rollout.engine=hf or mcore.")
    return version
