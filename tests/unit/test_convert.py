"""Conversion pieces that need no process group: fused layouts, name maps, HF files, checkpoint paths,
and every error a wrong input must raise (before any model or process group exists)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from liteppo_mcore.checkpoint.paths import (
    CheckpointError,
    iteration_dir,
    read_latest,
    resolve_iteration_dir,
    write_latest,
)
from liteppo_mcore.convert import (
    ConversionError,
    MegatronView,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    TensorLayout,
    check_hf_tensors,
    fuse_gate_up,
    fuse_qkv,
    hf_config_from_shape,
    hf_shapes,
    hf_tensors,
    megatron_sources,
    normalize_config,
    parse_size,
    split_gate_up,
    split_qkv,
)
from liteppo_mcore.models.shapes import ModelShapeError, shape_from_hf_config
from tests.distributed.test_convert import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def layout(**kw):
    base = dict(num_layers=2, hidden_size=8, ffn_hidden_size=12, num_heads=4, num_kv_heads=2, head_dim=3,
                vocab_size=10, qkv_bias=False, qk_norm=False, tie_word_embeddings=True)
    base.update(kw)
    return TensorLayout(**base)


def test_fused_qkv_is_grouped_by_query_group():
    lay = layout()  # 4 query heads, 2 groups: 2 query heads per group
    d = lay.head_dim
    # each row holds (kind, head) so the fused order can be read off
    q = torch.tensor([[0.0, h] for h in range(4) for _ in range(d)])
    k = torch.tensor([[1.0, g] for g in range(2) for _ in range(d)])
    v = torch.tensor([[2.0, g] for g in range(2) for _ in range(d)])
    fused = fuse_qkv(q, k, v, lay)
    heads = [tuple(fused[i].tolist()) for i in range(0, fused.shape[0], d)]
    assert heads == [(0, 0), (0, 1), (1, 0), (2, 0), (0, 2), (0, 3), (1, 1), (2, 1)]
    back = split_qkv(fused, lay)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    bias = torch.arange(lay.qkv_size, dtype=torch.float32)
    qb, kb, vb = split_qkv(bias, lay)
    assert torch.equal(fuse_qkv(qb, kb, vb, lay), bias)


def test_gate_up_fuse_and_split():
    gate, up = torch.randn(12, 8), torch.randn(12, 8)
    fc1 = fuse_gate_up(gate, up)
    assert torch.equal(fc1[:12], gate) and torch.equal(fc1[12:], up)
    g2, u2 = split_gate_up(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


@pytest.mark.parametrize("qkv_bias, qk_norm, tie", [(True, False, True), (False, True, False), (False, False, False)])
def test_name_map_covers_each_family(qkv_bias, qk_norm, tie):
    lay = layout(qkv_bias=qkv_bias, qk_norm=qk_norm, tie_word_embeddings=tie)
    shapes = hf_shapes(lay)
    assert ("model.layers.1.self_attn.q_proj.bias" in shapes) is qkv_bias
    assert ("model.layers.0.self_attn.k_norm.weight" in shapes) is qk_norm
    assert ("lm_head.weight" in shapes) is not tie
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (8, 12)  # hidden x heads*head_dim
    per_layer = 9 + (3 if qkv_bias else 0) + (2 if qk_norm else 0)
    assert len(shapes) == 2 * per_layer + 2 + (0 if tie else 1)
    # megatron -> HF -> megatron names agree, and every HF tensor comes back
    whole = {name: torch.randn(src.megatron_shape) for name, src in megatron_sources(lay).items()}
    got = dict(hf_tensors(whole.items(), lay))
    assert {k: tuple(v.shape) for k, v in got.items()} == shapes


def _write_hf(path, tensors, config):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _random_hf(lay, **changes):
    tensors = {name: torch.randn(shape) for name, shape in hf_shapes(lay).items()}
    tensors.update(changes)
    return tensors


def test_megatron_view_streams_fused_tensors_and_knows_te_names(tmp_path):
    lay = layout(qkv_bias=True)
    tensors = _random_hf(lay, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(str(tmp_path))
    check_hf_tensors(reader, lay)  # the rotary cache of old checkpoints is ignored
    view = MegatronView(reader, lay)
    a = "model.layers.1.self_attn."
    want = fuse_qkv(tensors[a + "q_proj.weight"], tensors[a + "k_proj.weight"], tensors[a + "v_proj.weight"], lay)
    assert torch.equal(view["decoder.layers.1.self_attention.linear_qkv.weight"], want)
    assert torch.equal(view["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"],
                       tensors["model.layers.1.input_layernorm.weight"])
    assert "output_layer.weight" not in view and "embedding.word_embeddings.weight" in view  # tied


def test_check_hf_tensors_names_the_problem(tmp_path):
    lay = layout(tie_word_embeddings=False)
    bad = tmp_path / "bad"
    os.makedirs(bad)
    save_file(_random_hf(lay, **{"model.layers.1.mlp.up_proj.weight": torch.randn(13, 8)}), str(bad / "m.safetensors"))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \[13, 8\] but "
                                              r"config\.json implies \[12, 8\]"):
        check_hf_tensors(SafetensorsReader(str(bad)), lay)
    no_head = tmp_path / "nohead"
    os.makedirs(no_head)
    tensors = _random_hf(lay)
    del tensors["lm_head.weight"]
    save_file(tensors, str(no_head / "m.safetensors"))
    with pytest.raises(ConversionError, match="lm_head.weight.*tie_word_embeddings=false"):
        check_hf_tensors(SafetensorsReader(str(no_head)), lay)
    extra = tmp_path / "extra"
    os.makedirs(extra)
    save_file(_random_hf(lay, **{"model.layers.2.mlp.up_proj.weight": torch.randn(12, 8)}),
              str(extra / "m.safetensors"))
    with pytest.raises(ConversionError, match="does not account for.*layers.2"):
        check_hf_tensors(SafetensorsReader(str(extra)), lay)


def test_sharded_writer_and_reader_round_trip(tmp_path):
    tensors = {f"t{i}": torch.randn(16, 16) for i in range(5)}  # 1 KiB each
    writer = ShardedSafetensorsWriter(str(tmp_path), max_shard_bytes=2500)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == sorted(files + ["model.safetensors.index.json"])
    reader = SafetensorsReader(str(tmp_path))
    assert sorted(reader.names()) == sorted(tensors) and reader.shape("t3") == (16, 16)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())
    os.remove(tmp_path / files[1])
    with pytest.raises(ConversionError, match="not there.*Download the complete model"):
        SafetensorsReader(str(tmp_path))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size("1234") == 1234
    with pytest.raises(ConversionError):
        parse_size("lots")


def test_transformers5_rope_parameters_are_read(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    make_hf_model("llama", str(tmp_path), rope_theta=500000.0, rope_scaling=rope)
    with open(tmp_path / "config.json") as f:
        raw = json.load(f)
    shape = shape_from_hf_config(normalize_config(raw))
    assert shape.rope_theta == 500000.0
    assert shape.rope_scaling["factor"] == 8.0 and shape.rope_scaling["original_max_position_embeddings"] == 32
    old_style = {**raw, "rope_theta": 1e6, "rope_scaling": None}
    del old_style["rope_parameters"]
    assert shape_from_hf_config(normalize_config(old_style)).rope_theta == 1e6


@pytest.mark.parametrize("family, arch", [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                                          ("llama", "LlamaForCausalLM")])
def test_config_synthesized_from_a_shape_round_trips(family, arch):
    import transformers

    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.shapes import shape_from_config

    cfg = load_config(overrides=[f"model.family={family}", "model.vocab_size=77"], check=False)
    shape = shape_from_config(cfg.model)
    hf = hf_config_from_shape(shape, arch, torch.float32)
    assert shape_from_hf_config(hf) == shape
    config = transformers.AutoConfig.for_model(**hf)
    assert config.architectures == [arch] and config.num_key_value_heads == shape.num_query_groups


def test_checkpoint_paths(tmp_path):
    run = str(tmp_path / "run")
    for it in (0, 20):
        os.makedirs(iteration_dir(run, it))
        open(os.path.join(iteration_dir(run, it), "metadata.json"), "w").close()
    ckpts = os.path.join(run, "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        resolve_iteration_dir(run)
    write_latest(ckpts, 20)
    assert sorted(os.listdir(ckpts)) == ["iter_0000000", "iter_0000020", "latest"]  # no temp file left
    assert open(os.path.join(ckpts, "latest")).read().strip() == "iter_0000020"
    want = iteration_dir(run, 20)
    assert resolve_iteration_dir(run) == resolve_iteration_dir(ckpts) == want == read_latest(ckpts)
    assert resolve_iteration_dir(iteration_dir(run, 0)) == iteration_dir(run, 0)
    os.remove(os.path.join(want, "metadata.json"))
    with pytest.raises(CheckpointError, match="not a complete"):
        resolve_iteration_dir(run)
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_iteration_dir(str(tmp_path / "nowhere"))


def _qwen_dir(tmp_path, name="hf", **overrides):
    path = str(tmp_path / name)
    make_hf_model("qwen2", path, tie_word_embeddings=True, **overrides)
    return path


def _edit_config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_hf_to_mcore_errors_before_any_process_group(tmp_path):
    from liteppo_mcore.checkpoint.conversion import convert_hf_to_mcore

    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match="no config.json there"):
        convert_hf_to_mcore(str(tmp_path), out)
    hf = _qwen_dir(tmp_path)
    _edit_config(hf, architectures=["MistralForCausalLM"])
    with pytest.raises(ModelShapeError, match="not supported. Supported: LlamaForCausalLM, Qwen2ForCausalLM, "
                                              "Qwen3ForCausalLM"):
        convert_hf_to_mcore(hf, out)
    _edit_config(hf, architectures=["Qwen2ForCausalLM"], intermediate_size=128)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[96, 64\] "
                                              r"but config\.json implies \[128, 64\]"):
        convert_hf_to_mcore(hf, out)
    _edit_config(hf, intermediate_size=96)
    with pytest.raises(ModelShapeError, match="parallel.tp=3 must divide the 4 attention heads"):
        convert_hf_to_mcore(hf, out, tp=3)
    os.makedirs(os.path.join(out, "checkpoints"))
    write_latest(os.path.join(out, "checkpoints"), 40)  # a run directory with a checkpoint already
    with pytest.raises(ConversionError, match="already holds checkpoints. Pass --overwrite"):
        convert_hf_to_mcore(hf, out)
    os.rename(os.path.join(hf, "model.safetensors"), os.path.join(hf, "pytorch_model.bin"))
    with pytest.raises(ConversionError, match="no model.safetensors.*re-save the model with safetensors"):
        convert_hf_to_mcore(hf, out)
    assert os.listdir(os.path.join(out, "checkpoints")) == ["latest"]
    import torch.distributed as dist
    assert not dist.is_initialized()


def test_mcore_to_hf_errors(tmp_path):
    from liteppo_mcore.checkpoint.conversion import convert_mcore_to_hf

    with pytest.raises(CheckpointError, match="no such directory"):
        convert_mcore_to_hf(str(tmp_path / "missing"), str(tmp_path / "out"))
    it = iteration_dir(str(tmp_path), 3)
    os.makedirs(it)
    open(os.path.join(it, "metadata.json"), "w").close()
    with pytest.raises(CheckpointError, match="no hf/config.json in this checkpoint"):
        convert_mcore_to_hf(it, str(tmp_path / "out"))


def test_cli_reports_errors_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf_to_mcore.py"),
                           "--hf-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr
