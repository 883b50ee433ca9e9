"""Hugging Face model directories: config.json, safetensors (one file or sharded with an index),
tokenizer and generation files. Reading is lazy (one tensor at a time, shapes from the headers) and
writing flushes shard by shard, so a conversion never holds the model twice.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections.abc import Iterable
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from liteppo_mcore.convert.layout import ConversionError

CONFIG = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
# Files copied along with the weights, both ways (whatever of them the source has).
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
              "chat_template.jinja", "chat_template.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(hf_dir: str) -> dict[str, Any]:
    """config.json of a Hugging Face directory, as written (see normalize_config for reading it)."""
    path = os.path.join(hf_dir, CONFIG)
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: no such directory. Point it at a Hugging Face model directory "
                              "(config.json + *.safetensors + tokenizer files).")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json there. Point it at a Hugging Face model directory "
                              "(config.json + *.safetensors + tokenizer files).")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err}). Restore the file from the model's source.") from err


def normalize_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A copy with rope settings at the top level (`rope_theta`, `rope_scaling`), as older configs
    have them; transformers >= 5 writes them inside `rope_parameters` instead."""
    out = dict(hf)
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" in params and "rope_theta" not in hf:
            out["rope_theta"] = params["rope_theta"]
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default" and not hf.get("rope_scaling"):
            out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def config_dtype(hf: dict[str, Any], default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype the config says the weights are stored in (`dtype`, or `torch_dtype` before v5)."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    return _DTYPES.get(str(name).replace("torch.", ""), default)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


class SafetensorsReader:
    """The tensors of a Hugging Face directory, read one at a time."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._file_of = self._weight_map(hf_dir)
        self._handles: dict[str, Any] = {}

    @staticmethod
    def _weight_map(hf_dir: str) -> dict[str, str]:
        index = os.path.join(hf_dir, WEIGHTS_INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
            missing = sorted({fn for fn in weight_map.values() if not os.path.isfile(os.path.join(hf_dir, fn))})
            if missing:
                raise ConversionError(f"{index} lists weight files that are not there: {missing[:3]}. "
                                      "Download the complete model (every shard the index names).")
            return dict(weight_map)
        files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
        if not files:
            other = [os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.bin"))]
            hint = (f" It has {other[:2]}: re-save the model with safetensors (save_pretrained does by default)."
                    if other else " Download the weights (*.safetensors) into it.")
            raise ConversionError(f"{hf_dir}: no {SINGLE_WEIGHTS} and no {WEIGHTS_INDEX}." + hint)
        weight_map = {}
        for path in files:
            with safe_open(path, framework="pt") as f:
                weight_map.update({name: os.path.basename(path) for name in f.keys()})
        return weight_map

    def _handle(self, name: str) -> Any:
        if name not in self._file_of:
            raise ConversionError(f"{self.hf_dir}: tensor {name!r} is not in the weights.")
        fn = self._file_of[name]
        if fn not in self._handles:
            self._handles[fn] = safe_open(os.path.join(self.hf_dir, fn), framework="pt")
        return self._handles[fn]

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file header: nothing is read."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise ConversionError(f"shard size {text!r}: expected a size such as 5GB, 500MB or 1000000.")
    unit = m.group(2).rstrip("B") or "B"
    base = 1024 if unit.endswith("I") else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I") or "B"]
    return int(float(m.group(1)) * base ** power)


class ShardedSafetensorsWriter:
    """Writes tensors into `model-0000i-of-0000N.safetensors` shards of at most `max_shard_bytes`
    (a larger single tensor gets a shard of its own) and `model.safetensors.index.json`."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self._buffer: dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0
        os.makedirs(out_dir, exist_ok=True)

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp = f"model-partial-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, os.path.join(self.out_dir, tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, name the shards, write the index; returns the shard file names."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map, names = {}, []
        for i, (tmp, tensors) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            weight_map.update({t: final for t in tensors})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_json_atomic(os.path.join(self.out_dir, WEIGHTS_INDEX), index)
        return names


def write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def copy_side_files(src_dir: str, dst_dir: str, names: Iterable[str] = SIDE_FILES) -> list[str]:
    """Copy the tokenizer/generation files that `src_dir` has; returns the names copied."""
    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in names:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def weights_fingerprint(hf_dir: str) -> dict[str, list[int]]:
    """Size and modification time of config.json and every weight file: enough to notice that a
    cached conversion no longer matches its source directory."""
    paths = [os.path.join(hf_dir, CONFIG)] + sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    out = {}
    for path in paths:
        if os.path.isfile(path):
            st = os.stat(path)
            out[os.path.basename(path)] = [st.st_size, st.st_mtime_ns]
    return out


def hf_config_from_shape(shape: Any, architecture: str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A config.json for a model that never came from Hugging Face (shapes from the YAML section),
    so that its checkpoints still convert to a loadable Hugging Face model."""
    config: dict[str, Any] = {
        "architectures": [architecture], "model_type": shape.family, "hidden_act": "silu",
        "hidden_size": shape.hidden_size, "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size, "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta, "rms_norm_eps": shape.norm_epsilon,
        "tie_word_embeddings": shape.tie_word_embeddings, "attention_dropout": 0.0,
    }
    if shape.family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if shape.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **dict(shape.rope_scaling)}
    if dtype is not None:
        config["torch_dtype"] = dtype_name(dtype)
    return config
