"""LitePPO training entry point.

    torchrun --nproc_per_node N launch/pretrain_liteppo.py --config examples/liteppo.yaml [key.path=value ...]

Parse -> validate (before any process group exists) -> initialize distributed -> run.
A bad configuration, or bad input found while starting (a missing model or data path, an unreachable
rollout server, a run directory holding another run's checkpoint), exits with status 2 and a message
that says what to fix, without a traceback. The circuit breaker (`train.max_consecutive_bad_steps`)
and non-finite weights after an update exit with status 3 (liteppo_mcore/trainer/health.py). A
collective that times out (another rank stopped or hung
for `parallel.timeout_minutes`) or loses its peer (another rank died) exits with status 4 and a message
naming the collective, the place that called it, the stage and the step (liteppo_mcore/parallel/hang.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.config import ConfigError, load_config, to_yaml, world_size_from_env  # noqa: E402

EXIT_CONFIG = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML configuration file (see examples/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate for this world size, set up the process groups, print the layout, exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="configuration overrides")
    return parser.parse_args(argv)


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


# megatron-core's warnings that it runs without Transformer Engine or apex (one per module that falls
# back); replaced by one line of ours that says what it means.
MISSING_KERNELS_WARNINGS = r"(Transformer Engine and Apex are|Apex is) not installed"


def library_warnings() -> None:
    """Library warnings once per job: rank 0 shows them, the other ranks would repeat them word for word.
    megatron's several "not installed" fallbacks become one line (missing_kernels_line)."""
    import warnings

    warnings.filterwarnings("ignore", message=MISSING_KERNELS_WARNINGS)
    if not is_rank0():
        for module in (r"megatron(\.|$)", r"transformers(\.|$)", r"torch(\.|$)"):
            warnings.filterwarnings("ignore", module=module)


def missing_kernels_line() -> str:
    """One line naming the optional kernel packages megatron-core runs without, or "" when both are there."""
    import importlib.util

    missing = [name for name, module in (("Transformer Engine", "transformer_engine"), ("apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if not missing:
        return ""
    return (f"liteppo: {' and '.join(missing)} not installed: megatron-core uses its local layers, norms and "
            "torch's optimizers instead (expected on CPU; on GPUs see README.md, 'Installing into an existing "
            "environment')")


def ignored_loss_agg_mode(cfg) -> bool:
    """Whether the configuration sets loss_agg_mode to something token_level_loss=true overrides (a
    loss_agg_mode left at its default is not news)."""
    from liteppo_mcore.config.schema import LitePPOConfig

    default = LitePPOConfig.__dataclass_fields__["loss_agg_mode"].default
    return bool(cfg.token_level_loss) and cfg.loss_agg_mode not in ("token-mean", default)


def fail(message: str, status: int, *, show: bool) -> int:
    """End with `message`: printed to stderr where `show` (one rank), and, under torchrun, written to this
    process's elastic error file (TORCHELASTIC_ERROR_FILE) on every rank, so that torchrun's failure
    summary shows it as the root cause instead of "To enable traceback see ...". Returns `status`."""
    if show:
        print(message, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json
        import time

        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"message": message, "timestamp": str(int(time.time()))}, f)
        except OSError:
            pass  # the message was printed; torchrun then reports the exit status alone
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    library_warnings()
    try:
        # --print-config works anywhere: without a launcher's WORLD_SIZE, for the smallest job of the layout
        cfg = load_config(args.config, args.overrides, world_size_from_env(),
                          any_world_size=args.print_config and "WORLD_SIZE" not in os.environ)
    except ConfigError as e:
        return fail(f"liteppo: {e}", EXIT_CONFIG, show=is_rank0())
    if args.print_config:
        if is_rank0():
            print(to_yaml(cfg), end="", flush=True)
        return 0
    from liteppo_mcore.config.validate import output_dir_problem

    problem = output_dir_problem(cfg.output_dir)
    if problem:
        return fail(f"liteppo: output_dir={cfg.output_dir}: {problem}. Choose a writable directory "
                    "(output_dir=path/to/run).", EXIT_CONFIG, show=is_rank0())

    from liteppo_mcore.parallel.setup import init_distributed, shutdown_distributed

    try:
        layout = init_distributed(cfg)
    except ConfigError as e:  # e.g. parallel.backend=nccl without CUDA
        return fail(f"liteppo: {e}", EXIT_CONFIG, show=is_rank0())
    try:
        if layout.rank == 0:  # the resolved configuration goes to output_dir/config.yaml (--print-config shows it)
            print(f"liteppo: layout {layout.describe()}", flush=True)
            kernels = "" if args.dry_run else missing_kernels_line()  # a dry run runs no kernels
            if kernels:
                print(kernels, flush=True)
            if ignored_loss_agg_mode(cfg):
                print(f"liteppo: token_level_loss=true, so loss_agg_mode={cfg.loss_agg_mode} is not used "
                      "(the loss is token-mean)", flush=True)
        if args.dry_run:
            import torch.distributed as dist

            from liteppo_mcore.preflight import preflight_problems

            box = [preflight_problems(cfg) if layout.rank == 0 else None]  # paths, tokenizer, data, checkpoints
            dist.broadcast_object_list(box, src=0)
            if box[0]:
                listed = "\n".join(f"  - {p}" for p in box[0])
                return fail(f"liteppo: the dry run found {len(box[0])} problem(s) the launch would hit:\n{listed}",
                            EXIT_CONFIG, show=layout.rank == 0)
            if layout.rank == 0:
                print("liteppo: dry run OK: configuration valid for this world size; paths, tokenizer, data and "
                      "checkpoints checked", flush=True)
            return 0
        from liteppo_mcore.parallel.hang import EXIT_PEER_FAILURE, describe_collective_failure, exit_now
        from liteppo_mcore.trainer import USER_ERRORS, run_training
        from liteppo_mcore.trainer.health import TrainingHalted

        try:
            return run_training(cfg)
        except TrainingHalted as e:  # the circuit breaker or non-finite weights: the same message on every rank
            return fail(f"liteppo: {e}", e.exit_code, show=os.environ.get("LOCAL_RANK", "0") == "0")
        except USER_ERRORS as e:  # bad input found at run time: the message says what to fix
            return fail(f"liteppo: error on rank {layout.rank}: {e}", EXIT_CONFIG,
                        show=os.environ.get("LOCAL_RANK", "0") == "0")
        except Exception as e:
            message = describe_collective_failure(e, timeout_minutes=cfg.parallel.timeout_minutes, rank=layout.rank)
            if message is None:
                raise
            # A collective timed out or lost its peer: say where, then exit without tearing the groups
            # down (that can wait on the dead peer); torchrun then stops the other ranks.
            fail(message, EXIT_PEER_FAILURE, show=True)
            exit_now(EXIT_PEER_FAILURE)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    from liteppo_mcore.parallel.hang import exit_now

    # The exit hooks run, the interpreter's finalization does not: it can abort a finished run (exit_now says why)
    exit_now(main(), cleanup_s=None)
