"""Top-k / top-p filtering shared by the in-process decoders (mcore and fast engines)."""

from __future__ import annotations

import torch
from torch import Tensor


def filtered_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """`logits / temperature` with the tokens outside top-k and the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the most
    likely token always stays). Shapes sampling only: log-probs are never taken from this."""
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
        drop = before >= top_p
        drop[..., 0] = False
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return z
