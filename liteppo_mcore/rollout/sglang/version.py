"""The SGLang versions this package was written against, and a check with an actionable error.

SGLang's HTTP and weight-sync APIs change between minor releases, so an untested version fails early
with a message rather than late with a confusing payload error.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

MIN_VERSION = (0, 5, 20)
MAX_VERSION_EXCLUSIVE = (0, 6, 0)
SUPPORTED_RANGE = ">=0.5.20,<0.6"


class SGLangVersionError(RuntimeError):
    """The installed (or serving) SGLang is missing or outside the supported range."""


def parse_version(text: str) -> tuple[int, int, int]:
    """The leading `major.minor.patch` of a version string ("0.5.23.post1" -> (0, 5, 23))."""
    match = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    if not match:
        raise SGLangVersionError(f"cannot read SGLang version {text!r}")
    return tuple(int(part or 0) for part in match.groups())  # type: ignore[return-value]


def is_supported(version: str) -> bool:
    return MIN_VERSION <= parse_version(version) < MAX_VERSION_EXCLUSIVE


def installed_version() -> str | None:
    """The installed sglang distribution's version, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(version: str | None = None, *, where: str = "installed") -> str:
    """Raise `SGLangVersionError` unless `version` (default: the installed one) is supported."""
    if version is None:
        version = installed_version()
    if version is None and sys.version_info < (3, 11):
        raise SGLangVersionError(
            f"rollout.engine=sglang needs SGLang{SUPPORTED_RANGE}, whose wheels need Python >= 3.11 (and glibc "
            f">= 2.34); this is Python {sys.version.split()[0]}. Run the servers from a Python 3.11+ environment "
            "(rollout.server_command) or choose rollout.engine=hf or mcore.")
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


# ------------------------------------------------------------------------------------------------------
# What each supported server version offers, read from its wheel (docs/sglang.md has the table, with
# the file of the wheel each fact was read from):
# - The weight-update session: from 0.5.21 on, the scheduler refuses update_weights_from_tensor and
#   update_weights_from_distributed outside POST /begin_weight_update ... POST /end_weight_update
#   (sglang/srt/managers/scheduler_components/weight_updater.py); 0.5.20 has neither endpoint
#   (sglang/srt/entrypoints/http_server.py). Read in 0.5.20, 0.5.21, 0.5.22 and 0.5.23.
# - /server_info in every supported version; /get_server_info is its deprecated alias.
# - FlattenedTensorBucket.supports_multi_dtypes is True in every supported version
#   (sglang/srt/weight_sync/tensor_bucket.py): one update call per bucket, every dtype in it.
# - weight_version: a field of UpdateWeightsFrom{Tensor,Distributed}ReqInput
#   (sglang/srt/managers/io_struct.py), reported back in each /generate answer's meta_info.
# - Memory tags (sglang/srt/constants.py): "weights", "kv_cache", "cuda_graph".

SESSION_SINCE = (0, 5, 21)
TAG_WEIGHTS, TAG_KV_CACHE, TAG_CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"
SERVER_INFO_PATHS = ("/server_info", "/get_server_info")  # the endpoint, then its deprecated alias


@dataclass(frozen=True)
class ServerProtocol:
    """The endpoints and request shapes of one server version."""

    version: str
    weight_update_session: bool          # update calls must sit between begin/end_weight_update
    server_info_path: str = SERVER_INFO_PATHS[0]
    multi_dtype_buckets: bool = True     # one flattened bucket may hold several dtypes


def protocol_for(version: str, *, where: str = "the SGLang server") -> ServerProtocol:
    """The protocol of a server of `version`; an unsupported version is refused with the range."""
    check_sglang_version(version, where=where)
    return ServerProtocol(version=str(version), weight_update_session=parse_version(version) >= SESSION_SINCE)
