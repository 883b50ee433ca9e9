"""Request and response shapes of SGLang's /generate, and their translation to our `Generation`s.

Log-prob semantics (read from SGLang 0.5.x's `Sampler.forward`, srt/layers/sampler.py):
* Sampling requests (temperature > 0): logits are divided by the temperature, softmaxed over the full
  vocabulary, and the returned log-prob is `log(probs)[sampled]` taken BEFORE top-k/top-p filtering,
  which only shapes the draw. That is exactly liteppo's `log softmax(logits / T)` over the full
  vocabulary, unless the server runs with SGLANG_RETURN_ORIGINAL_LOGPROB set (then it is the
  pre-temperature log-prob); launched servers have it removed from their environment, and
  docs/sglang.md tells users of their own servers to leave it unset.
* Greedy requests: SGLang turns temperature 0 into (temperature 1, top_k 1) and returns
  `log_softmax(logits)` of the argmax, i.e. log-probs at temperature 1. They are therefore correct for
  `temperature == 1`; for any other configured temperature SGLang cannot report them, so we return NaN
  (evaluation uses greedy decoding and ignores log-probs; NaN makes any accidental use visible).

Prompts are expanded to `n` single-sample requests (n=1 each) so the order of the answers is ours, and
each request carries its own `sampling_seed`, derived from the seed, which SGLang honours when launched
with deterministic inference (otherwise sampling uses the server's RNG, seeded by --random-seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from liteppo_mcore.utils.seeds import mix_seed

from ..engine import Generation, SamplingParams
from .client import SGLangServerError

_SEED_MODULUS = 2**31 - 1


def sample_seed(seed: int, stream: int, prompt_index: int, sample_index: int) -> int:
    """A distinct, reproducible seed per (stream, prompt, sample), below 2**31 - 1 (SGLang's sampling seed
    is a 32-bit integer); `stream` separates DP ranks/shares."""
    return mix_seed(seed, stream, prompt_index, sample_index) % _SEED_MODULUS


def sampling_params_payload(params: SamplingParams, seed: int) -> dict[str, Any]:
    """SGLang `sampling_params` of one single-sample request."""
    payload: dict[str, Any] = {
        "max_new_tokens": int(params.max_new_tokens),
        "n": 1,
        "stop_token_ids": [int(t) for t in params.stop_token_ids],
        "ignore_eos": False,
        "no_stop_trim": True,         # keep the stop token in the output (our Generation keeps it)
        "skip_special_tokens": False,
        "sampling_seed": int(seed),
    }
    if params.greedy:
        payload["temperature"] = 0.0  # SGLang: greedy (argmax)
    else:
        payload.update(temperature=float(params.temperature), top_p=float(params.top_p),
                       top_k=int(params.top_k) if params.top_k and params.top_k > 0 else -1)
    return payload


def generate_payload(prompts: Sequence[Sequence[int]], params: SamplingParams, *, stream: int = 0,
                     first_prompt_index: int = 0) -> dict[str, Any]:
    """One batched /generate request: every prompt repeated `n` times, prompt-major."""
    input_ids: list[list[int]] = []
    sampling: list[dict[str, Any]] = []
    for offset, prompt in enumerate(prompts):
        for sample in range(params.n):
            input_ids.append([int(t) for t in prompt])
            seed = sample_seed(params.seed, stream, first_prompt_index + offset, sample)
            sampling.append(sampling_params_payload(params, seed))
    return {"input_ids": input_ids, "sampling_params": sampling, "return_logprob": True,
            "top_logprobs_num": 0, "stream": False}


def _finish_type(meta: dict[str, Any]) -> str:
    reason = meta.get("finish_reason")
    if isinstance(reason, dict):
        kind = str(reason.get("type", ""))
        if kind == "abort":
            raise SGLangServerError(f"the SGLang server aborted a request: {reason.get('message', reason)}")
        if reason.get("matched") == "NaN happened":
            # SGLang ends a row whose logits are NaN as a "stop" on an EOS id (schedule_batch.py): garbage
            # weights, e.g. released memory resumed without a push; the tokens mean nothing.
            raise SGLangServerError("the SGLang server's logits were NaN ('NaN happened'): its weights are "
                                    "garbage (released and not pushed again, or a broken push)")
        return kind
    return str(reason or "")


def parse_generation(item: dict[str, Any], params: SamplingParams) -> Generation:
    """One /generate answer -> `Generation`. Tokens and log-probs come from `output_token_logprobs`
    ([logprob, token_id, text] per generated token, the stop token included)."""
    meta = item.get("meta_info") or {}
    kind = _finish_type(meta)
    pairs = meta.get("output_token_logprobs")
    if pairs is None:
        raise SGLangServerError("the SGLang answer has no meta_info.output_token_logprobs; was the request "
                                "sent with return_logprob=True?")
    token_ids = [int(pair[1]) for pair in pairs]
    logprobs = [float("nan") if pair[0] is None else float(pair[0]) for pair in pairs]
    output_ids = item.get("output_ids")
    if output_ids is not None and [int(t) for t in output_ids] != token_ids[:len(output_ids)]:
        raise SGLangServerError(f"the SGLang answer's output_ids {output_ids[:8]}... disagree with its "
                                f"log-prob tokens {token_ids[:8]}...")
    if params.greedy and not math.isclose(params.temperature, 1.0):
        logprobs = [float("nan")] * len(token_ids)  # see the module docstring
    stops = set(int(t) for t in params.stop_token_ids)
    if token_ids and token_ids[-1] in stops:
        finish = "stop"
    elif kind in ("stop", "length"):
        finish = kind
    else:
        raise SGLangServerError(f"unexpected SGLang finish reason {meta.get('finish_reason')!r}")
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=finish)


def parse_generate_response(response: Any, num_prompts: int, params: SamplingParams) -> list[list[Generation]]:
    """The batched answer (a list, in request order) -> `n` generations per prompt."""
    if isinstance(response, dict):
        response = [response]
    expected = num_prompts * params.n
    if not isinstance(response, list) or len(response) != expected:
        got = len(response) if isinstance(response, list) else type(response).__name__
        raise SGLangServerError(f"the SGLang server answered {got} generations for {expected} requests")
    flat = [parse_generation(item, params) for item in response]
    return [flat[i * params.n:(i + 1) * params.n] for i in range(num_prompts)]


def check_weight_versions(response: Any, expected: Any, server: str) -> None:
    """Every answer's `meta_info.weight_version` (SGLang reports the version of the weights it served,
    sglang/srt/managers/tokenizer_manager.py) must be the one last pushed; no check before the first
    push (`expected` None)."""
    if expected is None:
        return
    items = [response] if isinstance(response, dict) else (response if isinstance(response, list) else [])
    for item in items:
        got = (item.get("meta_info") or {}).get("weight_version") if isinstance(item, dict) else None
        if str(got) != str(expected):
            raise SGLangServerError(
                f"{server} generated with weight_version {got!r}, but the trainer last pushed {expected!r}: "
                "the rollout did not use the weights just trained (a push that failed or went to another "
                "server, or a server restarted since).")
