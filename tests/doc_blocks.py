"""The fenced code blocks of README.md and docs/*.md, and what the tests need to run them as a user would.

`extract_blocks()` finds every fenced block (``` or ~~~, indented fences included) and keys it by
(file, its first non-empty line), a key that survives edits elsewhere in the file. The rest are
small tools for tests/distributed/test_doc_blocks.py: bash blocks split into logical lines and
rewritten only where the machine differs from a user's (`python` is this interpreter, `torchrun` is
`python -m torch.distributed.run` on a free local port), a sandbox working directory that sees the
repository's tools/, launch/, examples/ and tests/, the flags each of our scripts accepts, tiny
Hugging Face models, and YAML merging.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------
# Extraction

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    file: str   # relative to the repository: README.md, docs/x.md
    line: int   # 1-based line of the opening fence
    lang: str   # the info string's first word ("" when none)
    text: str   # the content, without the fence's indentation, ending with a newline
    end: int    # 1-based line of the closing fence

    @property
    def first(self) -> str:
        return next((ln.strip() for ln in self.text.splitlines() if ln.strip()), "")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files(repo: str = REPO) -> list[str]:
    """README.md and every docs/*.md, relative to the repository."""
    docs = sorted(os.path.relpath(p, repo) for p in glob.glob(os.path.join(repo, "docs", "*.md")))
    return ["README.md"] + docs


def blocks_of(rel: str, repo: str = REPO) -> list[Block]:
    """The fenced blocks of one Markdown file, in order."""
    with open(os.path.join(repo, rel), encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group("indent"), m.group("fence"), m.group("info").strip()
        close = re.compile(r"^[ \t]*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"{rel}:{i + 1}: a fenced block that is never closed")
        out.append(Block(rel, i + 1, info.split()[0] if info else "", "\n".join(body) + "\n", j + 1))
        i = j + 1
    return out


def extract_blocks(repo: str = REPO) -> dict[tuple[str, str], Block]:
    """Every block of README.md and docs/*.md by (file, first non-empty line); a repeated first line in
    one file gets ' [2]', ' [3]', ... on its later blocks."""
    found: dict[tuple[str, str], Block] = {}
    for rel in doc_files(repo):
        for block in blocks_of(rel, repo):
            key, n = (rel, block.first), 1
            while key in found:
                n += 1
                key = (rel, f"{block.first} [{n}]")
            found[key] = block
    return found


def text_before(block: Block, repo: str = REPO) -> str:
    """The Markdown text of the block's file up to its opening fence."""
    with open(os.path.join(repo, block.file), encoding="utf-8") as f:
        return "\n".join(f.read().splitlines()[: block.line - 1])


def text_after(block: Block, repo: str = REPO) -> str:
    """The Markdown text of the block's file after its closing fence."""
    with open(os.path.join(repo, block.file), encoding="utf-8") as f:
        return "\n".join(f.read().splitlines()[block.end:])


# ---------------------------------------------------------------------------------------------------
# Bash blocks


def logical_lines(text: str) -> list[str]:
    """The block's commands: backslash-continued lines joined, blank and comment-only lines dropped
    (a trailing comment stays; bash ignores it)."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if line.strip() and not line.strip().startswith("#"):
            out.append(line.strip())
    if pending.strip():
        out.append(pending.strip())
    return out


def comments(text: str) -> list[str]:
    """The block's comment-only lines, without the '#'."""
    return [ln.strip()[1:].strip() for ln in text.splitlines() if ln.strip().startswith("#")]


def words(line: str) -> list[str]:
    """A logical line as the shell splits it (quotes removed, the trailing comment dropped)."""
    return shlex.split(line, comments=True)


_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_env(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value words (the command's environment) and the command."""
    env: dict[str, str] = {}
    i = 0
    while i < len(argv) and _ASSIGN.match(argv[i]):
        key, _, value = argv[i].partition("=")
        env[key] = value
        i += 1
    return env, list(argv[i:])


def torchrun_prefix(port: int) -> str:
    return (f"{shlex.quote(sys.executable)} -m torch.distributed.run --master_addr 127.0.0.1 "
            f"--master_port {port}")


_COMMAND = re.compile(r"^((?:[A-Za-z_][A-Za-z0-9_]*=(?:'[^']*'|\"[^\"]*\"|\S)*\s+)*)(python|torchrun)(?=\s)")


def localize(line: str, port: int | None = None) -> str:
    """One logical line with the command word made concrete here: `python` -> this interpreter,
    `torchrun` -> `python -m torch.distributed.run --master_addr 127.0.0.1 --master_port PORT`.
    Everything else stays as written (bash expands the globs and the quotes)."""
    def repl(m: re.Match[str]) -> str:
        if m.group(2) == "python":
            return m.group(1) + shlex.quote(sys.executable)
        from liteppo_mcore.parallel.setup import free_port

        return m.group(1) + torchrun_prefix(port or free_port())
    return _COMMAND.sub(repl, line, count=1)


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a documented command: ours, one OpenMP thread, no launcher variables;
    PYTHON (read by the shell scripts) is this interpreter."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "OUT", "LITEPPO_WHEELS", "RDZV_ID", "LITEPPO_ROOT", "CONFIG", "GPUS_PER_NODE")
           and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def run_bash(script: str, cwd: str, timeout: float = 300, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    """`bash -c` the script (after `set -e`), capturing its output."""
    return subprocess.run(["bash", "-c", "set -e\n" + script], cwd=cwd, env=env or run_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_lines(lines: Sequence[str], cwd: str, timeout: float = 300, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    return run_bash("\n".join(localize(ln) for ln in lines), cwd, timeout=timeout, env=env)


def check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    """Assert exit status 0, showing the tail of the output otherwise."""
    assert proc.returncode == 0, (f"{what}: exit status {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                                  f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


# ---------------------------------------------------------------------------------------------------
# Repository paths and the flags our scripts accept

_REPO_PATH = re.compile(r"(?<![\w./$-])((?:tools|launch|examples|tests|docs)/[\w.*/-]*[\w*])")
SCRIPT_SUFFIXES = (".py", ".sh", ".sbatch")


def repo_paths(text: str) -> list[str]:
    """The repository paths a block names (tools/..., launch/..., examples/..., tests/..., docs/...)."""
    return sorted(set(_REPO_PATH.findall(text)))


def path_exists(rel: str, repo: str = REPO) -> bool:
    return bool(glob.glob(os.path.join(repo, rel))) if "*" in rel else os.path.exists(os.path.join(repo, rel))


def is_repo_script(word: str) -> bool:
    return bool(_REPO_PATH.fullmatch(word)) and word.endswith(SCRIPT_SUFFIXES)


_CASE_LABEL = re.compile(r"^\s*((?:-{1,2}[\w-]+\s*\|\s*)*-{1,2}[\w-]+)\)", re.M)
_FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
_flag_cache: dict[str, frozenset] = {}


def accepted_flags(script: str, repo: str = REPO) -> frozenset:
    """The --flags a repository script accepts: a Python tool's, from the options part of its --help
    (argparse: each option line starts with its flags); a shell script's, from the labels of its `case`
    statements (`--out) ...`, `-h | --help) ...`). A batch script passes its arguments to the entry point,
    so it accepts the entry point's."""
    if script.endswith(".sbatch"):
        script = "launch/pretrain_liteppo.py"
    if script not in _flag_cache:
        path = os.path.join(repo, script)
        flags: list[str] = []
        if script.endswith(".py"):
            proc = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, timeout=120,
                                  env=run_env(), cwd=repo)
            check(proc, f"{script} --help")
            for line in proc.stdout.splitlines():
                if re.match(r"^ {1,8}-", line):
                    flags += _FLAG.findall(re.split(r"\s{2,}", line.strip())[0])
        else:
            with open(path, encoding="utf-8") as f:
                for label in _CASE_LABEL.findall(f.read()):
                    flags += _FLAG.findall(label)
        _flag_cache[script] = frozenset(flags)
    return _flag_cache[script]


def torchrun_flags() -> frozenset:
    import torch.distributed.run as run

    return frozenset(k for k in run.get_args_parser()._option_string_actions if k.startswith("--"))


def flag_problems(line: str, repo: str = REPO) -> list[str]:
    """Flags a logical line passes that the program receiving them does not accept: those after one of
    our scripts (checked against the script), and torchrun's own (checked against torch's parser).
    Flags of other programs (sbatch, pip, python itself) are not ours to check."""
    _, argv = split_env(words(line))
    if not argv:
        return []
    scripts = [i for i, w in enumerate(argv) if is_repo_script(w)]
    problems = []
    if argv[0] == "torchrun":
        known = torchrun_flags()
        for w in argv[1: scripts[0] if scripts else len(argv)]:
            if w.startswith("--") and w.split("=")[0] not in known:
                problems.append(f"torchrun does not accept {w.split('=')[0]}")
    if scripts:
        script = argv[scripts[0]]
        known = accepted_flags(script, repo)
        for w in argv[scripts[0] + 1:]:
            if w.startswith("--") and w.split("=")[0] not in known:
                problems.append(f"{script} does not accept {w.split('=')[0]}")
    return problems


# ---------------------------------------------------------------------------------------------------
# A working directory for documented commands


def make_sandbox(path: str, repo: str = REPO) -> str:
    """`path` as the root of a checkout for commands that use relative paths: tools/, launch/, examples/
    and tests/ are links to the repository's, everything a command writes lands in `path`."""
    os.makedirs(path, exist_ok=True)
    for name in ("tools", "launch", "examples", "tests"):
        link = os.path.join(path, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(repo, name), link)
    return path


# ---------------------------------------------------------------------------------------------------
# Tiny Hugging Face models and tokenizers

TOKENIZER_TEXT = ["What is 1/2 + 1/4? Solve x + 1 = 3. Let's think step by step and output the final answer "
                  "within \\boxed{}. The answer is 42."] * 4


def tiny_tokenizer(texts: Sequence[str] = TOKENIZER_TEXT):
    """A byte-level BPE tokenizer with the built-in task's special tokens and chat template."""
    from liteppo_mcore.data.builtin_tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(list(texts), vocab_size=300)


def write_tiny_hf_model(path: str, family: str = "qwen2", seed: int = 0) -> str:
    """A Hugging Face model directory (config.json, model.safetensors, generation_config.json, the
    tokenizer files) of a 2-layer model of `family` with random weights, standing in for a real one."""
    import torch
    import transformers

    tok = tiny_tokenizer()
    classes = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    extra = {"head_dim": 16} if family == "qwen3" else {}
    config = classes[family](vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def safetensors_dtypes(folder: str) -> dict[str, str]:
    """Tensor name -> dtype string ("F32", "BF16", ...) of every *.safetensors file in `folder`."""
    import json
    import struct

    out: dict[str, str] = {}
    for fn in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with open(fn, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        out.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return out


# ---------------------------------------------------------------------------------------------------
# YAML


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a YAML mapping."""
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += leaves(value, dotted + ".")
        else:
            out.append((dotted, value))
    return out


def attr_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------------
# Directory listings like docs/conversion.md's


def listing_entries(text: str, root_word: str) -> list[tuple[str, str]]:
    """(parent path, entry) for each name of an indented directory listing: the first line is the root
    (`root_word/...`), two spaces of indentation per level, names separated by ', ', '#' starts a
    comment, '...' means more files; a name ending in '/' is a folder that deeper lines are inside."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    root = lines[0].split("#")[0].strip().rstrip("/")
    assert root.startswith(root_word), lines[0]
    stack: list[tuple[int, str]] = [(-1, root)]
    out: list[tuple[str, str]] = []
    for line in lines[1:]:
        depth = len(line) - len(line.lstrip(" "))
        names = [n.strip() for n in line.split("#")[0].split(",") if n.strip() and n.strip() != "..."]
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1]
        for name in names:
            out.append((parent, name.rstrip("/")))
        if len(names) == 1 and names[0].endswith("/"):
            stack.append((depth, f"{parent}/{names[0].rstrip('/')}"))
    return out
