"""The `hf` rollout engine: a transformers model of the actor's family, fed by the weight exporter.

The model is built in-process from the actor's shape (`convert.hf_config_from_shape`), so it computes
the same function as the megatron actor whatever the run started from; its weights arrive through
`update_weights` after every update. Generation is transformers' own `generate` (temperature, top-p,
top-k, stop at EOS; `n` samples by repeating each prompt), on left-padded batches: the attention mask
hides the padding and transformers derives position ids from it, so a padded prompt generates what it
would alone.

Log-probs are those of the RAW logits of every step, `log_softmax(logits / temperature)` over the full
vocabulary (the processed scores would be renormalized by top-p/top-k), kept for the sampled tokens
only: a `SampledLogprobs` logits processor sees each step's raw float32 logits (transformers runs the
processors passed to `generate` before its temperature / top-k / top-p warpers, which are left to
it) and stores that step's `[B, V]` log-probs. The token drawn at step t is only known at the next
call (the last column of `input_ids`), or after `generate` for the last step, so each call first
gathers the previous step's stored row at it and then replaces the row. At most one `[B, V]` row is
held at a time and `generate` keeps no logits (`output_logits` stays off): per-step memory is
O(B * V), where stacking every step's logits would take B * T * V floats (about 300 GB at
128 x 4096 x 151,936).

Collective contract (see engine.py): only the first rank of each model replica (tp = pp = cp = 0)
holds the transformers model and generates; it broadcasts the results over the replica's CP, PP and TP
groups, so every rank of the replica returns the same generations. Each DP replica generates for its
own prompts, with a sampling seed that mixes in its DP rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from liteppo_mcore.convert.hf_files import hf_config_from_shape
from liteppo_mcore.parallel.device import compute_device
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.rollout.engine import (
    Generation,
    RolloutEngine,
    SamplingParams,
    WeightBucket,
    check_params,
    copy_weight_stream,
    finish,
    sampling_seed,
    share_within_replica,
)

# model.family -> its transformers class: one entry per config.choices.MODEL_FAMILIES
# (tests/unit/test_config_choices.py).
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def build_hf_model(shape, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa"):
    """A transformers causal LM with the actor's shape (weights: whatever init gives; load them next)."""
    import transformers

    if shape.family not in ARCHITECTURES:
        raise ValueError(f"model family {shape.family!r} has no transformers class here; "
                         f"supported: {sorted(ARCHITECTURES)}")
    fields = hf_config_from_shape(shape, ARCHITECTURES[shape.family])
    model_type = fields.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              attn_implementation=attn_implementation)
    return model.eval().requires_grad_(False)


class SampledLogprobs:
    """A transformers logits processor that keeps the log-probs of the sampled tokens only (module doc).

    Called by `generate` once per step with `input_ids` `[B, width + t]` (prompt plus the t tokens
    drawn so far) and the step's raw float32 logits `[B, V]`; returns the logits untouched. It must be
    the first processor (transformers puts the processors passed to `generate` before its sampling
    warpers), so that what it sees is the model's output, not the warped scores."""

    def __init__(self, prompt_width: int, temperature: float):
        self.width, self.temperature = int(prompt_width), float(temperature)
        self.steps: list[Tensor] = []      # [B] log-probs of tokens 0, 1, ... (known tokens only)
        self._row: Tensor | None = None  # [B, V] log-probs of the step whose token is not drawn yet
        self._row_step = -1

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step = input_ids.shape[1] - self.width
        if self._row is not None:
            if self._row_step != step - 1:
                raise RuntimeError(f"hf engine: logits processor called for step {step} after step "
                                   f"{self._row_step}; transformers' decoding loop changed")
            self._take(input_ids[:, -1])
        self._row = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self._row_step = step
        return scores

    def _take(self, tokens: Tensor) -> None:
        row = self._row
        assert row is not None  # both callers check that a row is pending
        self.steps.append(row.gather(-1, tokens.to(row.device)[:, None]).squeeze(-1))
        self._row = None

    def result(self, sequences: Tensor) -> Tensor:
        """`[B, T]` log-probs of the `T = sequences.shape[1] - width` tokens `generate` returned. Steps it
        ran but undid (transformers may decode one step past its stop check) are dropped."""
        count = sequences.shape[1] - self.width
        if len(self.steps) < count and self._row is not None and self._row_step == len(self.steps):
            self._take(sequences[:, self.width + len(self.steps)])  # the last step: its token is in `sequences`
        if len(self.steps) < count:
            raise RuntimeError(f"hf engine: generate returned {count} new tokens but the logits processor "
                               f"saw {len(self.steps)} decided steps")
        self._row = None
        return torch.stack(self.steps[:count], dim=1)


class HFEngine(RolloutEngine):
    """See the module docstring. `eos_token_ids` stop generation when the sampling parameters name none."""

    name = "hf"
    needs_weight_sync = True

    def __init__(self, shape, groups: ParallelGroups, *, eos_token_ids: Sequence[int], dtype: torch.dtype,
                 device: torch.device | None = None, pad_token_id: int | None = None,
                 max_batch_size: int | None = None, attn_implementation: str = "sdpa"):
        if not eos_token_ids:
            raise ValueError("the hf engine needs at least one EOS token id to stop generation")
        self.shape, self.groups = shape, groups
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.pad_token_id = self.eos_token_ids[0] if pad_token_id is None else int(pad_token_id)
        self.max_batch_size = max_batch_size
        self.device = torch.device(device) if device is not None else compute_device()
        self.is_generator = groups.tp_rank == 0 and groups.pp_rank == 0 and groups.cp_rank == 0
        self.model = build_hf_model(shape, dtype, self.device, attn_implementation) if self.is_generator else None
        self._params: dict[str, Tensor] = dict(self.model.named_parameters()) if self.model is not None else {}
        self._asleep = False

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, buckets: Iterable[WeightBucket], weight_version: str | None = None) -> None:
        """Copy every tensor of the stream into the model (the generating rank); every rank iterates the
        buckets, since producing them is collective. Every model tensor must arrive, each once."""
        copy_weight_stream(buckets, self._params if self.model is not None else None, engine="hf",
                           family=self.shape.family)

    def get_weight(self, name: str) -> Tensor | None:
        """The engine's tensor `name` on the generating rank; None on the other ranks."""
        if self.model is None:
            return None
        if name not in self._params:
            raise KeyError(f"hf engine: no tensor {name!r}")
        return self._params[name]

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor | None:
        """Full-vocabulary logits `[B, S, V]` (float32) of unpadded token rows; None off the generating rank."""
        if self.model is None:
            return None
        return self.model(tokens.to(self.device)).logits.float()

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        """See `RolloutEngine.generate`; `on_progress` is called on the generating rank after each batch of
        at most `max_batch_size` rows."""
        check_params(params)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("hf engine: every prompt needs at least one token")
        result = self._generate_all(prompts, params, on_progress) if self.is_generator else None
        return share_within_replica(result, self.groups)

    def _generate_all(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                      on_progress: Callable[[int], None] | None) -> list[list[Generation]]:
        if self._asleep:
            raise RuntimeError("hf engine: generate() while asleep; call wake() first")
        rows = [list(p) for p in prompts for _ in range(params.n)]
        step = self.max_batch_size or max(1, len(rows))
        out: list[Generation] = []
        with torch.random.fork_rng(devices=_rng_devices(self.device)):
            torch.manual_seed(sampling_seed(params.seed, self.groups.dp_rank))
            for lo in range(0, len(rows), step):
                out.extend(self._generate_batch(rows[lo: lo + step], params))
                if on_progress is not None:
                    on_progress(len(rows[lo: lo + step]))
        return [out[i * params.n: (i + 1) * params.n] for i in range(len(prompts))]

    @torch.no_grad()
    def _generate_batch(self, rows: list[list[int]], params: SamplingParams) -> list[Generation]:
        stop_ids = list(params.stop_token_ids or self.eos_token_ids)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token is at the same column
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        from transformers import LogitsProcessorList

        keep = SampledLogprobs(width, params.temperature)
        assert self.model is not None  # only the generating rank, which holds the model, generates
        sequences = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                        generation_config=self._generation_config(params, stop_ids),
                                        logits_processor=LogitsProcessorList([keep]))
        logp = keep.result(sequences).cpu()
        new = sequences[:, width:].cpu()
        return [finish(new[i].tolist(), logp[i].tolist(), stop_ids) for i in range(len(rows))]

    def _generation_config(self, params: SamplingParams, stop_ids: list[int]):
        from transformers import GenerationConfig

        common = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=0, eos_token_id=stop_ids,
                      pad_token_id=self.pad_token_id, return_dict_in_generate=False, output_logits=False,
                      output_scores=False, use_cache=True, num_beams=1, repetition_penalty=1.0)
        if params.greedy:
            return GenerationConfig(do_sample=False, **common)
        # top_k=0 disables top-k: left unset, transformers would default it to 50.
        return GenerationConfig(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                top_k=params.top_k if params.top_k > 0 else 0, **common)

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """On a GPU, park the model on the CPU while the trainer trains."""
        if self.model is not None and self.device.type == "cuda" and not self._asleep:
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def wake(self) -> None:
        if self.model is not None and self.device.type == "cuda" and self._asleep:
            self.model.to(self.device)
        self._asleep = False

    def shutdown(self) -> None:
        self.model, self._params = None, {}


def _rng_devices(device: torch.device) -> list:
    """The CUDA devices whose generator `fork_rng` saves: the engine's, when it is a real GPU (under the
    strict virtual-device mode the data, and so the draws, stay on the CPU generator)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
