"""The configuration schema: one dataclass per concern, each field with a one-line docstring.

Root keys are spelled as in the published LitePPO configuration block, so that block can be pasted
into a YAML file. Everything else lives in sections. The docstrings under the fields are read by
`liteppo_mcore.config.docs` to build the README's configuration table, so keep them to one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The allowed values of the keys that take a fixed set of strings (family, dtype, engine, ...) live in
# `liteppo_mcore.config.choices`, their one home; `config.validate` checks against them. A docstring below
# that names the values must name all of them (a unit test checks).


@dataclass
class ModelConfig:
    family: str = "qwen2"
    """Model family: qwen2 (Qwen2/2.5, QKV bias), qwen3 (q/k norm) or llama (Llama 2/3); ignored when hf_path or load is set (their config.json's architecture decides)."""
    hf_path: str | None = None
    """Hugging Face model directory (config.json, .safetensors files, tokenizer); when set, the shape comes from its config.json and, unless load is set, the starting weights too (converted once into output_dir/pretrained/); colocated sglang needs it."""
    load: str | None = None
    """Megatron checkpoint (run dir, checkpoints/ or iter_* folder) whose actor weights start the actor, critic trunk and reference; wins over hf_path's weights, and its stored config.json gives the shape unless hf_path is set."""
    tokenizer_path: str | None = None
    """Tokenizer directory; null: hf_path, or the built-in task's tokenizer."""
    num_layers: int = 2
    """Transformer layers; parallel.pp must divide it (ignored when hf_path or load is set)."""
    hidden_size: int = 64
    """Width of the residual stream; a multiple of num_attention_heads, each head being hidden_size / num_attention_heads wide (ignored when hf_path or load is set)."""
    ffn_hidden_size: int = 256
    """Width of each layer's SwiGLU MLP (its gate and up projections) (ignored when hf_path or load is set)."""
    num_attention_heads: int = 4
    """Query heads; num_query_groups and parallel.tp must divide it (ignored when hf_path or load is set)."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention; as many as num_attention_heads: plain multi-head); must divide num_attention_heads and be divisible by parallel.tp (ignored when hf_path or load is set)."""
    vocab_size: int | None = None
    """Vocabulary size before TP padding; when set it also overrides config.json's; null: config.json's with hf_path or load, else the tokenizer's size."""
    max_position_embeddings: int = 32768
    """Positions the rotary embedding is built for; the mcore and fast engines refuse a prompt plus response_length longer than this (ignored when hf_path or load is set)."""
    rope_theta: float = 1000000.0
    """Base of the rotary embedding's frequencies (> 0); must be the value the weights were trained with (ignored when hf_path or load is set)."""
    rope_scaling: dict[str, Any] | None = None
    """Llama-3 style rope scaling (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings); null: none (ignored when hf_path or load is set)."""
    norm_epsilon: float = 1e-6
    """Epsilon added to the mean square in every RMSNorm (> 0) (ignored when hf_path or load is set)."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output layer (the critic always gets its own value head) (ignored when hf_path or load is set)."""
    dtype: str = "auto"
    """Parameter/compute dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."""
    init_std: float = 0.02
    """Std of the random initialization when no weights are loaded."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times tp."""
    attention_backend: str = "auto"
    """Core attention: auto (te if importable, else sdpa), sdpa (torch's fused attention), local (megatron's, no context parallelism) or te (needs transformer_engine)."""
    recompute_granularity: str | None = None
    """Activation recompute, trading compute for memory: null (none), selective (the attention core) or full (whole layers, see recompute_method)."""
    recompute_method: str = "uniform"
    """With recompute_granularity=full: uniform (recompute every layer, in chunks of recompute_num_layers) or block (recompute only the first recompute_num_layers layers of each pipeline stage); ignored otherwise."""
    recompute_num_layers: int = 1
    """With recompute_granularity=full (>= 1): layers per recompute chunk (uniform) or recomputed layers per pipeline stage (block); ignored otherwise."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: ranks that split each layer's weights; must divide the attention heads and the key/value heads."""
    pp: int = 1
    """Pipeline-parallel size: ranks that split the layers into consecutive stages; must divide the number of layers (kl_penalty=full needs 1)."""
    cp: int = 1
    """Context-parallel size; dp = WORLD_SIZE / (tp * pp * cp) is derived, never configured."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp >= 2)."""
    timeout_minutes: float = 120
    """Timeout of every collective, in minutes (long: rollouts and checkpoints are slow); a hung rank ends the job after it."""
    backend: str = "auto"
    """Process-group backend: auto (nccl with CUDA, gloo without), nccl or gloo."""


@dataclass
class TrainConfig:
    optimizer: str = "adamw"
    """Optimizer of the actor and critic: adamw, adam (L2 weight decay) or sgd (plain, no momentum)."""
    lr: float = 1e-6
    """Actor learning rate reached after warm-up (>= 0): kept with lr_schedule=constant, the start of the decay to min_lr with cosine."""
    min_lr: float = 0.0
    """Learning rate the cosine schedule ends at (<= lr; the critic's is capped at critic.lr); unused with constant."""
    lr_schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant (stays at lr) or cosine (from lr at the end of warm-up down to min_lr at the run's last optimizer step, max_steps x ppo_epochs x mini-batches per step)."""
    lr_warmup_steps: int = 0
    """Applied optimizer steps of linear warm-up from lr / lr_warmup_steps to lr, with either schedule; 0: no warm-up."""
    weight_decay: float = 0.0
    """Actor weight decay (>= 0): decoupled with adamw, an L2 term in the gradient with adam and sgd; biases and norm weights are exempt."""
    adam_beta1: float = 0.9
    """Decay rate of Adam's running mean of the gradients, in [0, 1); higher: smoother, slower-turning steps; unused by sgd."""
    adam_beta2: float = 0.999
    """Decay rate of Adam's running mean of the squared gradients, in [0, 1); higher: slower-adapting per-parameter step sizes; unused by sgd."""
    adam_eps: float = 1e-8
    """Added to the square root in Adam's denominator (> 0); larger damps the steps of parameters with tiny gradients; unused by sgd."""
    clip_grad: float = 1.0
    """Largest global gradient L2 norm: a larger gradient is scaled down to it before the step (0 disables; the logged grad_norm is before clipping)."""
    mini_batch_size: int = 512
    """Responses per optimizer step over all ranks; must divide the step's B x n responses and be a multiple of dp."""
    micro_batch_size: int = 4
    """Most responses per micro-batch per rank (a share's last micro-batch may hold fewer); memory and speed only: the mini-batch's gradient is the same, up to rounding, whatever the split."""
    max_tokens_per_micro_batch: int | None = None
    """Most tokens per micro-batch: of a packed row with pack_sequences, else padded (rows x longest sequence), so long responses go in smaller micro-batches; at least prompt_length + response_length; null: micro_batch_size x (prompt_length + response_length) when packing, no bound when padded."""
    pack_sequences: bool = True
    """Pack each micro-batch's sequences end to end into one row (megatron's THD layout: attention and positions restart per sequence), up to max_tokens_per_micro_batch tokens, instead of padding rows to their longest; the same numbers, less padding. Not with model.attention_backend=local; false: padded rows of at most micro_batch_size sequences."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over data-parallel ranks (ZeRO-1): less memory per rank; adam or adamw only."""
    offload_between_phases: bool = True
    """On GPUs, move idle models' parameters and optimizer states to CPU between phases."""
    max_consecutive_bad_steps: int = 10
    """Stop (exit 3) after this many steps in a row whose rewards all failed, updates were all skipped or gradient norm was 0; 0: never."""


@dataclass
class RolloutConfig:
    engine: str = "auto"
    """Rollout engine: auto (sglang when importable and CUDA is present, else hf), mcore, hf, fast (static KV cache, CUDA graphs; fed like hf) or sglang."""
    temperature: float = 1.0
    """Sampling temperature (> 0); log-probs everywhere are of softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling, in (0, 1]: sample from the smallest set of tokens holding this much probability; 1 disables (shapes sampling only; never renormalizes log-probs)."""
    top_k: int = -1
    """Top-k sampling: sample from the k most likely tokens (a positive integer); -1 disables (shapes sampling only, like top_p)."""
    mode: str = "colocated"
    """SGLang placement: colocated (servers on the training GPUs) or disaggregated (server_urls)."""
    tp: int = 1
    """SGLang server tensor-parallel size (consecutive local ranks share one server)."""
    server_urls: list[str] = field(default_factory=list)
    """Disaggregated mode: URLs of running SGLang servers (else the LITEPPO_SGLANG_URLS environment variable)."""
    mem_fraction_static: float = 0.5
    """Share of each GPU's memory, in (0, 1], that a colocated SGLang server takes for its weights and KV cache while generating (released while training); more: a larger KV cache, less room for anything else on the GPU then."""
    weight_sync_bucket_mb: int = 512
    """Most MiB of weights sent to the hf, fast or sglang engine in one piece after each update (a larger single tensor goes alone); larger: fewer transfers, more memory held at once."""
    check_weight_sync: bool = False
    """After each weight sync, check it: hf and fast compare every tensor with the trainer's, sglang compares greedy log-probs of a few probe prompts (mcore shares the trainer's weights); a mismatch stops the run."""
    max_batch_size: int | None = None
    """Most rows (prompt x sample) the hf and fast engines decode at once; null: all of a rank's rows. Bounds the fast engine's KV cache (rows x (prompt_length + response_length)) and its largest CUDA graph."""
    keep_cuda_graphs: bool | None = None
    """fast engine on a GPU: keep weights, KV cache and CUDA graphs on the GPU across sleep (true), free them (false), or keep them when they take at most a quarter of the GPU's memory (null)."""
    request_timeout_s: float = 600.0
    """Seconds one request to an SGLang server may take before it fails (and is retried, see max_retries); raise it when long generations time out."""
    max_retries: int = 3
    """Retries of an SGLang request after a connection error, a timeout or HTTP 500/502/503/504 (0: none) before the run stops with the error."""
    server_start_timeout_s: float = 600.0
    """Seconds to wait for an SGLang server (launched or in server_urls) to answer /health before the run stops; large models take minutes to load."""
    server_command: list[str] | None = None
    """Colocated SGLang: the program that starts a server, e.g. [/opt/sglang/bin/python, -m, sglang.launch_server] (SGLang pins its own torch, so it may live in another environment); null: this Python's -m sglang.launch_server."""


@dataclass
class DataConfig:
    train_path: str | None = None
    """Training prompts: a local JSONL or Parquet file (null with builtin_task)."""
    eval_path: str | None = None
    """Held-out prompts, same format (null with builtin_task)."""
    builtin_task: str | None = None
    """Name of a built-in synthetic task that needs no files (the embedded default uses one)."""
    format: str = "auto"
    """File format: auto (from the extension: .jsonl, .json, .ndjson or .parquet, .pq), jsonl or parquet."""
    prompt_key: str = "prompt"
    """Field holding the prompt: a string, or a chat list of {role, content} messages; every record needs it."""
    answer_key: str = "answer"
    """Field holding the reference answer (a string or a number) that the reward function gets; every record needs it."""
    system_key: str | None = None
    """Optional field holding a per-sample system prompt."""
    system_prompt: str | None = None
    """System prompt for every sample (a per-sample system_key wins)."""
    apply_chat_template: bool = True
    """Use the tokenizer's chat template when it has one."""
    shuffle: bool = True
    """Shuffle prompts each epoch, deterministically from the seed; false: file order."""


@dataclass
class RewardConfig:
    name: str = "math"
    """Reward function: a registered name (math, a built-in task), module:function or path/to/file.py:function."""
    timeout_s: float = 10.0
    """Per-sample time limit, in seconds; past it the worker process is killed and replaced, the sample scores 0 and counts in reward/errors and reward/timeouts."""
    num_workers: int = 4
    """Worker processes per data-parallel rank that score its responses in parallel; a batch runs in waves of this many samples."""


@dataclass
class CriticConfig:
    load: str | None = None
    """A checkpoint (run directory, its checkpoints/ or one iter_* folder) whose critic, value head included, the critic starts from (adv_estimator=gae); null: a copy of the actor's starting trunk with the value head at zero."""
    lr: float = 5e-6
    """Critic learning rate after warm-up (>= 0); optimizer, warm-up and schedule as train's, its cosine ending at min(train.min_lr, critic.lr)."""
    weight_decay: float = 0.0
    """Critic weight decay (>= 0), applied as train.weight_decay is for the actor (decoupled with adamw, L2 with adam and sgd)."""


@dataclass
class CheckpointConfig:
    save_interval: int = 50
    """Save every this many steps (and at the end); 0: only at the end."""
    load: str | None = None
    """Resume from this checkpoint; null: the run directory's latest, if any."""
    num_to_keep: int | None = None
    """Keep only the newest this many checkpoints; null keeps all."""
    save_on_signal: bool = True
    """On SIGTERM/SIGINT, save a checkpoint at the next safe point (after the update, or in place of a step not yet trained on), then exit."""
    verify: bool = True
    """Write a checksum of every checkpoint file at save and check them at load (a bad latest falls back to the newest good one)."""


@dataclass
class LoggingConfig:
    log_interval: int = 1
    """Print the step line (and write sample completions) every this many steps and at the last; metric files get every step."""
    tensorboard: bool = True
    """Write TensorBoard event files to the run directory."""
    num_sample_completions: int = 2
    """Completions (prompt, response, answer, reward) appended to samples.jsonl on each step that prints a step line; 0: none."""
    wandb_project: str | None = None
    """Also log to Weights & Biases when installed and this is set."""
    plot: bool = True
    """Write a PNG plot of reward and accuracy at the end."""
    peak_tflops: float | None = None
    """Peak matmul TFLOP/s per GPU for perf/mfu; null: not reported."""


@dataclass
class EvalConfig:
    interval: int = 0
    """Evaluate every this many steps and at the end (also at step 0 of a fresh run); 0: only at step 0 and the end."""
    num_samples: int = 1
    """Samples per held-out prompt: 1 gives greedy pass@1; k > 1 also gives sampled pass@k."""
    max_prompts: int | None = None
    """Use at most the first this many held-out prompts; null: all (either way rounded down to a multiple of dp)."""
    enabled: bool = True
    """Evaluate when held-out prompts exist (eval_path or builtin_task); false: never, whatever interval says."""


@dataclass
class LitePPOConfig:
    # --- the published LitePPO block (section 0 of the semantics) ---
    rollout_batch_size: int = 512
    """Prompts per step over all ranks (B); must be divisible by dp; a step has B x n responses."""
    prompt_length: int = 2048
    """Prompts longer than this many tokens (after the chat template) are dropped at load; prompt_length + response_length sizes the fast engine's KV cache."""
    response_length: int = 4096
    """Most new tokens per response; a response stopped by it counts in response_length/clip_ratio; also the divisor of seq-mean-token-sum-norm."""
    num_return_sequences_in_group: int = 8
    """Responses sampled per prompt (n), the group that reward_norm=group normalizes within (>= 2 then)."""
    ppo_epochs: int = 1
    """Passes over each step's batch, each reshuffled into mini-batches of train.mini_batch_size, one optimizer step each: ppo_epochs x B x n / mini_batch_size steps per training step."""
    adv_estimator: str = "gae"
    """Advantages: gae (needs the critic, which then exists), reinforce, grpo, rloo (leave-one-out baseline within the group) or reinforce_plus_plus (discounted returns with the token-level KL, whitened over the global batch)."""
    reward_norm: str | None = "group"
    """Reward normalization per response: group (centre on its prompt group's mean; std: see div_std_global), batch (the global batch's mean and std), running (mean and std of every reward so far) or null (raw scores)."""
    div_std_global: bool = True
    """With reward_norm=group: divide by the global batch std (LitePPO) instead of the group's (GRPO)."""
    reward_shift: bool = False
    """Only centre rewards (r - mean), no division; exclusive with reward_scale; no effect with reward_norm=null."""
    reward_scale: bool = False
    """Only scale rewards (r / std), no centring; exclusive with reward_shift; no effect with reward_norm=null."""
    reward_clip: float | None = None
    """Clamp normalized rewards (raw scores with reward_norm=null) to [-c, c]; null disables."""
    whiten_advantages: bool = True
    """Whiten advantages (subtract the mean, divide by the std) over all valid tokens of the global batch, before advantage_clip."""
    advantage_clip: float | None = 2.0
    """Clamp advantages to [-c, c] (after whitening, when on); null disables."""
    token_level_loss: bool = True
    """true: token-mean aggregation of the actor and critic losses, whatever loss_agg_mode says; false: loss_agg_mode decides."""
    loss_agg_mode: str = "seq-mean-token-sum"
    """Aggregation of the actor and critic losses when token_level_loss is false: token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm."""
    pg_clip: float = 0.2
    """PPO clip epsilon (> 0): the probability ratio is clipped to [1 - pg_clip, 1 + pg_clip]; smaller: smaller policy changes per update."""
    pg_clip_low: float | None = None
    """Lower clip epsilon (in (0, 1)): the ratio's lower bound is 1 - pg_clip_low; null: pg_clip."""
    pg_clip_high: float | None = None
    """Upper clip epsilon (> 0): the ratio's upper bound is 1 + pg_clip_high (clip-higher, DAPO: e.g. 0.28 with pg_clip_low 0.2); null: pg_clip."""
    dual_clip_loss: bool = True
    """Dual clip for negative advantages (bound the loss by -dual_clip_ratio * A)."""
    value_clip: float | None = None
    """Keep the critic's new values within value_clip of the old ones in the value loss (the larger of the clipped and unclipped errors counts); null disables."""
    gamma: float = 1.0
    """Per-token discount of rewards, in [0, 1], for gae and reinforce (1: none; lower shrinks the final reward's weight on early tokens); grpo ignores it."""
    lambd: float = 0.95
    """GAE's lambda, in [0, 1]: 1 gives returns minus the critic's values (more variance), 0 one-step TD errors (leans on the critic); only adv_estimator=gae reads it."""
    use_kl_loss: bool = True
    """Add kl_loss_coef * KL(actor, reference), estimated by kl_loss_type, to the actor loss (a frozen reference, a copy of the starting actor, then exists)."""
    kl_loss_coef: float = 0.001
    """Weight of the KL loss (>= 0), used when use_kl_loss is true; higher holds the actor closer to the reference."""
    add_token_level_kl: bool = False
    """Subtract beta * KL from the token-level rewards (beta: init_kl_coef, adapted with target_kl; a reference then exists); no effect with grpo, whose advantage is the normalized reward alone."""
    kl_penalty: str = "kl"
    """KL estimate in the reward (and the kl/mean metric): kl, abs, mse, k3 or full (exact, whole vocabulary; needs parallel.pp=1)."""
    init_kl_coef: float = 0.2
    """beta of the token-level KL penalty (>= 0): fixed when target_kl is null, else its starting value."""
    target_kl: float | None = None
    """KL per token (each response's mean, averaged over the step) that the adaptive controller steers beta towards (> 0); null: fixed beta = init_kl_coef."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon, in responses: each step changes beta by at most 20% x (B x n) / kl_horizon; larger: slower adaptation."""
    # --- added by this project ---
    dual_clip_ratio: float = 3.0
    """Dual-clip constant c (> 1): for negative advantages the loss is capped at -c * A; larger: a looser cap; used when dual_clip_loss is true."""
    kl_loss_type: str = "k3"
    """KL estimate of the KL loss, from d = logp - ref_logp per token: kl (d), abs (abs(d)), mse (d^2 / 2) or k3 (exp(-d) + d - 1, never negative; d clamped to [-20, 20] and the value to at most 10)."""
    entropy_coef: float = 0.0
    """Subtract entropy_coef * entropy from the actor loss; 0: entropy is only a metric."""
    overlong_filter: bool = False
    """Leave responses that reached response_length without an end-of-sequence token out of the actor and critic losses and of their denominators (DAPO's overlong filtering); they still count in the reward statistics."""
    rollout_is: str | None = None
    """Train-inference mismatch correction: token or sequence multiplies each token's policy-gradient term by min(exp(old_logp - rollout_logp), rollout_is_threshold), per token or of the response's sum, detached; null: off."""
    rollout_is_threshold: float = 2.0
    """Truncation of the rollout importance weight (>= 1); used when rollout_is is set."""
    filter_groups: bool = False
    """Dynamic sampling (DAPO): drop groups whose rewards are all equal and top the step up from further rollouts until it holds rollout_batch_size informative prompts (at most filter_groups_max_rounds rounds)."""
    filter_groups_max_rounds: int = 10
    """Most rollout rounds of one step with filter_groups (>= 1); after them the step trains on the informative groups it has."""
    seed: int = 42
    """Seed of every random stream (data order, init, mini-batch permutations, sampling)."""
    max_steps: int = 100
    """Training steps (each: one rollout of B prompts and its update), counted across resumes; also sets the cosine schedule's length."""
    output_dir: str = "outputs/liteppo"
    """Run directory: metrics, TensorBoard, checkpoints, samples."""
    # --- sections ---
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape and loading."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer and batching."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine and sampling."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt datasets."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward function."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """Critic (exists when adv_estimator is gae)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, metrics and plots."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""

    # Derived facts (which models exist), not configuration keys.
    @property
    def has_critic(self) -> bool:
        return self.adv_estimator == "gae"

    @property
    def has_reference(self) -> bool:
        return bool(self.use_kl_loss or self.add_token_level_kl)

    @property
    def num_responses_per_step(self) -> int:
        return self.rollout_batch_size * self.num_return_sequences_in_group

    def step_mini_batch_size(self, num_responses: int | None = None) -> int:
        """The mini-batch size of a step of `num_responses` responses (default: the configured step's):
        train.mini_batch_size, or the whole step as one mini-batch when it holds fewer responses (a
        filter_groups step short of informative groups: trainer/dynamic_sampling.py `kept_groups`)."""
        n = self.num_responses_per_step if num_responses is None else num_responses
        return max(1, min(self.train.mini_batch_size, n))

    def updates_per_step(self, num_responses: int | None = None) -> int:
        """Optimizer steps per model in one training step of `num_responses` responses (default: the
        configured step's): ppo_epochs x its mini-batches of `step_mini_batch_size`."""
        n = self.num_responses_per_step if num_responses is None else num_responses
        return self.ppo_epochs * (n // self.step_mini_batch_size(n))

    @property
    def micro_batch_tokens(self) -> int | None:
        """The token bound of a micro-batch: train.max_tokens_per_micro_batch, or, when packing without
        one, micro_batch_size x (prompt_length + response_length)."""
        t = self.train
        if t.max_tokens_per_micro_batch is not None or not t.pack_sequences:
            return t.max_tokens_per_micro_batch
        return t.micro_batch_size * (self.prompt_length + self.response_length)

    def needs_old_logp_pass(self, num_responses: int | None = None) -> bool:
        """Whether the old log-probs need a forward pass of their own before the update. Not with a single
        update and no reference: the update's first (and only) pass is the old policy, and the loss uses
        its detached log-probs. With several updates the policy moves between them; the KL terms (a
        reference exists) compare against the old log-probs before the update starts; the sequence-level
        rollout importance weight (rollout_is: sequence) needs each response's whole sum before the update
        splits it over micro-batches and CP ranks."""
        return self.updates_per_step(num_responses) > 1 or self.has_reference or self.rollout_is == "sequence"

    @property
    def effective_loss_agg_mode(self) -> str:
        return "token-mean" if self.token_level_loss else self.loss_agg_mode
