"""The RLVR step loop (docs/semantics.md section 5), one named call per stage:

    rollout -> reward -> normalization -> reference / old log-probs and values -> advantages
    -> actor and critic updates -> weight sync -> metrics -> eval -> checkpoint

Every rank runs this same loop (SPMD); actor, critic and reference live on every rank (colocated).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from liteppo_mcore.algo import global_moments, make_kl_controller
from liteppo_mcore.algo.normalization import RunningMoments
from liteppo_mcore.checkpoint.checkpointer import Checkpointer
from liteppo_mcore.checkpoint.pretrained import build_pretrained_models
from liteppo_mcore.checkpoint.trainer_state import rng_state, set_rng_state
from liteppo_mcore.config.loader import to_yaml
from liteppo_mcore.config.schema import LitePPOConfig
from liteppo_mcore.convert.hf_files import hf_config_from_shape, read_config
from liteppo_mcore.data import PromptSampler, build_datasets, shard_for_rank, tokenizer_from_config
from liteppo_mcore.models.forward import forward_full_kl, forward_per_token
from liteppo_mcore.models.shapes import HF_ARCHITECTURES
from liteppo_mcore.parallel.device import on_gpu
from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel
from liteppo_mcore.parallel.reducer import Reducer, all_gather_padded, make_allreduce_max
from liteppo_mcore.parallel.stage import set_stage, set_step, stage
from liteppo_mcore.rewards import RewardBatchCancelled, build_reward_runner
from liteppo_mcore.rollout import build_engine, eos_token_ids, sampling_params_from_config
from liteppo_mcore.rollout.engine import SamplingParams
from liteppo_mcore.rollout.exporter import WeightExporter
from liteppo_mcore.rollout.metrics import (
    PROBE_PROMPTS,
    PROBE_TOKENS,
    check_probe_logprobs,
    check_weights_equal,
    logprob_abs_diff,
    probe_tolerance,
)
from liteppo_mcore.trainer import dynamic_sampling, experience
from liteppo_mcore.trainer.health import StepHealth
from liteppo_mcore.update import ModelUpdater, gather_over_dp
from liteppo_mcore.update.offload import module_on_device, move_module, offload_enabled
from liteppo_mcore.utils.console import is_main_rank, print0, progress, run_summary, step_line
from liteppo_mcore.utils.flops import mfu, train_flops
from liteppo_mcore.utils.seeds import mix_seed
from liteppo_mcore.utils.sinks import SAMPLES_FILE, MetricsWriter, plot_metrics
from liteppo_mcore.utils.timers import PhaseTimer


@dataclass
class StepResult:
    """What one training step hands on to the loop that logs it."""

    metrics: dict[str, float]
    work: tuple[float, float] = (0.0, 0.0)
    """(tokens, model FLOPs) of the step over all DP ranks, for perf/*."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """A few completions for samples.jsonl (rank 0, on logging steps; each row has its step)."""
    num_responses: int = 0
    """Responses generated in the step over all DP ranks (every round with filter_groups); 0: the
    configured rollout_batch_size x n."""
    trained_responses: int = 0
    """Responses the update trained on over all DP ranks (the kept groups with filter_groups); 0: the
    configured rollout_batch_size x n, or no update."""


@dataclass
class ForwardPasses:
    """What the forward-only passes give beside the log-probs they write into the rollout's batch."""

    values: torch.Tensor | None = None
    """[N, T] the critic's values (gae)."""
    full_kl: torch.Tensor | None = None
    """[N, T] the exact KL(old || reference) per token (kl_penalty: full)."""


class Trainer:
    """Everything one rank holds for a run, and the step."""

    def __init__(self, cfg: LitePPOConfig) -> None:
        set_stage("setup", step=0)  # named by a collective that times out (parallel/hang.py)
        self.cfg = cfg
        self.run_dir = cfg.output_dir
        self._signal = False  # set by the SIGTERM/SIGINT handler: stop at the next safe point
        self.checkpointer = Checkpointer(cfg, self)
        self.checkpointer.acquire_lock()  # first: a second run on this directory stops before any work
        try:
            self._build()
        except BaseException:
            self.checkpointer.close()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        parallel = cfg.parallel
        self.groups = initialize_model_parallel(parallel.tp, parallel.pp, parallel.cp, seed=cfg.seed,
                                                timeout_minutes=parallel.timeout_minutes)
        self.reducer = Reducer(self.groups.dp_group, self.groups.dp_cp_group)
        self.tokenizer = tokenizer_from_config(cfg.model, cfg.data)
        self.train_set, self.eval_set = build_datasets(cfg.data, self.tokenizer, prompt_length=cfg.prompt_length)
        self.sampler = PromptSampler(len(self.train_set), cfg.rollout_batch_size, seed=cfg.seed,
                                     shuffle=cfg.data.shuffle)
        # the actor, its starting weights (model.load / model.hf_path), then the critic and reference from it
        self.models = build_pretrained_models(cfg, self.groups, vocab_size=cfg.model.vocab_size or len(self.tokenizer))
        self.vocab_size = self.models.shape.vocab_size
        self.actor = ModelUpdater(self.models.actor, "actor", cfg, self.groups, vocab_size=self.vocab_size)
        self.critic = (ModelUpdater(self.models.critic, "critic", cfg, self.groups, vocab_size=self.vocab_size)
                       if self.models.critic is not None else None)
        if self.models.reference is not None and offload_enabled(cfg.train.offload_between_phases):
            move_module(self.models.reference, torch.device("cpu"))  # on the GPU only for its forward pass
        self.eos_ids = eos_token_ids(self.tokenizer)  # a tokenizer without one is refused, naming the fix
        self.engine = build_engine(cfg, self.models, self.groups, self.eos_ids)
        self.exporter = (WeightExporter(self.models.actor, self.groups, self.models.shape,
                                        cfg.rollout.weight_sync_bucket_mb << 20)
                         if self.engine.needs_weight_sync else None)
        self.rewards = build_reward_runner(cfg.reward)
        self.kl_ctl = make_kl_controller(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.running_moments = RunningMoments() if cfg.reward_norm == "running" else None
        self.health = StepHealth.from_config(cfg)  # train.max_consecutive_bad_steps
        self.step = 0  # steps completed
        if is_main_rank():
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(to_yaml(cfg))
        print0(f"liteppo: resolved configuration in {os.path.join(self.run_dir, 'config.yaml')}")
        with stage("checkpoint"):
            resumed = self.resume()
        self.sinks = MetricsWriter(self.run_dir, enabled=is_main_rank(), tensorboard=cfg.logging.tensorboard,
                                   wandb_project=cfg.logging.wandb_project,
                                   resume_step=self.step if resumed else None)
        self.sync_weights(version=self.step)
        self._install_signal_handlers()
        set_stage(None)

    # ------------------------------------------------------------------ the run
    def fit(self) -> None:
        cfg = self.cfg
        if self.step == 0 and self._eval_enabled():
            with stage("eval", step=0):
                before_training = self.evaluate()
            self.sinks.write(0, before_training)
            print0("eval at step 0 | " + " | ".join(f"{k[len('eval/'):]} {v:.3f}" for k, v in before_training.items()))
        start = time.perf_counter()
        first = self.step
        while self.step < cfg.max_steps:
            taking = self.step + 1
            set_step(taking)
            t0 = time.perf_counter()
            before = (self.state_dict(), rng_state())  # what a step abandoned before its update restores
            result = self.train_step(taking)
            if result is None:  # a signal arrived before the update: the step is not taken
                self.load_state_dict(before[0])
                set_rng_state(before[1])
                self._stop(f"before step {taking} was trained on (it will run again)")
                return
            self.step = taking  # the step is taken: everything written from here on is labelled with it
            metrics = result.metrics
            self._write_samples(result.samples)
            stopping = self._stop_requested()
            if not stopping and self._eval_enabled() and (
                    self.step == cfg.max_steps or (cfg.eval.interval and self.step % cfg.eval.interval == 0)):
                with stage("eval"):
                    metrics.update(self.evaluate())
            log = functools.partial(self._log_step, metrics, result.work, step_start=t0, run_start=start,
                                    first_step=first)
            if stopping or self.checkpointer.should_save(self.step):
                with stage("checkpoint"):
                    self.checkpointer.save(self.step, before_final=log)  # the row is written before `latest` moves
            else:
                log()
            self.health.observe(self.step, metrics,  # exit 3 on a streak
                                num_responses=result.num_responses or cfg.num_responses_per_step,
                                updates_per_step=cfg.updates_per_step(result.trained_responses or None))
            if stopping:
                self._stop(f"after step {self.step}")
                return
        if is_main_rank() and cfg.logging.plot:
            plot_metrics(self.sinks.path, os.path.join(self.run_dir, "reward_accuracy.png"))
        if first < cfg.max_steps:
            self.sinks.flush()
            print0(run_summary(self.run_dir, self.sinks.path, steps=self.step - first,
                               seconds=time.perf_counter() - start, last_checkpoint=self.checkpointer.last_saved_step))

    def _log_step(self, metrics: dict[str, float], work: tuple[float, float], checkpoint_s: float | None = None, *,
                  step_start: float, run_start: float, first_step: int) -> None:
        """Write the row of the step just taken (with its time, and the checkpoint's when it saved) and, on
        logging steps, its console line."""
        cfg = self.cfg
        if checkpoint_s is not None:
            metrics["time/checkpoint"] = checkpoint_s
        step_s = time.perf_counter() - step_start
        metrics.update(self._perf(step_s, work))
        self.sinks.write(self.step, metrics)
        if self.step % cfg.logging.log_interval == 0 or self.step == cfg.max_steps:
            per_step = (time.perf_counter() - run_start) / (self.step - first_step)
            print0(step_line(self.step, cfg.max_steps, metrics, step_s, per_step * (cfg.max_steps - self.step)))

    def _stop(self, when: str) -> None:
        """End the run for a signal: the last completed step is checkpointed (saved now if it was not)."""
        if self.step and self.checkpointer.last_saved_step != self.step:
            with stage("checkpoint"):
                self.checkpointer.save(self.step)
        saved = "checkpoint saved" if self.step else "nothing to save yet"
        print0(f"liteppo: stopped by a signal {when}; {saved}. Run the same command again to resume.")

    def _model_work(self, rollout: experience.Rollout) -> tuple:
        """(tokens, model FLOPs) of the step over all DP ranks, Megatron's convention (utils/flops.py):
        every training pass over the non-padding tokens (forward-only passes count 1/3 of a training
        pass; updates count ppo_epochs times, for the critic too). Generation is not counted."""
        lens = (rollout.batch.prompt_lens + rollout.batch.response_lens).tolist()
        passes = self.cfg.ppo_epochs * (2 if self.critic is not None else 1)  # updates, fwd + bwd
        forward_only = sum(x is not None for x in (rollout.batch.ref_logp, rollout.batch.old_logp,
                                                   rollout.batch.old_values))
        flops = train_flops(self.models.shape, lens) * (passes + forward_only / 3)
        tokens, flops = self.reducer.dp_sum(torch.tensor([float(sum(lens)), flops], dtype=torch.float64)).tolist()
        return tokens, flops

    def _perf(self, step_s: float, work: tuple[float, float]) -> dict[str, float]:
        tokens, flops = work
        out = {"perf/step_s": step_s, "perf/tokens_per_s": tokens / step_s}
        peak = self.cfg.logging.peak_tflops
        if peak and torch.cuda.is_available():  # on CPU the figure would mean nothing: omitted
            world = torch.distributed.get_world_size()
            out["perf/mfu"] = mfu(flops, step_s, peak) / world
        return out

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT (scheduler pre-emption, Ctrl-C) stop the run at the next safe point: before
        the update (the step is dropped and runs again on resume) or after it (the step is saved).
        Later signals of a burst change nothing: the first one already asked for the stop."""
        if not self.cfg.checkpoint.save_on_signal:
            return

        def handler(signum, frame):
            self._signal = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Whether any rank got a signal (agreed on by all ranks, or the save would deadlock)."""
        with stage("signal_check"):
            flag = torch.tensor([1.0 if self._signal else 0.0])
            return bool(make_allreduce_max(torch.distributed.group.WORLD)(flag).item())

    def close(self) -> None:
        try:
            self.engine.shutdown()
            self.rewards.close()
            self.sinks.close()
            destroy_model_parallel()
        finally:
            self.checkpointer.close()

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> StepResult | None:
        """Take step `step` (1-based: the steps completed so far + 1); None when a signal came before the
        update (nothing changed but the data position and RNG, which the caller restores). The caller
        moves the step counter."""
        cfg, timer = self.cfg, PhaseTimer()
        if cfg.filter_groups:
            sampled = self._sampled_rollout(step, timer)
            if sampled is None:
                return None
            rollout, scores, metrics, generated = sampled
            if rollout is None:  # no group kept: no update; health reads the zero gradient (ZERO_GRADIENT)
                metrics["actor/grad_norm"] = 0.0
                with timer("sync"):
                    self.sync_weights(version=step)  # the engine slept: it may need the (unchanged) weights
                metrics.update(timer.metrics())
                return StepResult(metrics, num_responses=generated)
        else:
            with timer("rollout"):
                rollout = self.rollout(step)
            with timer("reward"):
                scored = self.score(rollout)
            if scored is None:
                return None
            scores, metrics = scored
            generated = cfg.num_responses_per_step
        num_responses = rollout.batch.size * self.groups.dp_size  # trained on: the kept groups with filter_groups
        with stage("normalization"):
            normalized = experience.normalized_rewards(scores, cfg, self.reducer, self.running_moments)
            moments = global_moments(normalized, allreduce_sum=self.reducer.dp_sum)
            metrics["reward/normalized_mean"] = float(moments.mean)
        passes = self.log_probs_and_values(rollout, timer)
        with stage("advantages"):
            metrics.update(experience.advantages_and_returns(rollout, normalized, cfg, self.reducer,
                                                             kl_coef=self.kl_ctl.value, values=passes.values,
                                                             full_kl=passes.full_kl))
        with stage("metrics"):
            metrics.update(experience.rollout_metrics(rollout, self.reducer))
        with timer("train"):
            metrics.update(self.update(rollout, step))
        with timer("sync"):
            self.sync_weights(version=step)
        with stage("metrics"):
            if "kl/mean" in metrics:
                metrics["kl/coef"] = self.kl_ctl.value
                self.kl_ctl.update(metrics["kl/mean"], num_responses)
            metrics.update(timer.metrics())
            return StepResult(metrics, work=self._model_work(rollout), samples=self._samples(step, rollout, scores),
                              num_responses=generated, trained_responses=num_responses)

    def rollout(self, step: int, round_index: int = 0, *, sleep: bool = True) -> experience.Rollout:
        """This rank's share of the sampler's next rollout_batch_size prompts, generated: round
        `round_index` of step `step` (dynamic sampling's rounds: trainer/dynamic_sampling.py; round 0 is
        a step's only one without filter_groups). The engine sleeps afterwards unless `sleep` is false."""
        samples = shard_for_rank(self.train_set.select(self.sampler.next_batch()), self.groups.dp_rank,
                                 self.groups.dp_size)
        params = self._sampling(n=self.cfg.num_return_sequences_in_group,
                                seed=dynamic_sampling.round_seed(self.cfg.seed, step, round_index, self.groups.dp_rank))
        prompts = [s.prompt_ids for s in samples]
        self.engine.wake()
        total = len(prompts) * params.n * self.groups.dp_size  # the bar counts the whole round's responses
        desc = f"rollout {step}" if round_index == 0 else f"rollout {step} round {round_index + 1}"
        with progress(total, desc) as bar:
            generations = self.engine.generate(prompts, params,
                                               on_progress=lambda k: bar.update(k * self.groups.dp_size))
            bar.update(total - bar.n)
        if sleep:
            self.engine.sleep()
        return experience.build_rollout(prompts, [s.answer for s in samples], generations, self.tokenizer)

    def score(self, rollout: experience.Rollout):
        """(scores, reward metrics); None when a stop signal came before or during scoring (the
        question is settled by every rank here, before the next collective)."""
        raw = self._raw_scores(rollout)
        if raw is None:
            return None
        scores, stats = raw
        return scores, self._reward_metrics(scores, [stats])

    def _raw_scores(self, rollout: experience.Rollout) -> tuple[torch.Tensor, dict] | None:
        """This rank's raw scores of `rollout` and the reward runner's counts; None when a stop signal came
        before or during scoring (settled by every rank here, before the next collective)."""
        try:
            raw, stats = self.rewards(rollout.response_texts, rollout.answers, should_stop=lambda: self._signal)
        except RewardBatchCancelled:
            raw = None  # this rank's signal: _stop_requested() below is true on every rank
        if self._stop_requested():
            return None
        return torch.tensor(raw, dtype=torch.float64), stats

    def _reward_metrics(self, scores: torch.Tensor, stats: list[dict]) -> dict[str, float]:
        """`reward/{mean,std,max,min}` of `scores` (this rank's: every response scored in the step) and
        `reward/{errors,timeouts}` of the runner's counts `stats` (one per scoring), over every DP rank."""
        metrics = experience.global_summary(scores, self.reducer, "reward")
        errors = sum(s.get("reward/errors", 0.0) for s in stats)
        timeouts = sum(s.get("reward/timeouts", 0.0) for s in stats)
        counts = self.reducer.dp_sum(torch.tensor([errors, timeouts]))
        metrics["reward/errors"], metrics["reward/timeouts"] = float(counts[0]), float(counts[1])
        return metrics

    def _sampled_rollout(self, step: int, timer: PhaseTimer):
        """Dynamic sampling (filter_groups; trainer/dynamic_sampling.py): rollout rounds until the step
        holds rollout_batch_size informative groups over all DP ranks, or filter_groups_max_rounds rounds
        ran; the groups kept (`kept_groups`) spread evenly over the DP ranks.

        Returns (this rank's kept rollout, their raw scores, the metrics, the responses generated over all
        ranks); the rollout and scores are None when no group is kept (the step makes no update); None
        when a stop signal came during scoring."""
        cfg, g = self.cfg, self.groups
        n, target = cfg.num_return_sequences_in_group, cfg.rollout_batch_size
        rounds: list[tuple[experience.Rollout, torch.Tensor, torch.Tensor]] = []
        stats: list[dict] = []
        counts: list[list[int]] = []  # [round][DP rank] informative groups
        try:  # the engine stays awake between rounds (a sleeping engine may have released its weights)
            while len(rounds) < cfg.filter_groups_max_rounds and sum(map(sum, counts)) < target:
                with timer("rollout"):
                    rollout = self.rollout(step, len(rounds), sleep=False)
                with timer("reward"):
                    raw = self._raw_scores(rollout)
                if raw is None:
                    return None
                scores, round_stats = raw
                informative = dynamic_sampling.informative_groups(scores, n)
                with stage("dynamic_sampling"):
                    counts.append(all_gather_padded(informative.sum().reshape(1), g.dp_group).tolist())
                rounds.append((rollout, scores, informative))
                stats.append(round_stats)
        finally:
            self.engine.sleep()
        found = sum(map(sum, counts))
        kept = dynamic_sampling.kept_groups(found, target=target, group_size=n,
                                            mini_batch_size=cfg.train.mini_batch_size, dp_size=g.dp_size)
        with timer("reward"):  # over every response generated in the step
            metrics = self._reward_metrics(torch.cat([scores for _, scores, _ in rounds]), stats)
        metrics.update({"rollout/generation_rounds": float(len(rounds)),
                        "rollout/filtered_groups": float(len(rounds) * target - found),
                        "rollout/informative_groups": float(kept)})
        generated = len(rounds) * cfg.num_responses_per_step
        if found < target:
            what = f"training on {kept}" if kept else "no update"
            print0(f"liteppo: step {step}: {found} informative groups of the {target} wanted after {len(rounds)} "
                   f"rounds (filter_groups_max_rounds={cfg.filter_groups_max_rounds}); {what}")
        if kept == 0:
            return None, None, metrics, generated
        mine = []
        for (rollout, scores, informative), per_rank in zip(rounds, dynamic_sampling.take_first(counts, kept)):
            rows = dynamic_sampling.group_rows(informative.nonzero().flatten()[:per_rank[g.dp_rank]], n)
            mine.append((experience.select_responses(rollout, rows), scores[rows]))
        with stage("dynamic_sampling"):
            by_rank = dynamic_sampling.gather_objects(mine, g.dp_group)
        rollout, scores = dynamic_sampling.spread_kept(by_rank, g.dp_rank, g.dp_size, n)
        return rollout, scores, metrics, generated

    def _micro_batching(self) -> dict:
        """The forward passes' vocabulary and micro-batch keyword arguments: the training micro-batches'
        bounds (rows, tokens, packing), so that what fits the update fits here."""
        cfg = self.cfg
        return dict(vocab_size=self.vocab_size, micro_batch_size=cfg.train.micro_batch_size,
                    max_tokens_per_micro_batch=cfg.micro_batch_tokens, pack=cfg.train.pack_sequences,
                    sequence_parallel=cfg.parallel.sequence_parallel)

    def log_probs_and_values(self, rollout: experience.Rollout, timer: PhaseTimer) -> ForwardPasses:
        """The forward-only passes: reference and old log-probs (the latter only when something needs them
        before the update: `needs_old_logp_pass`), written into `rollout.batch`; the critic's values and
        the exact KL (kl_penalty: full), returned."""
        batch, cfg = rollout.batch, self.cfg
        seqs = batch.sequences()
        kw = self._micro_batching()
        passes = ForwardPasses()
        if self.models.reference is not None:
            with timer("ref"), module_on_device(self.models.reference,
                                                offload_enabled(cfg.train.offload_between_phases)) as reference:
                batch.ref_logp = forward_per_token(reference, seqs, self.groups, compute_entropy=False,
                                                   temperature=cfg.rollout.temperature, **kw)["logp"]
                if cfg.kl_penalty == "full":  # the exact KL needs both models' logits: while the reference is here
                    passes.full_kl = forward_full_kl(self.models.actor, reference, seqs, self.groups,
                                                     temperature=cfg.rollout.temperature, **kw)
        if cfg.needs_old_logp_pass(batch.size * self.groups.dp_size):
            with timer("old_logp"):
                batch.old_logp = forward_per_token(self.models.actor, seqs, self.groups, compute_entropy=False,
                                                   temperature=cfg.rollout.temperature, **kw)["logp"]
        if batch.old_logp is None or cfg.rollout_is is not None:
            # the update's own pass gives the mismatch metric (no old-log-prob pass); rollout_is weighs by it
            batch.rollout_logp = rollout.rollout_logp
        if self.models.critic is not None:
            with timer("values"):
                passes.values = forward_per_token(self.models.critic, seqs, self.groups, kind="critic", **kw)["values"]
        return passes

    def update(self, rollout: experience.Rollout, step: int) -> dict[str, float]:
        """The actor's (and critic's) update of step `step` from the step's whole batch."""
        metrics: dict[str, float] = {}
        if rollout.batch.old_logp is not None:
            metrics["rollout/logprob_abs_diff"] = logprob_abs_diff(rollout.rollout_logp, rollout.batch.old_logp,
                                                                   rollout.mask, allreduce=self.reducer.dp_sum)
        step_batch = gather_over_dp(rollout.batch, self.groups)
        metrics.update(self.actor.update(step_batch, step - 1))
        if self.critic is not None:
            metrics.update(self.critic.update(step_batch, step - 1))
        return metrics

    def sync_weights(self, version: int) -> None:
        """Push the actor's weights (those after step `version`) to the engine; it stays awake until the
        next rollout is done."""
        if self.exporter is not None:
            if on_gpu():
                torch.cuda.empty_cache()  # hand the training phase's cached blocks back before the engine wakes
            self.engine.wake()  # memory back first: loading into a sleeping engine would peak later
            self.engine.update_weights(self.exporter.buckets(), weight_version=str(version))
            if self.cfg.rollout.check_weight_sync:
                if getattr(self.engine, "get_weight", None) is not None:
                    check_weights_equal(self.engine, self.exporter)  # exact: the engine shows its copy
                else:
                    self._check_probe_logprobs()  # servers that cannot show their weights (SGLang)

    def _check_probe_logprobs(self) -> None:
        """`rollout.check_weight_sync` for engines that cannot report their weights: greedy answers to a
        fixed probe (the first prompts of the training set) at temperature 1, whose log-probs under the
        engine must match the trainer's recomputation (rollout/metrics.py check_probe_logprobs)."""
        count = min(PROBE_PROMPTS, len(self.train_set))
        prompts = [s.prompt_ids for s in self.train_set.select(range(count))]
        params = SamplingParams(temperature=1.0, max_new_tokens=min(PROBE_TOKENS, self.cfg.response_length),
                                greedy=True, stop_token_ids=self.eos_ids)
        generations = self.engine.generate(prompts, params)
        probe = experience.build_rollout(prompts, ["" for _ in prompts], generations, self.tokenizer)
        trainer = forward_per_token(self.models.actor, probe.batch.sequences(), self.groups, compute_entropy=False,
                                    temperature=1.0, **self._micro_batching())["logp"]
        check_probe_logprobs(probe.rollout_logp, trainer, probe.mask, engine=self.engine.name,
                             atol=probe_tolerance(next(self.models.actor.parameters()).dtype))

    # ------------------------------------------------------------------ checkpoints (checkpoint/checkpointer.py)
    def checkpointed(self):
        """(models, optimizers) by name: what a checkpoint holds besides the trainer's own state."""
        models = {"actor": self.models.actor}
        optimizers = {"actor": self.actor.optimizer}
        if self.critic is not None:
            models["critic"], optimizers["critic"] = self.models.critic, self.critic.optimizer
        if self.models.reference is not None and not (self.cfg.model.load or self.cfg.model.hf_path):
            models["reference"] = self.models.reference  # random initial weights: cannot be rebuilt
        return models, optimizers

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own state (plain data, the same on every rank)."""
        return {"step": self.step, "kl_ctl": self.kl_ctl.state_dict(), "sampler": self.sampler.state_dict(),
                "running": self.running_moments.state_dict() if self.running_moments is not None else None,
                "num_updates": {"actor": self.actor.num_updates,
                                "critic": self.critic.num_updates if self.critic is not None else 0},
                "health": self.health.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.sampler.load_state_dict(state["sampler"])
        if self.running_moments is not None and state.get("running"):
            self.running_moments.load_state_dict(state["running"])
        self.actor.num_updates = int(state["num_updates"]["actor"])
        if self.critic is not None:
            self.critic.num_updates = int(state["num_updates"]["critic"])
        self.health.load_state_dict(state.get("health", {}))

    def resume(self) -> bool:
        """Continue from `checkpoint.load`, else the run directory's latest intact checkpoint, if any."""
        folder = self.checkpointer.load()
        if folder is not None and self.step >= self.cfg.max_steps:
            print0(f"liteppo: this run is already complete at step {self.step} ({folder}): raise max_steps to "
                   "continue it, or choose another output_dir to start a new one.")
        elif folder is not None:
            print0(f"liteppo: resumed from {folder} at step {self.step}")
        return folder is not None

    def hf_config(self) -> dict:
        if self.cfg.model.hf_path:
            return read_config(self.cfg.model.hf_path)
        arch = next(a for a, family in HF_ARCHITECTURES.items() if family == self.models.shape.family)
        return hf_config_from_shape(self.models.shape, arch, self.models.config.params_dtype)

    # ------------------------------------------------------------------ evaluation and outputs
    def _eval_enabled(self) -> bool:
        return self.cfg.eval.enabled and self.eval_set is not None and len(self.eval_set) > 0

    def evaluate(self) -> dict[str, float]:
        """Greedy pass@1 (`eval/accuracy`: the share of held-out prompts whose reward is 1) and, with
        `eval.num_samples = k > 1`, sampled `eval/pass@k`."""
        cfg, ev = self.cfg, self.cfg.eval
        eval_set = self.eval_set
        if eval_set is None:  # the loop calls this only when _eval_enabled()
            raise RuntimeError("evaluate() needs held-out prompts: set data.eval_path or data.builtin_task")
        count = len(eval_set) if ev.max_prompts is None else min(ev.max_prompts, len(eval_set))
        samples = shard_for_rank(eval_set.select(range(count - count % self.groups.dp_size)),
                                 self.groups.dp_rank, self.groups.dp_size)
        prompts, answers = [s.prompt_ids for s in samples], [s.answer for s in samples]
        self.engine.wake()
        runs = [(1, self._sampling(n=1, seed=0, greedy=True))]
        if ev.num_samples > 1:
            runs.append((ev.num_samples, self._sampling(n=ev.num_samples, seed=mix_seed(cfg.seed, self.step, 7))))
        metrics = {}
        for k, params in runs:
            generations = self.engine.generate(prompts, params)
            texts = [self.tokenizer.decode(g.token_ids, skip_special_tokens=True)
                     for group in generations for g in group]
            scores, _ = self.rewards(texts, [a for a in answers for _ in range(k)])
            solved = torch.tensor(scores, dtype=torch.float64).reshape(-1, k) >= 1.0 - 1e-9
            hits = self.reducer.dp_sum(torch.tensor([float(solved.any(dim=1).sum()), float(len(prompts))]))
            metrics["eval/accuracy" if k == 1 else f"eval/pass@{k}"] = float(hits[0] / hits[1].clamp(min=1))
        # No sleep here: a rollout (or the end of the run) follows, and releasing the weights would
        # need a push before the next generation; the rollout's own sleep frees memory for training.
        return metrics

    def _sampling(self, *, n: int, seed: int, greedy: bool = False) -> SamplingParams:
        return sampling_params_from_config(self.cfg, greedy=greedy, n=n, seed=seed, stop_token_ids=self.eos_ids)

    def _samples(self, step: int, rollout: experience.Rollout, scores: torch.Tensor) -> list[dict[str, Any]]:
        """`logging.num_sample_completions` rows of step `step` for samples.jsonl: on rank 0 and on the
        steps the console logs (every `logging.log_interval` and the last), else none."""
        k = self.cfg.logging.num_sample_completions
        logged = step % self.cfg.logging.log_interval == 0 or step == self.cfg.max_steps
        if not is_main_rank() or k <= 0 or not logged:
            return []
        prompts = self.tokenizer.batch_decode([row[:int(p)] for row, p in zip(rollout.batch.tokens[:k].tolist(),
                                                                              rollout.batch.prompt_lens[:k])])
        return [{"step": step, "prompt": prompt, "response": text, "answer": answer, "reward": score}
                for prompt, text, answer, score in zip(prompts, rollout.response_texts[:k], rollout.answers[:k],
                                                       scores[:k].tolist())]

    def _write_samples(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        with open(os.path.join(self.run_dir, SAMPLES_FILE), "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def run_training(cfg: LitePPOConfig) -> int:
    """Run training for `cfg` on this process; returns the exit status."""
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0
