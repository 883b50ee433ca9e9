"""The CPU wire format of a weight bucket for `update_weights_from_tensor` where CUDA is absent.

On a GPU the bucket travels as SGLang's own payload: a `FlattenedTensorBucket` (every tensor of the
bucket viewed as bytes and concatenated into one uint8 tensor, plus per-tensor metadata: name, shape,
dtype, start_idx, end_idx, numel; `sglang/srt/weight_sync/tensor_bucket.py`) pickled by SGLang's
`MultiprocessingSerializer` into CUDA IPC handles. Neither CUDA IPC nor SGLang exists on a CPU
machine, so there the same structure travels by value: base64 of `torch.save` of
`{"flattened_tensor": uint8 tensor, "metadata": [{name, shape, dtype, start_idx, end_idx, numel}, ...]}`,
dtypes spelled as SGLang spells them ("bfloat16"). The stand-in server of the tests decodes it.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch

WIRE_KIND = "liteppo-cpu-flattened-bucket-v1"


def flatten_bucket(named_tensors: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """One uint8 tensor holding every tensor's bytes, and where each one lies in it."""
    if not named_tensors:
        raise ValueError("cannot send an empty weight bucket")
    parts, metadata, offset = [], [], 0
    for name, tensor in named_tensors:
        data = tensor.detach().contiguous().cpu().flatten().view(torch.uint8)
        metadata.append({"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", ""),
                         "start_idx": offset, "end_idx": offset + data.numel(), "numel": data.numel()})
        parts.append(data)
        offset += data.numel()
    return {"kind": WIRE_KIND, "flattened_tensor": torch.cat(parts), "metadata": metadata}


def unflatten_bucket(payload: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a flattened bucket (copies, in the bucket's order)."""
    if payload.get("kind") != WIRE_KIND:
        raise ValueError(f"not a {WIRE_KIND} payload (kind {payload.get('kind')!r})")
    flat = payload["flattened_tensor"]
    out = []
    for meta in payload["metadata"]:
        dtype = getattr(torch, meta["dtype"])
        raw = flat[meta["start_idx"]:meta["end_idx"]].clone()
        out.append((meta["name"], raw.view(dtype).reshape(meta["shape"])))
    return out


def serialize_cpu_bucket(named_tensors: list[tuple[str, torch.Tensor]]) -> tuple[str, Any]:
    """(the wire string, what to keep alive until the server has loaded it: nothing, it is a copy)."""
    buffer = io.BytesIO()
    torch.save(flatten_bucket(named_tensors), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), None


def deserialize_cpu_bucket(wire: str) -> list[tuple[str, torch.Tensor]]:
    payload = torch.load(io.BytesIO(base64.b64decode(wire)), map_location="cpu", weights_only=True)
    return unflatten_bucket(payload)
