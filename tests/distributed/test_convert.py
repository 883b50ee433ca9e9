"""Hugging Face <-> megatron conversion against transformers' own models (CPU, fp32, no downloads).

Tiny random models of every family (tied and untied, GQA, a vocabulary of 100: not a multiple of 128,
Qwen3 with an explicit head_dim, Llama 3 rope scaling) are converted, loaded at TP=1, TP=2 and PP=2,
and must give transformers' logits / log-probs; converted back they must give the same tensors.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.spawn import run_gloo

VOCAB = 100
TOL = 1e-4
SEQ = 12
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
VARIANTS = {
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True, "head_dim": 24}),
    "qwen3-untied": ("qwen3", {"tie_word_embeddings": False, "head_dim": 24}),
    "llama-rope3": ("llama", {"tie_word_embeddings": False, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "rope_theta": 10000.0}),
}
TOKENIZER_CONFIG = {"model_max_length": 128, "note": "copied both ways"}


def make_hf_model(family, path, seed=0, **overrides):
    """A tiny random transformers model saved to `path`; every tensor random (norms too), so a
    swapped or mis-ordered tensor changes the outputs. Returns the model (fp32, eager attention)."""
    import transformers

    classes = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "llama": transformers.LlamaConfig}
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                  rms_norm_eps=1e-6, attn_implementation="eager")
    kwargs.update(overrides)
    config = classes[family](**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    model.save_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f)
    return model


def read_hf_tensors(path):
    from safetensors.torch import load_file

    out = {}
    for fn in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(fn))
    return out


def _config(extra):
    from liteppo_mcore.config import load_config

    return load_config(overrides=["model.dtype=fp32", "model.attention_backend=sdpa", "use_kl_loss=false",
                                  "adv_estimator=grpo"] + extra, check=False)


def _actor_logp(cfg, tokens, setup):
    """Log-probs of every next token, [B, S-1], on every rank, and the models built."""
    from liteppo_mcore.checkpoint.pretrained import build_pretrained_models
    from liteppo_mcore.models.forward import SequenceBatch, forward_per_token
    from liteppo_mcore.parallel.mcore import initialize_model_parallel

    p = cfg.parallel
    groups = initialize_model_parallel(p.tp, p.pp, 1, seed=cfg.seed)
    setup(cfg)
    models = build_pretrained_models(cfg, groups)
    b, s = tokens.shape
    batch = SequenceBatch(tokens, torch.ones(b, dtype=torch.long), torch.full((b,), s - 1))
    logp = forward_per_token(models.actor, batch, groups, vocab_size=VOCAB, micro_batch_size=1,
                             compute_entropy=False)["logp"]
    return logp, models, groups


def allow_child_processes():
    """Distributed-checkpoint saves fork writer processes, which a daemonic process may not have
    (run_gloo starts its ranks as daemons)."""
    import multiprocessing

    multiprocessing.current_process().daemon = False


def _set(key, value):
    def setup(cfg):
        setattr(cfg.model, key, value)
    return setup


def tp1_worker(rank, ws, variants, root, tokens):
    """HF -> megatron (TP=1), logits at TP=1 through build_pretrained_models(model.load), megatron -> HF."""
    from liteppo_mcore.checkpoint import convert_hf_to_mcore, convert_mcore_to_hf
    from liteppo_mcore.parallel.mcore import destroy_model_parallel

    allow_child_processes()
    out = {}
    for name, hf_dir in variants.items():
        run_dir = os.path.join(root, name, "run")
        convert_hf_to_mcore(hf_dir, run_dir)
        logp, models, groups = _actor_logp(_config([]), tokens, _set("load", run_dir))
        with torch.no_grad():
            logits = models.actor(tokens, None, attention_mask=None)[..., :VOCAB]
        destroy_model_parallel()
        back = os.path.join(root, name, "back")
        files = convert_mcore_to_hf(os.path.join(run_dir, "checkpoints"), back, max_shard_size="40KB")
        out[name] = {"logits": logits, "logp": logp, "files": files}
    return out


def layouts_worker(rank, ws, variants, root, tokens, cached, tp2_saved):
    """Loads at TP=2 and PP=2; model.hf_path (converted and cached at TP=2, then read from the cache);
    the HF -> megatron tool at tp=2; megatron -> HF of TP=2-saved checkpoints (in 2 processes)."""
    from liteppo_mcore.checkpoint import convert_hf_to_mcore, convert_mcore_to_hf
    from liteppo_mcore.parallel.mcore import destroy_model_parallel

    allow_child_processes()
    out = {}
    for name, hf_dir in variants.items():
        run_dir = os.path.join(root, name, "run")
        res = {}
        for layout in ("tp=2", "pp=2"):
            res[layout], _, _ = _actor_logp(_config([f"parallel.{layout}"]), tokens, _set("load", run_dir))
            destroy_model_parallel()
        if name in cached:
            res.update(_cached_hf_path(hf_dir, os.path.join(root, name, "cached-run"), tokens))
        if name in tp2_saved:
            convert_hf_to_mcore(hf_dir, os.path.join(root, name, "run-tp2"), tp=2)
            convert_mcore_to_hf(os.path.join(root, name, "run-tp2"), os.path.join(root, name, "back-tp2"))
        out[name] = res
    return out


def _cached_hf_path(hf_dir, output_dir, tokens):
    """model.hf_path at TP=2 with a critic and a reference: first run converts and caches, second
    run loads the cache; the critic trunk and the reference start from the loaded actor."""
    from liteppo_mcore.checkpoint import convert_mcore_to_hf
    from liteppo_mcore.parallel.mcore import destroy_model_parallel

    res = {}
    extra = ["parallel.tp=2", "use_kl_loss=true", "adv_estimator=gae", f"output_dir={output_dir}"]
    for run in ("first", "second"):
        cfg = _config(extra)
        logp, models, groups = _actor_logp(cfg, tokens, _set("hf_path", hf_dir))
        actor_sd = models.actor.state_dict()
        res[f"hf_path-{run}"] = logp
        res[f"reference-equal-{run}"] = _same_tensors(actor_sd, models.reference.state_dict())
        res[f"trunk-equal-{run}"] = _same_tensors(actor_sd, models.critic.state_dict(), skip="output_layer")
        res[f"cache-mtime-{run}"] = os.stat(os.path.join(output_dir, "pretrained", "checkpoints", "latest")).st_mtime_ns
        destroy_model_parallel()
    convert_mcore_to_hf(os.path.join(output_dir, "pretrained"), os.path.join(os.path.dirname(output_dir), "back-cache"))
    return res


def _same_tensors(want, got, skip=None):
    keys = [k for k, t in want.items() if isinstance(t, torch.Tensor) and not (skip and k.startswith(skip))]
    return bool(keys) and all(torch.equal(want[k], got[k]) for k in keys)


def hf_logp(logits, tokens):
    logsm = torch.log_softmax(logits.double(), dim=-1)
    return logsm[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1).float()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    dirs, logits = {}, {}
    for i, (name, (family, overrides)) in enumerate(VARIANTS.items()):
        path = dirs[name] = str(root / name / "hf")
        model = make_hf_model(family, path, seed=i, **overrides)
        with torch.no_grad():
            logits[name] = model(tokens).logits.float()
    return {"root": str(root), "tokens": tokens, "dirs": dirs, "logits": logits}


@pytest.fixture(scope="module")
def tp1_results(hf_models):
    (res,) = run_gloo(tp1_worker, 1, hf_models["dirs"], hf_models["root"], hf_models["tokens"], timeout=300)
    return res


def test_tp1_logits_match_transformers(hf_models, tp1_results):
    for name in VARIANTS:
        want = hf_models["logits"][name]
        got = tp1_results[name]["logits"]
        assert got.shape == want.shape, name
        assert want.abs().max() > 1.0, name  # the comparison is not between near-zero logits
        diff = (got - want).abs().max().item()
        assert diff <= TOL, f"{name}: logits differ from transformers by {diff:.2e}"
        assert (tp1_results[name]["logp"] - hf_logp(want, hf_models["tokens"])).abs().max() <= TOL, name


def test_round_trip_reproduces_every_tensor(hf_models, tp1_results):
    import transformers

    for name in VARIANTS:
        src, back = os.path.join(hf_models["root"], name, "hf"), os.path.join(hf_models["root"], name, "back")
        want, got = read_hf_tensors(src), read_hf_tensors(back)
        assert sorted(got) == sorted(want), name
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), f"{name}: {key} changed in the round trip"
        assert len(tp1_results[name]["files"]) > 1  # 40KB shards: an index over several files
        with open(os.path.join(back, "model.safetensors.index.json")) as f:
            assert set(json.load(f)["weight_map"]) == set(want)
        with open(os.path.join(back, "tokenizer_config.json")) as f:
            assert json.load(f) == TOKENIZER_CONFIG
        with open(os.path.join(src, "config.json")) as a, open(os.path.join(back, "config.json")) as b:
            assert a.read() == b.read()
        model, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True,
                                                                     attn_implementation="eager")
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], name
        with torch.no_grad():
            logits = model(hf_models["tokens"]).logits
        assert torch.equal(logits, hf_models["logits"][name]), name


def test_tp2_pp2_and_cached_hf_path(hf_models, tp1_results):
    cached, tp2_saved = ["qwen2-tied", "llama-rope3"], ["qwen3-untied", "llama-tied"]
    results = run_gloo(layouts_worker, 2, hf_models["dirs"], hf_models["root"], hf_models["tokens"], cached,
                       tp2_saved, timeout=600)
    tokens = hf_models["tokens"]
    for res in results:
        for name in VARIANTS:
            want = hf_logp(hf_models["logits"][name], tokens)
            for layout in ("tp=2", "pp=2"):
                diff = (res[name][layout] - want).abs().max().item()
                assert diff <= TOL, f"{name} at {layout}: log-probs differ from transformers by {diff:.2e}"
        for name in cached:
            r = res[name]
            for run in ("first", "second"):
                want = hf_logp(hf_models["logits"][name], tokens)
                assert (r[f"hf_path-{run}"] - want).abs().max() <= TOL, (name, run)
                assert r[f"reference-equal-{run}"], (name, run)
                assert r[f"trunk-equal-{run}"], (name, run)
            assert r["cache-mtime-first"] == r["cache-mtime-second"], "the second run converted again"
    for name in tp2_saved + cached:
        folder = "back-tp2" if name in tp2_saved else "back-cache"
        tp1 = read_hf_tensors(os.path.join(hf_models["root"], name, "back"))
        tp2 = read_hf_tensors(os.path.join(hf_models["root"], name, folder))
        assert sorted(tp1) == sorted(tp2), name
        for key, tensor in tp1.items():
            assert torch.equal(tp2[key], tensor), f"{name}: {key} differs between TP=1 and TP=2 checkpoints"



def test_command_line_tools_round_trip(hf_models, tmp_path):
    """The two tools as users run them: plain `python`, which creates its own one-process group."""
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools")
    src = hf_models["dirs"]["qwen3-untied"]
    run, back = str(tmp_path / "run"), str(tmp_path / "back")
    for cmd in (["convert_hf_to_mcore.py", "--hf-dir", src, "--out", run, "--dtype", "bf16"],
                ["convert_mcore_to_hf.py", "--ckpt", os.path.join(run, "checkpoints", "iter_0000000"), "--out", back,
                 "--dtype", "fp32"]):
        proc = subprocess.run([sys.executable, os.path.join(tools, cmd[0])] + cmd[1:], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = read_hf_tensors(src), read_hf_tensors(back)
    assert sorted(want) == sorted(got)
    for key, tensor in want.items():  # stored in bf16, read back into fp32
        assert got[key].dtype == torch.float32 and torch.equal(got[key], tensor.bfloat16().float()), key
    iter_dir = os.path.join(run, "checkpoints", "iter_0000000")
    assert sorted(os.listdir(os.path.join(iter_dir, "hf"))) == \
        ["config.json", "generation_config.json", "source.json", "tokenizer_config.json"]
    common = torch.load(os.path.join(iter_dir, "common.pt"), weights_only=False)
    assert common == {"liteppo": {"format": 1, "iteration": 0, "models": ["actor"]}}
