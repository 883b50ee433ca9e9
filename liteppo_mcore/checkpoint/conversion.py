"""The two conversions behind tools/convert_hf_to_mcore.py and tools/convert_mcore_to_hf.py.

Both check everything they can from file headers and config.json first (architecture, files, every
tensor's name and shape), so that a wrong input fails in a second with a message naming the problem,
before any process group or model exists. They run in a plain `python` process (a one-process group
is created) or under torchrun (HF -> megatron at a TP/PP layout, for models too large for one process).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from liteppo_mcore.checkpoint.paths import checkpoints_dir, iteration_dir, read_latest, resolve_iteration_dir
from liteppo_mcore.checkpoint.pretrained import hf_shape, load_actor_from_hf, save_converted_actor
from liteppo_mcore.checkpoint.store import hf_side_dir, load_model, read_checkpoint_config
from liteppo_mcore.config import choices, load_config
from liteppo_mcore.config.schema import LitePPOConfig
from liteppo_mcore.convert.hf_files import (
    CONFIG,
    WEIGHTS_INDEX,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    config_dtype,
    copy_side_files,
    dtype_name,
    parse_size,
    read_config,
    write_json_atomic,
)
from liteppo_mcore.convert.layout import ConversionError, TensorLayout
from liteppo_mcore.convert.weights import check_hf_tensors, hf_tensors
from liteppo_mcore.models.shapes import ModelShape

# --dtype -> torch dtype, one entry per config.choices.EXPLICIT_DTYPES, and back to model.dtype's value
# (tests/unit/test_config_choices.py checks both).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CFG_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _dtype(name: str, hf: dict[str, Any]) -> torch.dtype:
    if name == choices.AUTO:
        return config_dtype(hf)
    if name not in DTYPES:
        raise ConversionError(f"dtype {name!r}: expected {choices.AUTO} (the config's), "
                              f"{choices.spoken(choices.EXPLICIT_DTYPES)}.")
    return DTYPES[name]


def _conversion_config(tp: int, pp: int, dtype: torch.dtype) -> LitePPOConfig:
    """Only the model-building part of the configuration matters here: no critic, no reference."""
    return load_config(overrides=[f"parallel.tp={tp}", f"parallel.pp={pp}", f"model.dtype={_CFG_DTYPE[dtype]}",
                                  "model.attention_backend=sdpa", "use_kl_loss=false", "add_token_level_kl=false",
                                  "adv_estimator=grpo"], check=False)


@contextlib.contextmanager
def _process_group(cfg: LitePPOConfig, tp: int, pp: int) -> Iterator[None]:
    """The default process group (created here and destroyed after, unless one exists); megatron's
    groups, built by _build_actor, are destroyed on the way out too."""
    from liteppo_mcore.parallel.mcore import destroy_model_parallel
    from liteppo_mcore.parallel.setup import init_distributed

    created = not dist.is_initialized()
    layout = init_distributed(cfg)
    try:
        if layout.world_size % (tp * pp):
            raise ConversionError(f"{layout.world_size} processes cannot hold tp={tp} x pp={pp}. Launch "
                                  f"tp*pp processes: torchrun --nproc-per-node {tp * pp} ...")
        yield
    finally:
        destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def _build_actor(shape: ModelShape, cfg: LitePPOConfig, dtype: torch.dtype) -> tuple:
    """(this rank's actor with random weights, its groups) at cfg's TP/PP layout."""
    from liteppo_mcore.models.gpt import build_gpt
    from liteppo_mcore.parallel.mcore import initialize_model_parallel

    p = cfg.parallel
    groups = initialize_model_parallel(p.tp, p.pp, 1, seed=cfg.seed, timeout_minutes=p.timeout_minutes)
    padded = shape.padded_vocab_size(p.tp, cfg.model.make_vocab_size_divisible_by)
    return build_gpt(shape, cfg, groups, dtype=dtype, padded_vocab=padded), groups


def convert_hf_to_mcore(hf_dir: str, out: str, *, tp: int = 1, pp: int = 1, dtype: str = "auto",
                        overwrite: bool = False) -> str:
    """Hugging Face directory -> `out/checkpoints/iter_0000000` (actor only) + `latest`. Returns the
    iteration folder. The result loads at any TP/PP layout; (tp, pp) is the layout converted with."""
    hf = read_config(hf_dir)
    shape = hf_shape(hf, os.path.join(hf_dir, CONFIG))
    shape.check_layout(tp, pp)
    reader = SafetensorsReader(hf_dir)
    check_hf_tensors(reader, TensorLayout.from_shape(shape))
    reader.close()
    torch_dtype = _dtype(dtype, hf)
    target = iteration_dir(out, 0)
    taken = (os.path.isdir(target) and os.listdir(target)) or read_latest(checkpoints_dir(out)) is not None
    if taken and not overwrite:
        raise ConversionError(f"{checkpoints_dir(out)} already holds checkpoints. Pass --overwrite to replace "
                              "iter_0000000 (and point latest at it), or choose another --out.")
    cfg = _conversion_config(tp, pp, torch_dtype)
    with _process_group(cfg, tp, pp):
        actor, groups = _build_actor(shape, cfg, torch_dtype)
        load_actor_from_hf(actor, hf_dir, groups, shape)
        return save_converted_actor(actor, out, hf_dir)


def _old_weights(out: str, overwrite: bool) -> list[str]:
    old = glob.glob(os.path.join(out, "*.safetensors")) + glob.glob(os.path.join(out, WEIGHTS_INDEX))
    if old and not overwrite:
        raise ConversionError(f"{out} already holds Hugging Face weights. Pass --overwrite to replace them, "
                              "or choose another --out.")
    return old


def _write_hf(actor: torch.nn.Module, layout: TensorLayout, hf: dict[str, Any], iter_dir: str, out: str,
              dtype: torch.dtype, shard_bytes: int) -> list[str]:
    writer = ShardedSafetensorsWriter(out, shard_bytes)
    for name, tensor in hf_tensors(actor.named_parameters(), layout):
        writer.add(name, tensor.to(dtype))
    files = writer.close()
    stored_config = os.path.join(hf_side_dir(iter_dir), CONFIG)
    if dtype == config_dtype(hf, default=dtype):
        shutil.copyfile(stored_config, os.path.join(out, CONFIG))
    else:
        key = "dtype" if "dtype" in hf or "torch_dtype" not in hf else "torch_dtype"
        write_json_atomic(os.path.join(out, CONFIG), {**hf, key: dtype_name(dtype)})
    copy_side_files(hf_side_dir(iter_dir), out)
    return files


def convert_mcore_to_hf(ckpt: str, out: str, *, dtype: str = "auto", max_shard_size: str = "5GB",
                        overwrite: bool = False) -> list[str]:
    """The `actor.` part of a checkpoint (run directory, checkpoints/ or iter_* folder; saved at any
    layout) -> a Hugging Face directory. Returns the safetensors file names written."""
    iter_dir = resolve_iteration_dir(ckpt)
    hf = read_checkpoint_config(iter_dir)
    assert hf is not None  # required (the default): raises instead of returning None
    shape = hf_shape(hf, os.path.join(hf_side_dir(iter_dir), CONFIG))
    layout = TensorLayout.from_shape(shape)
    torch_dtype = _dtype(dtype, hf)
    shard_bytes = parse_size(max_shard_size)
    old = _old_weights(out, overwrite)
    cfg = _conversion_config(1, 1, torch_dtype)
    with _process_group(cfg, 1, 1):
        if dist.get_rank() == 0:
            for path in old:
                os.remove(path)
            os.makedirs(out, exist_ok=True)
        actor, _ = _build_actor(shape, cfg, torch_dtype)
        load_model(actor, iter_dir, "actor")
        files = _write_hf(actor, layout, hf, iter_dir, out, torch_dtype, shard_bytes) if dist.get_rank() == 0 else []
        dist.barrier()
    return files

