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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, world_size_from_env())
    except ConfigError as e:
        if is_rank0():
            print(f"liteppo: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if args.print_config:
        if is_rank0():
            print(to_yaml(cfg), end="", flush=True)
        return 0
    from liteppo_mcore.config.validate import output_dir_problem

    problem = output_dir_problem(cfg.output_dir)
    if problem:
        if is_rank0():
            print(f"liteppo: output_dir={cfg.output_dir}: {problem}. Choose a writable directory "
                  "(output_dir=path/to/run).", file=sys.stderr, flush=True)
        return EXIT_CONFIG

    from liteppo_mcore.parallel.setup import init_distributed, shutdown_distributed

    try:
        layout = init_distributed(cfg)
    except ConfigError as e:  # e.g. parallel.backend=nccl without CUDA
        if is_rank0():
            print(f"liteppo: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        if layout.rank == 0:
            print(to_yaml(cfg), end="")
            print(f"liteppo: layout {layout.describe()}", flush=True)
            if cfg.token_level_loss and cfg.loss_agg_mode != "token-mean":
                print(f"liteppo: token_level_loss=true, so loss_agg_mode={cfg.loss_agg_mode} is not used "
                      "(the loss is token-mean)", flush=True)
        if args.dry_run:
            import torch.distributed as dist

            dist.barrier()
            if layout.rank == 0:
                print("liteppo: dry run OK: configuration valid for this world size", flush=True)
            return 0
        from liteppo_mcore.parallel.hang import EXIT_PEER_FAILURE, describe_collective_failure, exit_now
        from liteppo_mcore.trainer import USER_ERRORS, run_training
        from liteppo_mcore.trainer.health import TrainingHalted

        try:
            return run_training(cfg, layout)
        except TrainingHalted as e:  # the circuit breaker or non-finite weights: the same message on every rank
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"liteppo: {e}", file=sys.stderr, flush=True)
            return e.exit_code
        except USER_ERRORS as e:  # bad input found at run time: the message says what to fix
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"liteppo: error on rank {layout.rank}: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        except Exception as e:
            message = describe_collective_failure(e, timeout_minutes=cfg.parallel.timeout_minutes, rank=layout.rank)
            if message is None:
                raise
            # A collective timed out or lost its peer: say where, then exit without tearing the groups
            # down (that can wait on the dead peer); torchrun then stops the other ranks.
            print(message, file=sys.stderr, flush=True)
            exit_now(EXIT_PEER_FAILURE)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
