"""The configuration schema: one dataclass per concern, each field with a one-line docstring.

Root keys are spelled as in the published LitePPO configuration block, so that block can be pasted
into a YAML file. Everything else lives in sections. The docstrings under the fields are read by
`liteppo_mcore.config.docs` to build the README's configuration table, so keep them to one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# The allowed values of the keys that take a fixed set of strings (family, dtype, engine, ...) live in
# `liteppo_mcore.config.choices`, their one home; `config.validate` checks against them. A docstring below
# that names the values must name all of them (a unit test checks).


@dataclass
class ModelConfig:
    family: str = "qwen2"
    """Model family: qwen2 (Qwen2/2.5, QKV bias), qwen3 (q/k norm) or llama (Llama 2/3)."""
    hf_path: Optional[str] = None
    """Hugging Face model directory; when set, shapes (and weights) come from its config.json."""
    load: Optional[str] = None
    """Megatron checkpoint (run dir, checkpoints/ or iter_* folder) to initialize the actor from."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory; null: hf_path, or the built-in task's tokenizer."""
    num_layers: int = 2
    """Transformer layers (ignored when hf_path is set)."""
    hidden_size: int = 64
    """Hidden size (ignored when hf_path is set)."""
    ffn_hidden_size: int = 256
    """SwiGLU intermediate size (ignored when hf_path is set)."""
    num_attention_heads: int = 4
    """Query heads (ignored when hf_path is set)."""
    num_query_groups: int = 2
    """Key/value heads for GQA (ignored when hf_path is set)."""
    vocab_size: Optional[int] = None
    """Vocabulary size before TP padding; null: the tokenizer's size."""
    max_position_embeddings: int = 32768
    """Longest sequence the rotary embedding is built for."""
    rope_theta: float = 1000000.0
    """Rotary embedding base."""
    rope_scaling: Optional[Dict[str, Any]] = None
    """Llama-3 style rope scaling (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output layer."""
    dtype: str = "auto"
    """Parameter/compute dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."""
    init_std: float = 0.02
    """Std of the random initialization when no weights are loaded."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times tp."""
    attention_backend: str = "auto"
    """Core attention: auto (te if importable, else sdpa), sdpa, local (megatron's) or te."""
    recompute_granularity: Optional[str] = None
    """Activation recompute: null, selective (attention core) or full (whole layers)."""
    recompute_method: str = "uniform"
    """With full recompute: uniform or block."""
    recompute_num_layers: int = 1
    """With full recompute: layers per recompute chunk (uniform) or recomputed layers (block)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
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
    """Actor peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    lr_schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant or cosine (over max_steps optimizer steps)."""
    lr_warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    mini_batch_size: int = 512
    """Responses per optimizer step, global (the rollout batch of N responses splits into these)."""
    micro_batch_size: int = 4
    """Most responses per micro-batch per rank (a share's last micro-batch may hold fewer)."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Optional bound on tokens per micro-batch; long responses then go in smaller micro-batches."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over data-parallel ranks (ZeRO-1)."""
    offload_between_phases: bool = True
    """On GPUs, move idle models' parameters and optimizer states to CPU between phases."""
    max_consecutive_bad_steps: int = 10
    """Stop (exit 3) after this many steps in a row whose rewards all failed, updates were all skipped or gradient norm was 0; 0: never."""


@dataclass
class RolloutConfig:
    engine: str = "auto"
    """Rollout engine: auto (sglang when importable and CUDA is present, else hf), mcore, hf, fast (static KV cache, CUDA graphs; fed like hf) or sglang."""
    temperature: float = 1.0
    """Sampling temperature; log-probs everywhere are of softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling (shapes sampling only; never renormalizes log-probs)."""
    top_k: int = -1
    """Top-k sampling; -1 disables."""
    mode: str = "colocated"
    """SGLang placement: colocated (servers on the training GPUs) or disaggregated (server_urls)."""
    tp: int = 1
    """SGLang server tensor-parallel size (consecutive local ranks share one server)."""
    server_urls: List[str] = field(default_factory=list)
    """Disaggregated mode: URLs of running SGLang servers (else the LITEPPO_SGLANG_URLS environment variable)."""
    mem_fraction_static: float = 0.5
    """SGLang's static memory fraction on colocated GPUs."""
    weight_sync_bucket_mb: int = 512
    """Size of one weight-sync bucket, in MiB."""
    check_weight_sync: bool = False
    """After each sync, check that the engine's weights equal the trainer's."""
    max_batch_size: Optional[int] = None
    """Most rows (prompt x sample) the hf and fast engines decode at once; null: all of a rank's rows. Bounds the fast engine's KV cache (rows x (prompt_length + response_length)) and its largest CUDA graph."""
    keep_cuda_graphs: Optional[bool] = None
    """fast engine on a GPU: keep weights, KV cache and CUDA graphs on the GPU across sleep (true), free them (false), or keep them when they take at most a quarter of the GPU's memory (null)."""
    request_timeout_s: float = 600.0
    """Time limit of one request to a rollout server."""
    max_retries: int = 3
    """Retries of a failed request before the error is raised."""
    server_start_timeout_s: float = 600.0
    """How long to wait for a launched server to report healthy."""
    server_command: Optional[List[str]] = None
    """Colocated SGLang: the program that starts a server, e.g. [/opt/sglang/bin/python, -m, sglang.launch_server] (SGLang pins its own torch, so it may live in another environment); null: this Python's -m sglang.launch_server."""


@dataclass
class DataConfig:
    train_path: Optional[str] = None
    """Training prompts: a local JSONL or Parquet file (null with builtin_task)."""
    eval_path: Optional[str] = None
    """Held-out prompts, same format (null with builtin_task)."""
    builtin_task: Optional[str] = None
    """Name of a built-in synthetic task that needs no files (the embedded default uses one)."""
    format: str = "auto"
    """File format: auto (from the extension), jsonl or parquet."""
    prompt_key: str = "prompt"
    """Field holding the prompt text."""
    answer_key: str = "answer"
    """Field holding the reference answer."""
    system_key: Optional[str] = None
    """Optional field holding a per-sample system prompt."""
    system_prompt: Optional[str] = None
    """System prompt for every sample (a per-sample system_key wins)."""
    apply_chat_template: bool = True
    """Use the tokenizer's chat template when it has one."""
    shuffle: bool = True
    """Shuffle prompts each epoch, deterministically from the seed."""


@dataclass
class RewardConfig:
    name: str = "math"
    """Reward function: a registered name (math, a built-in task), module:function or path/to/file.py:function."""
    timeout_s: float = 10.0
    """Per-sample time limit; past it the worker process is killed and replaced, the sample scores 0 and counts in reward/errors and reward/timeouts."""
    num_workers: int = 4
    """Worker processes scoring one batch (per data-parallel rank)."""


@dataclass
class CriticConfig:
    load: Optional[str] = None
    """Checkpoint to start the critic trunk from; null: the actor's initial weights."""
    lr: float = 5e-6
    """Critic peak learning rate (schedule and optimizer as train)."""
    weight_decay: float = 0.0
    """Critic weight decay."""


@dataclass
class CheckpointConfig:
    save_interval: int = 50
    """Save every this many steps (and at the end); 0: only at the end."""
    load: Optional[str] = None
    """Resume from this checkpoint; null: the run directory's latest, if any."""
    num_to_keep: Optional[int] = None
    """Keep only the newest this many checkpoints; null keeps all."""
    save_on_signal: bool = True
    """On SIGTERM/SIGINT, save a checkpoint at the next safe point (after the update, or in place of a step not yet trained on), then exit."""
    verify: bool = True
    """Write a checksum of every checkpoint file at save and check them at load (a bad latest falls back to the newest good one)."""


@dataclass
class LoggingConfig:
    log_interval: int = 1
    """Print the step line every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to the run directory."""
    num_sample_completions: int = 2
    """Sample completions written each logging step."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases when installed and this is set."""
    plot: bool = True
    """Write a PNG plot of reward and accuracy at the end."""
    peak_tflops: Optional[float] = None
    """Peak matmul TFLOP/s per GPU for perf/mfu; null: not reported."""


@dataclass
class EvalConfig:
    interval: int = 0
    """Evaluate every this many steps (also at step 0 and at the end); 0: only at step 0 and the end."""
    num_samples: int = 1
    """Samples per held-out prompt: 1 gives greedy pass@1; k > 1 also gives sampled pass@k."""
    max_prompts: Optional[int] = None
    """Use at most this many held-out prompts; null: all."""
    enabled: bool = True
    """Run evaluation at all."""


@dataclass
class LitePPOConfig:
    # --- the published LitePPO block (section 0 of the semantics) ---
    rollout_batch_size: int = 512
    """Prompts per step, global (B)."""
    prompt_length: int = 2048
    """Prompts longer than this many tokens are dropped at load."""
    response_length: int = 4096
    """Most new tokens per response."""
    num_return_sequences_in_group: int = 8
    """Responses per prompt (n); the group of a prompt."""
    ppo_epochs: int = 1
    """Passes over each step's batch."""
    adv_estimator: str = "gae"
    """Advantages: gae (needs the critic, which then exists), reinforce or grpo."""
    reward_norm: Optional[str] = "group"
    """Reward normalization: group, batch, running or null."""
    div_std_global: bool = True
    """With reward_norm=group: divide by the global batch std (LitePPO) instead of the group's (GRPO)."""
    reward_shift: bool = False
    """Only centre rewards (r - mean), no division; exclusive with reward_scale."""
    reward_scale: bool = False
    """Only scale rewards (r / std), no centring; exclusive with reward_shift."""
    reward_clip: Optional[float] = None
    """Clamp normalized rewards to [-c, c]; null disables."""
    whiten_advantages: bool = True
    """Whiten advantages over all valid tokens of the global batch."""
    advantage_clip: Optional[float] = 2.0
    """Clamp advantages to [-c, c] after whitening; null disables."""
    token_level_loss: bool = True
    """Token-mean loss aggregation (overrides loss_agg_mode)."""
    loss_agg_mode: str = "seq-mean-token-sum"
    """Aggregation when token_level_loss is false: token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm."""
    pg_clip: float = 0.2
    """PPO ratio clip epsilon."""
    dual_clip_loss: bool = True
    """Dual clip for negative advantages (bound the loss by -dual_clip_ratio * A)."""
    value_clip: Optional[float] = None
    """Critic value clip around the old values; null disables."""
    gamma: float = 1.0
    """Discount."""
    lambd: float = 0.95
    """GAE lambda."""
    use_kl_loss: bool = True
    """Add kl_loss_coef * KL(actor || reference) to the actor loss."""
    kl_loss_coef: float = 0.001
    """Weight of the KL loss."""
    add_token_level_kl: bool = False
    """Subtract beta * KL from the token-level rewards."""
    kl_penalty: str = "kl"
    """KL estimate in the reward: kl, abs, mse, k3 or full (exact, whole vocabulary)."""
    init_kl_coef: float = 0.2
    """Initial beta of the token-level KL."""
    target_kl: Optional[float] = None
    """Adaptive KL controller target; null: fixed beta = init_kl_coef."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon."""
    # --- added by this project ---
    dual_clip_ratio: float = 3.0
    """Dual-clip constant c (> 1)."""
    kl_loss_type: str = "k3"
    """KL estimate of the KL loss: kl, abs, mse or k3."""
    entropy_coef: float = 0.0
    """Subtract entropy_coef * entropy from the actor loss; 0: entropy is only a metric."""
    seed: int = 42
    """Seed of every random stream (data order, init, mini-batch permutations, sampling)."""
    max_steps: int = 100
    """Training steps."""
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

    def updates_per_step(self, num_responses: Optional[int] = None) -> int:
        """Optimizer steps per model in one training step of `num_responses` responses (default: the
        configured step's): ppo_epochs x its mini-batches."""
        n = self.num_responses_per_step if num_responses is None else num_responses
        return self.ppo_epochs * (n // self.train.mini_batch_size)

    def needs_old_logp_pass(self, num_responses: Optional[int] = None) -> bool:
        """Whether the old log-probs need a forward pass of their own before the update. Not with a single
        update and no reference: the update's first (and only) pass is the old policy, and the loss uses
        its detached log-probs. With several updates the policy moves between them; the KL terms (a
        reference exists) compare against the old log-probs before the update starts."""
        return self.updates_per_step(num_responses) > 1 or self.has_reference

    @property
    def effective_loss_agg_mode(self) -> str:
        return "token-mean" if self.token_level_loss else self.loss_agg_mode
