"""Every fenced code block of README.md and docs/*.md is run, checked against the tool, or exempted with
the reason and what covers it instead.

`BLOCKS` maps each block, keyed by (file, its first non-empty line), to the test of this module that runs
it (`Run`), to another test file that runs it (`Elsewhere`), or to an exemption (`Exempt`) for what
cannot run here: a GPU, the network (PyPI) or a SLURM controller. A block missing from the table, or an
entry whose block is gone, fails `test_every_block_is_in_the_table` / `test_every_table_entry_names_a_block`.

The handlers run the blocks as written, in a temporary working directory (a "sandbox" that links the
repository's tools/, launch/, examples/ and tests/) holding the inputs each block names, created here:
tiny Hugging Face Qwen2/Qwen3 models with random weights and a small BPE tokenizer where a block names
a real model, small data files of the documented shapes. Substituted, and only that: `python` is this
interpreter, `torchrun` is `python -m torch.distributed.run` on 127.0.0.1 and a free port, and the
shell scripts' PYTHON is this interpreter. Commands that cannot complete here (training a 4B model,
submitting to SLURM) are checked as far as they go without a GPU: their configuration and overrides
are validated for the job's world size, and the training command runs its --dry-run.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml

from tests import doc_blocks as D
from tests.doc_blocks import REPO
from tests.unit.test_prepare_data import GSM8K, MATH, MATH500, dapo_rows, prep, read_jsonl, verl_rows, write_parquet


@dataclass(frozen=True)
class Run:
    test: str  # the test of this module that runs the block


@dataclass(frozen=True)
class Elsewhere:
    test_file: str  # relative to the repository
    reason: str


@dataclass(frozen=True)
class Exempt:
    reason: str  # why it cannot run here, and what covers it instead


BLOCKS = {
    # ------------------------------------------------------------------------------------- README.md
    ("README.md", "bash tools/run_example.sh   # sets up .venv and runs the main job on the embedded default "
                  "(2 CPU processes)"):
        Exempt("sets up .venv with pip (network) and runs the whole suite / a minute of training: CI runs "
               "tools/run_tests.sh itself, and the job tools/run_example.sh starts (examples/tiny_cpu.yaml, "
               "2 processes under torchrun) is tests/distributed/test_learning.py; "
               "test_exempt_blocks_name_scripts_that_parse checks that both scripts exist and parse"),
    ("README.md", "liteppo: layout world 2 = tp 1 x pp 1 x cp 1 x dp 2 (backend gloo)"):
        Elsewhere("tests/distributed/test_learning.py",
                  "the quick start's console: the embedded default's run must print these lines (patterns for "
                  "its numbers), and test_the_readme_quick_start_shows_this_console matches the block to them"),
    ("README.md", "torchrun --nproc_per_node 8 launch/pretrain_liteppo.py --config examples/liteppo.yaml \\"):
        Run("test_readme_running"),
    ("README.md", "sbatch --nodes 4 --gpus-per-node 8 --export=ALL,CONFIG=examples/qwen2.5_7b_8gpu.yaml "
                  "launch/slurm/multi_node.sbatch"):
        Run("test_sbatch_lines"),
    ("README.md", "import torch"):
        Elsewhere("tests/distributed/test_readme_examples.py",
                  "the block is examples/models_forward.py word for word; that test checks so and runs the "
                  "script under torchrun (TP=2, 2 CPU processes)"),
    ("README.md", "# a Hugging Face model directory -> a run directory holding checkpoints/iter_0000000 "
                  "(actor only) + latest"):
        Run("test_readme_conversion"),
    # ----------------------------------------------------------------------------- docs/conversion.md
    ("docs/conversion.md", "python tools/convert_hf_to_mcore.py --hf-dir Qwen2.5-1.5B-Instruct --out runs/qwen"):
        Run("test_conversion_md"),
    ("docs/conversion.md", "python tools/convert_mcore_to_hf.py --ckpt runs/qwen --out qwen-trained"):
        Run("test_conversion_md"),
    ("docs/conversion.md", "RUN_DIR/checkpoints/"):
        Run("test_conversion_md"),
    # ----------------------------------------------------------------------- docs/data_and_rewards.md
    ("docs/data_and_rewards.md", "data:"):
        Run("test_yaml_overrides"),
    ("docs/data_and_rewards.md", "# my_rewards.py"):
        Run("test_own_reward_function"),
    ("docs/data_and_rewards.md", "reward:"):
        Run("test_own_reward_function"),
    ("docs/data_and_rewards.md", '{"prompt": "What is 1/2 + 1/4?", "answer": "\\\\frac{3}{4}"}'):
        Run("test_jsonl_rows"),
    ("docs/data_and_rewards.md", "python tools/prepare_data.py INPUT [INPUT ...] --out data/x_train.jsonl [options]"):
        Run("test_prepare_data_synopsis"),
    ("docs/data_and_rewards.md", "gsm8k/main/train-00000-of-00001.parquet: format gsm8k (detected from "
                                 "gsm8k/main/train-00000-of-00001.parquet row 0 (0-based))"):
        Run("test_prepare_data_printed_summary"),
    ("docs/data_and_rewards.md", "python tools/prepare_data.py gsm8k/main/train-00000-of-00001.parquet "
                                 "--out data/gsm8k_train.jsonl \\"):
        Run("test_prepare_data_gsm8k"),
    ("docs/data_and_rewards.md", "python tools/prepare_data.py MATH/train/*/*.json --out data/math_train.jsonl \\"):
        Run("test_prepare_data_math"),
    ("docs/data_and_rewards.md", "python tools/prepare_data.py dapo-math-17k.parquet --dedup --split-eval 500 "
                                 "--out data/dapo_train.jsonl"):
        Run("test_prepare_data_dapo"),
    ("docs/data_and_rewards.md", "python tools/prepare_data.py dapo-math-17k.parquet --dedup --strip-template \\"):
        Run("test_prepare_data_dapo_boxed"),
    ("docs/data_and_rewards.md", "python tools/prepare_data.py verl_data/train.parquet --out data/verl_train.jsonl"):
        Run("test_prepare_data_verl"),
    ("docs/data_and_rewards.md", "python tools/prepare_data.py gsm8k_train.jsonl --split-eval 200 "
                                 "--out data/gsm8k_train.jsonl"):
        Elsewhere("tests/distributed/test_own_data.py",
                  "runs these lines as written on 3,000 GSM8K-shaped questions (prepare_data, train_tokenizer, "
                  "200 steps under torchrun) and checks that reward and held-out accuracy rise"),
    # ---------------------------------------------------------------------------- docs/performance.md
    ("docs/performance.md", "bash tools/gpu_check.sh --fetch-wheels gpu-wheels   # first, on a machine that "
                            "reaches PyPI (3.3 MB)"):
        Run("test_gpu_check_lines"),
    # -------------------------------------------------------------------------------- docs/rollout.md
    ("docs/rollout.md", "from liteppo_mcore.rollout import build_engine, sampling_params_from_config"):
        Run("test_rollout_fragment"),
    # --------------------------------------------------------------------------------- docs/sglang.md
    ("docs/sglang.md", "python -m venv .venv-sglang && . .venv-sglang/bin/activate"):
        Exempt("installs SGLang from PyPI into a new environment (network; SGLang's CUDA wheels): the HTTP "
               "contract of the supported SGLang versions is read from their wheels by "
               "tests/unit/test_sglang_contract.py, and the trainer runs against a stand-in server built on it "
               "in tests/distributed/test_sglang_e2e.py"),
    ("docs/sglang.md", "rollout:"):
        Run("test_yaml_overrides"),
    ("docs/sglang.md", "rollout: [2]"):
        Run("test_yaml_overrides"),
    # ---------------------------------------------------------------------------------- docs/slurm.md
    ("docs/slurm.md", "# one node, 8 GPUs"):
        Run("test_sbatch_lines"),
    ("docs/slurm.md", "$PYTHON -m torch.distributed.run --nnodes $NNODES --nproc_per_node $GPUS_PER_NODE \\"):
        Run("test_torchrun_cmd_print"),
    ("docs/slurm.md", "SLURM_JOB_NODELIST='gpu[001-004]' SLURM_NNODES=4 SLURM_JOB_ID=4242 GPUS_PER_NODE=8 \\"):
        Run("test_torchrun_cmd_print"),
    ("docs/slurm.md", "SGLANG_NODES=1 SGLANG_MODEL=/models/Qwen2.5-7B SGLANG_TP=2 \\"):
        Run("test_sbatch_lines"),
    # -------------------------------------------------------------------------- docs/slurm_testing.md
    ("docs/slurm_testing.md", "LITEPPO_REQUIRE_SLURM=1 .venv/bin/python -m pytest -q tests/slurm"):
        Exempt("brings up a SLURM cluster (root, apt-get, munge, slurmctld, slurmd): the command runs "
               "tests/slurm, which the suite itself runs (tools/run_tests.sh) and CI requires "
               "(LITEPPO_REQUIRE_SLURM=1)"),
}

FOUND = D.extract_blocks()


def blocks_for(test: str):
    """The blocks the table gives to `test`, in table order (each must exist: the table tests say so)."""
    return [FOUND[key] for key, entry in BLOCKS.items() if entry == Run(test) and key in FOUND]


def the_block(test: str):
    found = blocks_for(test)
    assert len(found) == 1, f"{test} handles one block, the table gives it {len(found)}"
    return found[0]


def commands(block):
    return D.logical_lines(block.text)


# ---------------------------------------------------------------------------------------------------
# The table


def test_every_block_is_in_the_table():
    missing = [f"{b.where} ({b.lang or 'no language'}): {key!r}" for key, b in FOUND.items() if key not in BLOCKS]
    assert not missing, ("code blocks without a handler: add each to BLOCKS in tests/distributed/"
                         "test_doc_blocks.py with a test that runs it (or an exemption saying what covers it):\n  "
                         + "\n  ".join(missing))


def test_every_table_entry_names_a_block():
    gone = [repr(key) for key in BLOCKS if key not in FOUND]
    assert not gone, ("BLOCKS names blocks that no longer exist (moved, edited first line, deleted): update the "
                      "keys:\n  " + "\n  ".join(gone))


def test_table_entries_are_well_formed():
    module = sys.modules[__name__]
    for key, entry in BLOCKS.items():
        if isinstance(entry, Run):
            assert callable(getattr(module, entry.test, None)), f"{key}: no test {entry.test} in this module"
        elif isinstance(entry, Elsewhere):
            assert os.path.isfile(os.path.join(REPO, entry.test_file)), f"{key}: {entry.test_file} does not exist"
            assert entry.reason.strip(), key
        else:
            assert isinstance(entry, Exempt) and len(entry.reason) > 40, f"{key}: an exemption needs its reason"
            assert re.search(r"tests/|tools/run_tests\.sh", entry.reason), \
                f"{key}: an exemption names what covers the block instead"
    exempt = sum(isinstance(e, Exempt) for e in BLOCKS.values())
    assert exempt * 4 <= len(BLOCKS), f"{exempt} of {len(BLOCKS)} blocks exempt: exemptions must stay the exception"


# ---------------------------------------------------------------------------------------------------
# Every bash block: the repository paths it names exist, the flags it passes to our scripts exist

BASH = [key for key, b in FOUND.items() if b.lang in ("bash", "sh", "shell", "text")]


@pytest.mark.parametrize("key", BASH, ids=[f"{k[0]}:{FOUND[k].line}" for k in BASH])
def test_bash_block_paths_exist(key):
    block = FOUND[key]
    missing = [p for p in D.repo_paths(block.text) if not D.path_exists(p)]
    assert not missing, f"{block.where} names paths that are not in the repository: {missing}"


@pytest.mark.parametrize("key", [k for k in BASH if FOUND[k].lang != "text"],
                         ids=[f"{k[0]}:{FOUND[k].line}" for k in BASH if FOUND[k].lang != "text"])
def test_bash_block_flags_are_accepted(key):
    block = FOUND[key]
    problems = [f"{line}: {p}" for line in commands(block) for p in D.flag_problems(line)]
    assert not problems, f"{block.where}:\n  " + "\n  ".join(problems)


def test_exempt_blocks_name_scripts_that_parse():
    """What an exempt or elsewhere-run block starts exists and parses (bash -n, or Python's compiler)."""
    for key, entry in BLOCKS.items():
        if isinstance(entry, Run) or key not in FOUND or FOUND[key].lang != "bash":
            continue
        for line in commands(FOUND[key]):
            for word in D.words(line):
                if not D.is_repo_script(word):
                    continue
                path = os.path.join(REPO, word)
                assert os.path.isfile(path), f"{FOUND[key].where}: {word} does not exist"
                if word.endswith(".py"):
                    compile(open(path, encoding="utf-8").read(), path, "exec")
                else:
                    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
                    assert proc.returncode == 0, f"{word}: {proc.stderr}"


# ---------------------------------------------------------------------------------------------------
# Shared inputs


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """A 2-layer Qwen2 Hugging Face directory (random weights, BPE tokenizer): copied wherever a block
    names a real Qwen model."""
    return D.write_tiny_hf_model(str(tmp_path_factory.mktemp("hf") / "qwen2"), "qwen2")


@pytest.fixture(scope="module")
def tokenizer():
    return D.tiny_tokenizer()


@pytest.fixture
def sandbox(tmp_path):
    return D.make_sandbox(str(tmp_path / "work"))


def _cfg_value_applied(cfg, override):
    """Whether key.path=value shows in the loaded configuration."""
    from omegaconf import OmegaConf

    key, _, _ = override.partition("=")
    want = OmegaConf.to_container(OmegaConf.from_dotlist([override]))
    for part in key.split("."):
        want = want[part]
    got = D.attr_path(cfg, key)
    if isinstance(got, float) and not isinstance(want, bool):
        return got == float(want)
    return got == want


# ---------------------------------------------------------------------------------------------------
# README.md: Running


def test_readme_running(sandbox):
    """The --print-config and --dry-run lines as written; the dry run of examples/liteppo.yaml exits 2 naming
    the missing model folder, its tokenizer and both data files. With those inputs created (a tiny Qwen3
    at the recipe's model.hf_path, two small prompt files), the dry run passes, and so does the torchrun
    line's, run with --dry-run appended (8 CPU processes): its training needs 8 GPUs and a 4B model. Its
    overrides are checked applied, for its world size."""
    from liteppo_mcore.config import load_config, to_yaml

    block = the_block("test_readme_running")
    lines = commands(block)
    train = [ln for ln in lines if D.split_env(D.words(ln))[1][0] == "torchrun"]
    printed = [ln for ln in lines if "--print-config" in D.words(ln)]
    dry = [ln for ln in lines if "--dry-run" in D.words(ln)]
    assert len(train) == len(printed) == len(dry) == 1 and len(lines) == 3, lines

    argv = D.words(printed[0])
    config = argv[argv.index("--config") + 1]
    proc = D.check(D.run_lines(printed, sandbox, timeout=120), printed[0])
    assert proc.stdout == to_yaml(load_config(os.path.join(REPO, config), any_world_size=True))

    cfg = load_config(os.path.join(REPO, config), any_world_size=True)
    proc = D.run_lines(dry, sandbox, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "the dry run found 4 problem(s)" in proc.stderr, proc.stderr
    for expected in (f"model.hf_path='{cfg.model.hf_path}': no such directory",
                     f"tokenizer directory '{cfg.model.hf_path}' does not exist",
                     f"data.train_path='{cfg.data.train_path}': no such file",
                     f"data.eval_path='{cfg.data.eval_path}': no such file"):
        assert expected in proc.stderr, (expected, proc.stderr)

    # the inputs the recipe names
    D.write_tiny_hf_model(os.path.join(sandbox, cfg.model.hf_path), cfg.model.family)
    for path in (cfg.data.train_path, cfg.data.eval_path):
        os.makedirs(os.path.dirname(os.path.join(sandbox, path)), exist_ok=True)
        with open(os.path.join(sandbox, path), "w", encoding="utf-8") as f:
            for i in range(4):
                f.write(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n")
    proc = D.check(D.run_lines(dry, sandbox, timeout=120), dry[0])
    assert "dry run OK" in proc.stdout and "layout world 1 " in proc.stdout

    train_argv = D.words(train[0])
    nproc = int(train_argv[train_argv.index("--nproc_per_node") + 1])
    proc = D.check(D.run_lines([shlex.join(train_argv + ["--dry-run"])], sandbox, timeout=300), train[0])
    assert "dry run OK" in proc.stdout and f"layout world {nproc} " in proc.stdout, proc.stdout

    overrides = [w for w in train_argv[train_argv.index(config) + 1:] if "=" in w and not w.startswith("-")]
    assert overrides, train[0]
    cfg = load_config(os.path.join(REPO, config), overrides, world_size=nproc)
    for override in overrides:
        assert _cfg_value_applied(cfg, override), override
    assert not os.path.exists(os.path.join(sandbox, cfg.output_dir)), "a dry run writes no run directory"


# ---------------------------------------------------------------------------------------------------
# SLURM submissions: validated for the job's world size (the submission itself: tests/slurm/)


def _sbatch_default(script, option):
    with open(os.path.join(REPO, script), encoding="utf-8") as f:
        m = re.search(rf"^#SBATCH --{option}=(\d+)", f.read(), re.M)
    return int(m.group(1)) if m else None


def sbatch_job(line):
    """What a documented `sbatch` line asks for, by the batch scripts' rules: (CONFIG, the training world
    size, the overrides the scripts pass to the trainer, the SGLang server URLs)."""
    env, argv = D.split_env(D.words(line))
    assert argv[0] == "sbatch", line
    at = next(i for i, w in enumerate(argv) if D.is_repo_script(w))
    script, options, args = argv[at], argv[1:at], argv[at + 1:]
    given = {}
    i = 0
    while i < len(options):
        opt = options[i]
        if "=" in opt:
            name, _, value = opt.partition("=")
        else:
            name, value = opt, options[i + 1]
            i += 1
        given[name] = value
        i += 1
    variables = dict(env)
    for item in given.get("--export", "").split(",")[1:]:
        k, _, v = item.partition("=")
        variables[k] = v
    nodes = int(given.get("--nodes") or _sbatch_default(script, "nodes"))
    gpus = int(variables.get("GPUS_PER_NODE") or given.get("--gpus-per-node")
               or _sbatch_default(script, "gpus-per-node"))
    sglang_nodes = int(variables.get("SGLANG_NODES", 0))
    overrides = variables.get("EXTRA_OVERRIDES", "").split()
    if "TIMEOUT_MINUTES" in variables:
        overrides.append(f"parallel.timeout_minutes={variables['TIMEOUT_MINUTES']}")
    urls = []
    if sglang_nodes:
        per_node = gpus // int(variables.get("SGLANG_TP", gpus))
        urls = [f"http://node{n}:{30000 + 10 * i}" for n in range(nodes - sglang_nodes, nodes) for i in range(per_node)]
        overrides += ["rollout.engine=sglang", "rollout.mode=disaggregated",
                      "rollout.server_urls=[" + ",".join(f"'{u}'" for u in urls) + "]"]
    assert "CONFIG" in variables, f"{line}: no CONFIG"
    return variables["CONFIG"], (nodes - sglang_nodes) * gpus, overrides + [a for a in args if "=" in a], urls


def test_sbatch_lines():
    """Each sbatch line's CONFIG and overrides load for the world size it asks for (nodes x GPUs per
    node, from the line or the script's #SBATCH defaults, less the SGLang nodes). The submission itself
    is exempt here: tests/slurm/ submits both scripts with sbatch --wait to a real cluster, and
    tests/distributed/test_slurm_scripts.py runs them with SLURM's variables set by hand."""
    from liteppo_mcore.config import load_config

    seen = 0
    for block in blocks_for("test_sbatch_lines"):
        for line in commands(block):
            config, world_size, overrides, urls = sbatch_job(line)
            cfg = load_config(os.path.join(REPO, config), overrides, world_size=world_size)
            for override in overrides:
                assert _cfg_value_applied(cfg, override), (line, override)
            seen += 1
            if urls:  # docs/slurm.md: "Here 2 nodes (16 GPUs) train and 1 node runs 4 servers of 2 GPUs."
                after = D.text_after(block)
                m = re.search(r"Here (\d+) nodes \((\d+) GPUs\) train and (\d+) node runs (\d+) servers of (\d+) GPUs",
                              after)
                assert m, f"{block.where}: the sentence after the block describing the job"
                env, _ = D.split_env(D.words(line))
                assert (world_size, len(urls), int(env["SGLANG_TP"])) == (int(m[2]), int(m[4]), int(m[5])), line
    assert seen == 7


# ---------------------------------------------------------------------------------------------------
# docs/slurm.md: the torchrun command of a node


def test_torchrun_cmd_print(sandbox):
    """The `torchrun_cmd.sh --print` block runs as written and prints the command of the template block:
    the same words in the same order, its $VARIABLES resolved by the documented rules (first host of the
    node list; port 10000 + job id % 20000); torchrun's parser accepts the result."""
    import torch.distributed.run as torchrun

    template_block, print_block = sorted(blocks_for("test_torchrun_cmd_print"), key=lambda b: b.lang != "text")
    assert template_block.lang == "text" and print_block.lang == "bash"
    (line,) = commands(print_block)
    proc = D.check(D.run_bash(D.localize(line), sandbox, timeout=60), line)
    printed = shlex.split(proc.stdout.strip())

    env, _ = D.split_env(D.words(line))
    job = int(env["SLURM_JOB_ID"])
    first = re.match(r"([^\[,]*)(?:\[(\d+))?", env["SLURM_JOB_NODELIST"])
    values = {"PYTHON": sys.executable, "NNODES": env["SLURM_NNODES"], "GPUS_PER_NODE": env["GPUS_PER_NODE"],
              "MASTER_ADDR": first[1] + (first[2] or ""), "MASTER_PORT": str(10000 + job % 20000),
              "SLURM_JOB_ID": str(job), "CONFIG": env["CONFIG"]}
    template = [w for w in shlex.split(" ".join(D.logical_lines(template_block.text)))
                if not (w.startswith("[") and w.endswith("]"))]
    assert len(printed) == len(template), (printed, template)
    for want, got in zip(template, printed):
        want = re.sub(r"\$([A-Z_]+)", lambda m: values[m[1]], want)
        if D.is_repo_script(want):
            assert got.endswith("/" + want), (want, got)
        else:
            assert got == want, (want, got, printed)
    args = torchrun.get_args_parser().parse_args(printed[3:])
    assert (args.nnodes, args.nproc_per_node, args.max_restarts) == ("4", "8", 0)


# ---------------------------------------------------------------------------------------------------
# Conversion


def _hf_dirs_named(lines):
    return [D.words(ln)[D.words(ln).index("--hf-dir") + 1] for ln in lines if "--hf-dir" in D.words(ln)]


def _tensors(folder):
    import glob

    from safetensors.torch import load_file

    out = {}
    for fn in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(fn))
    return out


def _loads_in_transformers(folder):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_readme_conversion(sandbox, tiny_qwen2):
    """README's two conversion lines as written, on a tiny Qwen2 at the --hf-dir they name: the run
    directory holds checkpoints/iter_0000000 with the actor only and latest naming it; the way back gives
    the source's tensors and loads in transformers."""
    import torch

    block = the_block("test_readme_conversion")
    lines = commands(block)
    (hf_dir,) = _hf_dirs_named(lines)
    shutil.copytree(tiny_qwen2, os.path.join(sandbox, hf_dir))
    D.check(D.run_lines(lines, sandbox, timeout=300), block.where)

    words = [D.words(ln) for ln in lines]
    run_dir = words[0][words[0].index("--out") + 1]
    out = words[1][words[1].index("--out") + 1]
    ckpt = os.path.join(sandbox, run_dir, "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000000"
    common = torch.load(os.path.join(ckpt, "iter_0000000", "common.pt"), weights_only=False)
    assert common["liteppo"]["models"] == ["actor"]
    want, got = _tensors(tiny_qwen2), _tensors(os.path.join(sandbox, out))
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    _loads_in_transformers(os.path.join(sandbox, out))


@pytest.mark.slow
def test_conversion_md(sandbox, tiny_qwen2):
    """docs/conversion.md's blocks in order, as written: HF -> megatron in one process and under torchrun
    with 4 processes at TP=2 x PP=2 (tiny Qwen2s at Qwen2.5-1.5B-Instruct and BIG), then megatron -> HF
    from the run directory and from runs/qwen/checkpoints/iter_0000200 with --dtype bf16 (a training
    checkpoint of step 200 cannot exist here: the converted iter_0000000 is copied to that name). The
    exports hold the files the text lists, in the dtype asked for, and load in transformers; the listing
    block matches both run directories."""
    blocks = blocks_for("test_conversion_md")
    to_mcore, to_hf, listing = blocks
    assert (to_mcore.lang, to_hf.lang, listing.lang) == ("bash", "bash", "")

    lines = commands(to_mcore)
    assert any(D.words(ln)[0] == "torchrun" for ln in lines)
    for hf_dir in _hf_dirs_named(lines):
        shutil.copytree(tiny_qwen2, os.path.join(sandbox, hf_dir))
    D.check(D.run_lines(lines, sandbox, timeout=300), to_mcore.where)
    run_dirs = [D.words(ln)[D.words(ln).index("--out") + 1] for ln in lines]

    exports = {}
    for line in commands(to_hf):
        argv = D.words(line)
        ckpt = argv[argv.index("--ckpt") + 1]
        m = re.fullmatch(r"(.*/checkpoints)/(iter_\d{7})", ckpt)
        if m and not os.path.exists(os.path.join(sandbox, ckpt)):
            shutil.copytree(os.path.join(sandbox, m[1], "iter_0000000"), os.path.join(sandbox, ckpt))
        D.check(D.run_lines([line], sandbox, timeout=300), line)
        dtype = argv[argv.index("--dtype") + 1] if "--dtype" in argv else "auto"
        exports[argv[argv.index("--out") + 1]] = dtype
    assert len(exports) == 2
    for out, dtype in exports.items():
        folder = os.path.join(sandbox, out)
        names = set(os.listdir(folder))
        assert {"config.json", "model.safetensors.index.json", "generation_config.json"} <= names, names
        assert any(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n) for n in names), names
        assert any(n.startswith("tokenizer") for n in names), names
        want = {"auto": "F32", "bf16": "BF16"}[dtype]  # auto: the source's config.json says float32
        assert set(D.safetensors_dtypes(folder).values()) == {want}, (out, dtype)
        _loads_in_transformers(folder)

    entries = D.listing_entries(listing.text, "RUN_DIR")
    assert len(entries) >= 8
    for run_dir in run_dirs:
        for parent, name in entries:
            path = os.path.join(parent.replace("RUN_DIR", os.path.join(sandbox, run_dir), 1), name)
            assert D.path_exists(path, "/"), f"{listing.where}: {run_dir} has no {parent}/{name}"
        latest = open(os.path.join(sandbox, run_dir, "checkpoints", "latest")).read().strip()
        assert re.fullmatch(r"iter_\d{7}", latest)
        assert os.path.isdir(os.path.join(sandbox, run_dir, "checkpoints", latest))


# ---------------------------------------------------------------------------------------------------
# YAML blocks: overrides of a fitting recipe

RECIPES = {  # block -> (recipe it is merged into, world size it is validated for)
    ("docs/data_and_rewards.md", "data:"): ("examples/tiny_cpu.yaml", 2),
    ("docs/sglang.md", "rollout:"): ("examples/qwen2.5_1.5b_8gpu.yaml", 8),
    ("docs/sglang.md", "rollout: [2]"): ("examples/qwen2.5_1.5b_8gpu.yaml", 8),
}
YAML_KEYS = [k for k, e in BLOCKS.items() if e == Run("test_yaml_overrides")]


def merged_config(recipe, block_text, tmp_path, world_size):
    from liteppo_mcore.config import load_config

    with open(os.path.join(REPO, recipe), encoding="utf-8") as f:
        base = yaml.safe_load(f)
    top = yaml.safe_load(block_text)
    path = tmp_path / "merged.yaml"
    path.write_text(yaml.safe_dump(D.deep_merge(base, top)))
    cfg = load_config(str(path), world_size=world_size)
    for dotted, value in D.leaves(top):
        assert D.attr_path(cfg, dotted) == value, (dotted, value)
    return cfg


@pytest.mark.parametrize("key", YAML_KEYS, ids=[f"{k[0]}:{FOUND[k].line}" if k in FOUND else str(k) for k in YAML_KEYS])
def test_yaml_overrides(key, tmp_path):
    """The block merged over a recipe it fits loads (validated for the recipe's world size) with every
    value it sets."""
    assert key in RECIPES, f"{key}: add the recipe it is merged into to RECIPES"
    recipe, world_size = RECIPES[key]
    cfg = merged_config(recipe, FOUND[key].text, tmp_path, world_size)
    if key == ("docs/data_and_rewards.md", "data:"):
        # "the longest prompt, chat template included, is 16 tokens": nothing dropped, the longest is 16
        from liteppo_mcore.data import build_datasets, tokenizer_from_config

        tok = tokenizer_from_config(cfg.model, cfg.data)
        sets = build_datasets(cfg.data, tok, prompt_length=cfg.prompt_length)
        assert all(s.num_dropped == 0 for s in sets)
        assert max(len(p.prompt_ids) for s in sets for p in s) == cfg.prompt_length == 16
        # "the answer is one digit and the end-of-turn token"
        assert all(len(tok(p.answer, add_special_tokens=False)["input_ids"]) + 1 <= cfg.response_length
                   for p in sets[0])


# ---------------------------------------------------------------------------------------------------
# docs/data_and_rewards.md: your own reward function


def test_own_reward_function(tmp_path, monkeypatch):
    """my_rewards.py written as shown; the YAML block after it, over examples/tiny_cpu.yaml, names it, the
    registry resolves it from the working directory (and the `path/to/my_rewards.py:exact` form of its
    comment too), with its declared range, and the reward runner's worker processes score with it."""
    from liteppo_mcore.rewards import build_reward_runner, get_reward, reward_range

    code_block, yaml_block = blocks_for("test_own_reward_function")
    filename = re.match(r"#\s*(\S+\.py)", code_block.first)[1]
    work = tmp_path / "work"
    work.mkdir()
    (work / filename).write_text(code_block.text)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.delitem(sys.modules, filename[:-3], raising=False)

    cfg = merged_config("examples/tiny_cpu.yaml", yaml_block.text, tmp_path, 2)
    alternative = re.search(r"#\s*or:\s*(\S+)", yaml_block.text)[1]
    (work / os.path.dirname(alternative.split(":")[0])).mkdir(parents=True)
    (work / alternative.split(":")[0]).write_text(code_block.text)
    for name in (cfg.reward.name, alternative):
        fn = get_reward(name)
        assert fn("  42\n", "42") == 1.0 and fn("41", "42") == 0.0, name
        assert reward_range(name) == (0.0, 1.0), name

    runner = build_reward_runner(cfg.reward)
    try:
        scores, stats = runner(["42", "the answer is 42", " 7 "], ["42", "42", "7"])
    finally:
        runner.close()
    assert scores == [1.0, 0.0, 1.0] and stats["reward/errors"] == 0
    sys.modules.pop(filename[:-3], None)


# ---------------------------------------------------------------------------------------------------
# docs/data_and_rewards.md: prompt files and tools/prepare_data.py


def test_jsonl_rows(tmp_path, tokenizer):
    """The JSON lines as a .jsonl file, read by the trainer's reader with a chat-template tokenizer: a
    string prompt and a message list, a text answer and a number that becomes text."""
    from liteppo_mcore.config.schema import DataConfig
    from liteppo_mcore.data import build_dataset

    block = the_block("test_jsonl_rows")
    path = tmp_path / "prompts.jsonl"
    path.write_text(block.text)
    rows = [json.loads(ln) for ln in block.text.splitlines() if ln.strip()]
    dataset = build_dataset(DataConfig(train_path=str(path)), tokenizer, prompt_length=512)
    assert [s.answer for s in dataset] == [str(r["answer"]) for r in rows] == ["\\frac{3}{4}", "2"]
    for sample, row in zip(dataset, rows):
        content = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        assert content in sample.prompt_text and sample.prompt_text.startswith(tokenizer.bos_token)


def _prep_words(line):
    argv = D.words(line)
    at = argv.index("tools/prepare_data.py")
    return argv[at + 1:]


def _option(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def gsm8k_rows(n):
    return [{"question": f"Question {i}: a box holds {i} pens and gets {i} more. How many pens?",
             "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"} for i in range(n)]


def test_prepare_data_synopsis(sandbox):
    """The synopsis matches the tool's usage; with its placeholders filled (two input files, no options)
    it writes data/x_train.jsonl."""
    (line,) = commands(the_block("test_prepare_data_synopsis"))
    proc = D.check(subprocess.run([sys.executable, os.path.join(REPO, "tools", "prepare_data.py"), "--help"],
                                  capture_output=True, text=True, env=D.run_env()), "--help")
    usage = " ".join(proc.stdout.split("\n\n")[0].split())
    assert "INPUT [INPUT ...]" in usage and "--out OUT" in usage, usage
    assert "INPUT [INPUT ...]" in line and "[options]" in line, line
    with open(os.path.join(sandbox, "a.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in GSM8K)
    with open(os.path.join(sandbox, "b.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in MATH)
    filled = line.replace("INPUT [INPUT ...]", "a.jsonl b.jsonl").replace("[options]", "")
    D.check(D.run_lines([filled], sandbox, timeout=60), filled)
    out = _option(_prep_words(line), "--out")
    assert len(read_jsonl(os.path.join(sandbox, out))) == len(GSM8K) + len(MATH)


def test_prepare_data_printed_summary(sandbox):
    """The command the text names before the block, on a GSM8K Parquet file of the row count the block
    shows, prints exactly the block."""
    block = the_block("test_prepare_data_printed_summary")
    command = re.findall(r"`(python tools/prepare_data\.py [^`]+)`", D.text_before(block))[-1]
    rows = int(re.search(r"rows read: (\d+)", block.text)[1])
    source = _prep_words(command)[0]
    os.makedirs(os.path.dirname(os.path.join(sandbox, source)), exist_ok=True)
    write_parquet(os.path.join(sandbox, source), gsm8k_rows(rows))
    proc = D.check(D.run_lines([command], sandbox, timeout=120), command)
    assert proc.stdout == block.text


def _run_on_parquet_inputs(name, sandbox, sizes, make_rows):
    """Write make_rows(n) as Parquet at the input path of each line of the block, run the lines as written."""
    block = the_block(name)
    lines = commands(block)
    assert len(lines) == len(sizes), lines
    for line, n in zip(lines, sizes):
        source = _prep_words(line)[0]
        os.makedirs(os.path.dirname(os.path.join(sandbox, source)), exist_ok=True)
        write_parquet(os.path.join(sandbox, source), make_rows(n))
    D.check(D.run_lines(lines, sandbox, timeout=120), block.where)
    return lines, sizes


def test_prepare_data_gsm8k(sandbox, tokenizer, monkeypatch):
    """Both GSM8K lines as written on small train/test Parquet files at the paths they name; the prompts get
    the instruction, the answers are the numbers after ####; the overrides of the closing comment point
    examples/liteppo.yaml at the two files, which the trainer's reader loads."""
    from liteppo_mcore.config import load_config
    from liteppo_mcore.data import build_datasets

    lines, sizes = _run_on_parquet_inputs("test_prepare_data_gsm8k", sandbox, [12, 4], gsm8k_rows)
    for line, n in zip(lines, sizes):
        argv = _prep_words(line)
        records = read_jsonl(os.path.join(sandbox, _option(argv, "--out")))
        instruction = _option(argv, "--instruction")
        assert instruction.endswith("\\boxed{}.")  # bash turned \\ into \
        assert records == [{"prompt": r["question"] + " " + instruction, "answer": str(2 * i)}
                           for i, r in enumerate(gsm8k_rows(n))]

    (then,) = [c for c in D.comments(the_block("test_prepare_data_gsm8k").text) if c.startswith("then:")]
    overrides = then.split(":", 1)[1].split()
    monkeypatch.chdir(sandbox)
    cfg = load_config(os.path.join(REPO, "examples", "liteppo.yaml"), overrides, any_world_size=True)
    train, held = build_datasets(cfg.data, tokenizer, prompt_length=cfg.prompt_length)
    assert (len(train), len(held)) == tuple(sizes)


def test_prepare_data_math(sandbox, tokenizer, monkeypatch):
    """MATH as one JSON file per problem (MATH/train/<subject>/<n>.json, expanded by the shell's glob) and
    MATH-500 as JSONL, as written; answers from the last \\boxed{} and from MATH-500's answer field. The
    recipes of examples/ that read files read exactly these two paths, and loading them works."""
    from liteppo_mcore.config import load_config
    from liteppo_mcore.data import build_datasets

    block = the_block("test_prepare_data_math")
    lines = commands(block)
    train_glob, test_file = (_prep_words(ln)[0] for ln in lines)
    assert train_glob == "MATH/train/*/*.json"
    for i, (subject, row) in enumerate(zip(["algebra", "algebra", "geometry"], MATH)):
        os.makedirs(os.path.join(sandbox, "MATH", "train", subject), exist_ok=True)
        with open(os.path.join(sandbox, "MATH", "train", subject, f"{i}.json"), "w") as f:
            json.dump(row, f)
    os.makedirs(os.path.dirname(os.path.join(sandbox, test_file)), exist_ok=True)
    with open(os.path.join(sandbox, test_file), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in MATH500)
    D.check(D.run_lines(lines, sandbox, timeout=120), block.where)
    outs = [_option(_prep_words(ln), "--out") for ln in lines]
    assert [r["answer"] for r in read_jsonl(os.path.join(sandbox, outs[0]))] == ["\\frac{1}{2}", "3", "\\{0,1\\}"]
    assert [r["answer"] for r in read_jsonl(os.path.join(sandbox, outs[1]))] == [r["answer"] for r in MATH500]

    assert any("the recipes in examples/ read these two paths" in c for c in D.comments(block.text))
    readers = 0
    for name in sorted(os.listdir(os.path.join(REPO, "examples"))):
        if not name.endswith(".yaml"):
            continue
        data = (yaml.safe_load(open(os.path.join(REPO, "examples", name))) or {}).get("data", {})
        if data.get("train_path") or data.get("eval_path"):
            assert [data.get("train_path"), data.get("eval_path")] == outs, name
            readers += 1
    assert readers >= 4
    monkeypatch.chdir(sandbox)
    cfg = load_config(os.path.join(REPO, "examples", "liteppo.yaml"), any_world_size=True)
    train, held = build_datasets(cfg.data, tokenizer, prompt_length=cfg.prompt_length)
    assert (len(train), len(held)) == (3, 2)


DAPO_PROBLEMS = [(f"How many apples are in {i} baskets of 3 apples?", str(3 * i)) for i in range(600)]


def _dapo_input(sandbox, line):
    source = _prep_words(line)[0]
    write_parquet(os.path.join(sandbox, source), dapo_rows(DAPO_PROBLEMS, repeat=2))  # every problem twice


def test_prepare_data_dapo(sandbox):
    """DAPO-Math-17k's shape (600 problems, each twice) as written: the repeats dropped, 500 problems held
    out into the file the comment names, no held-out prompt in training, the prompts kept as messages."""
    block = the_block("test_prepare_data_dapo")
    (line,) = commands(block)
    _dapo_input(sandbox, line)
    proc = D.check(D.run_lines([line], sandbox, timeout=120), line)
    assert "duplicates dropped: 600" in proc.stdout, proc.stdout
    (named,) = [c for c in D.comments(block.text) if c.startswith("->")]
    train_out, test_out = (p.strip() for p in named[2:].split(","))
    assert train_out == _option(_prep_words(line), "--out")
    train, held = read_jsonl(os.path.join(sandbox, train_out)), read_jsonl(os.path.join(sandbox, test_out))
    assert len(held) == int(_option(_prep_words(line), "--split-eval")) and len(train) + len(held) == 600
    assert not {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in held}
    assert all(isinstance(r["prompt"], list) and r["prompt"][0]["content"].startswith(prep.DAPO_HEAD)
               for r in train + held)


def test_prepare_data_dapo_boxed(sandbox):
    """The --strip-template line as written: string prompts, the bare problem and the instruction."""
    block = the_block("test_prepare_data_dapo_boxed")
    (line,) = commands(block)
    _dapo_input(sandbox, line)
    D.check(D.run_lines([line], sandbox, timeout=120), line)
    argv = _prep_words(line)
    out = _option(argv, "--out")
    train = read_jsonl(os.path.join(sandbox, out))
    held = read_jsonl(os.path.join(sandbox, prep.default_eval_out(out)))
    assert len(held) == 500 and len(train) == 100
    answers = dict(DAPO_PROBLEMS)
    instruction = _option(argv, "--instruction")
    for r in train + held:
        problem = r["prompt"][: -len(instruction) - 1]
        assert r["prompt"] == f"{problem} {instruction}" and answers[problem] == r["answer"], r


def test_prepare_data_verl(sandbox, tokenizer):
    """verl-style train/test Parquet files at the paths written: the message lists unchanged, the answer
    from reward_model.ground_truth; the trainer's reader renders them with the chat template."""
    from liteppo_mcore.config.schema import DataConfig
    from liteppo_mcore.data import build_dataset

    lines, sizes = _run_on_parquet_inputs("test_prepare_data_verl", sandbox, [6, 3], verl_rows)
    for line, n in zip(lines, sizes):
        out = os.path.join(sandbox, _option(_prep_words(line), "--out"))
        assert read_jsonl(out) == [{"prompt": r["prompt"], "answer": r["reward_model"]["ground_truth"]}
                                   for r in verl_rows(n)]
        dataset = build_dataset(DataConfig(train_path=out), tokenizer, prompt_length=512)
        assert len(dataset) == n and "You are a careful solver." in dataset[0].prompt_text


# ---------------------------------------------------------------------------------------------------
# docs/performance.md: tools/gpu_check.sh


def test_gpu_check_lines(sandbox):
    """The --dry-run line as written, with gpu-wheels/ holding files of the wheels' names (the dry run
    reads names only): it passes and writes gpu_check.json. Exempt, each for its reason: --fetch-wheels
    downloads from PyPI; --wheels and --quick run tests/gpu and the benchmarks on a GPU
    (tests/unit/test_gpu_check.py runs the dry run's variants)."""
    from tests.unit.test_gpu_check import WHEEL_FILES

    block = the_block("test_gpu_check_lines")
    dry = []
    for line in commands(block):
        argv = D.words(line)
        if "--dry-run" in argv:
            dry.append(line)
        else:
            assert "--fetch-wheels" in argv or "--wheels" in argv or "--quick" in argv, \
                f"{line}: a new kind of gpu_check line; run it here or give its reason in this test"
    assert len(dry) == 1
    wheels = os.path.join(sandbox, _option(D.words(dry[0]), "--wheels"))
    os.makedirs(wheels)
    for name in WHEEL_FILES:
        open(os.path.join(wheels, name), "wb").close()
    out = os.path.join(sandbox, "gpu-check-out")
    os.makedirs(os.path.join(sandbox, "tmp"))
    env = D.run_env(OUT=out, TMPDIR=os.path.join(sandbox, "tmp"))
    proc = D.check(D.run_lines(dry, sandbox, timeout=240, env=env), dry[0])
    assert "gpu check (dry) | PASSED" in proc.stdout
    result = json.load(open(os.path.join(out, "gpu_check.json")))
    assert result["mode"] == "dry" and result["passed"] is True


# ---------------------------------------------------------------------------------------------------
# docs/rollout.md: the engine in code


def rollout_worker(rank, world_size, code):
    """The fragment in a one-process gloo world: examples/tiny_cpu.yaml, its built-in tokenizer, models
    built as examples/models_forward.py does, the first prompts of the built-in task, step 0; once with
    the tokenizer and once with a list of EOS ids, as its comment allows."""
    import torch

    from liteppo_mcore.config import load_config
    from liteppo_mcore.data import build_datasets, tokenizer_from_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.parallel.mcore import initialize_model_parallel

    cfg = load_config(os.path.join(REPO, "examples", "tiny_cpu.yaml"), world_size=world_size)
    groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
    tok = tokenizer_from_config(cfg.model, cfg.data)
    models = build_models(cfg, groups, vocab_size=len(tok))
    train, _ = build_datasets(cfg.data, tok, prompt_length=cfg.prompt_length)
    prompts = [s.prompt_ids for s in train.select(range(3))]
    out = {}
    for variant, tokenizer in (("tokenizer", tok), ("eos ids", [tok.eos_token_id])):
        torch.manual_seed(cfg.seed)  # the hf engine starts from random weights until the first sync: the same ones
        ns = {"cfg": cfg, "models": models, "groups": groups, "tokenizer": tokenizer, "prompts": prompts, "step": 0}
        exec(compile(code, "docs/rollout.md", "exec"), ns)
        out[variant] = [[(list(g.token_ids), len(g.logprobs), g.finish_reason) for g in row]
                        for row in ns["generations"]]
        ns["engine"].shutdown()
    from liteppo_mcore.parallel import strict_device

    return {"out": out, "n": cfg.num_return_sequences_in_group, "max_new": cfg.response_length,
            "eos": tok.eos_token_id, "prompts": len(prompts), "engine": cfg.rollout.engine,
            "strict": strict_device.is_active()}


def test_rollout_fragment():
    """[prompt][sample] -> Generation: one list per prompt of num_return_sequences_in_group generations,
    each with a log-prob per token, ending with EOS ("stop") or at response_length tokens ("length")."""
    from liteppo_mcore.parallel import strict_device
    from tests.distributed.spawn import run_gloo

    block = the_block("test_rollout_fragment")
    (res,) = run_gloo(rollout_worker, 1, block.text, timeout=300)
    assert res["engine"] == "hf"
    assert res["strict"] == strict_device.requested(), "the worker runs in the strict device mode when asked"
    for variant, rows in res["out"].items():
        assert len(rows) == res["prompts"], variant
        for row in rows:
            assert len(row) == res["n"], variant
            for tokens, num_logprobs, finish in row:
                assert 1 <= len(tokens) <= res["max_new"] and num_logprobs == len(tokens)
                ended = tokens[-1] == res["eos"]
                assert finish == ("stop" if ended else "length"), (tokens, finish)
                assert ended or len(tokens) == res["max_new"]
    assert res["out"]["tokenizer"] == res["out"]["eos ids"], "the same seed gives the same samples"
