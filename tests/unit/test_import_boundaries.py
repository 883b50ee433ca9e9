"""Which package of liteppo_mcore may import which (a table, checked for every module), and the pure
packages never import megatron or torch.distributed (checked by parsing, not importing).

`python -m pytest tests/unit/test_import_boundaries.py` prints the table."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "liteppo_mcore"
PURE_PACKAGES = ("algo", "config", "data", "rewards", "convert")
# Packages of this project that import megatron or torch.distributed, so importing them would too.
HEAVY_SUBPACKAGES = ("parallel", "models", "update", "rollout", "checkpoint", "trainer")
FORBIDDEN_PREFIXES = ("megatron", "torch.distributed") + tuple(f"liteppo_mcore.{p}" for p in HEAVY_SUBPACKAGES)


def _is_forbidden(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in FORBIDDEN_PREFIXES)


def _module_of(path: Path) -> list:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(source: str, module_parts: list, is_package: bool = False) -> list:
    """Absolute names of every module imported by ``source`` (relative imports resolved), including
    ``from X import Y`` as ``X.Y`` and string arguments of ``importlib.import_module``/``__import__``."""
    names = []
    package = module_parts if is_package else module_parts[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            func_name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if func_name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return names


def violations(package: str) -> list:
    found = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        parts = _module_of(path)
        for name in imported_modules(path.read_text(), parts, is_package=path.name == "__init__.py"):
            if _is_forbidden(name):
                found.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return found


# Package (or top-level module) -> the other parts of liteppo_mcore it may import. Lower layers first;
# nothing imports upwards, so there is no cycle. Imports inside functions count as well.
ALLOWED = {
    "halt": set(),                                   # the error that stops a run (exit 3): pure
    "config": set(),                                 # schema, choices, loading, validation: pure
    "algo": {"config"},                              # the PPO / GRPO maths on plain tensors
    "data": {"config"},                              # prompt files, tokenizers, built-in task
    "rewards": set(),                                # reward functions and their worker pool
    "convert": set(),                                # Hugging Face <-> megatron names and layouts
    "parallel": {"config"},                          # process groups, reducer, device, stages
    "models": {"config", "convert", "parallel"},     # megatron GPT actor / critic / reference
    "utils": {"models", "parallel"},                 # console, sinks, timers, FLOPs, seeds, benchmarks
    "checkpoint": {"config", "convert", "models", "parallel"},
    "rollout": {"config", "convert", "models", "parallel", "utils"},
    "update": {"algo", "config", "halt", "models", "parallel", "utils"},   # the PPO update (one step of a model)
    "trainer": {"algo", "checkpoint", "config", "convert", "data", "halt", "models", "parallel", "rewards",
                "rollout", "update", "utils"},
    "preflight": {"checkpoint", "data"},         # the dry run's checks of paths, tokenizer, data
}


def _part(path: Path) -> str:
    """The package (or top-level module) of liteppo_mcore that `path` belongs to."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: Path) -> list:
    """(line-free) the other parts of liteppo_mcore that the module at `path` imports."""
    own = _part(path)
    found = set()
    for name in imported_modules(path.read_text(), _module_of(path), is_package=path.name == "__init__.py"):
        pieces = name.split(".")
        if pieces[0] == "liteppo_mcore" and len(pieces) > 1 and pieces[1] != own and pieces[1] in ALLOWED:
            found.add(pieces[1])
    return sorted(found)


def _modules():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py" or p.parent != PACKAGE]


def test_every_part_of_the_package_is_in_the_table():
    parts = {_part(p) for p in _modules()}
    assert parts == set(ALLOWED), (sorted(parts - set(ALLOWED)), sorted(set(ALLOWED) - parts))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_module_imports_only_what_its_package_may(path):
    part = _part(path)
    extra = [name for name in _imported_parts(path) if name not in ALLOWED[part]]
    assert not extra, (f"{path.relative_to(PACKAGE.parent)} ({part}) imports {extra}; "
                       f"the table allows {sorted(ALLOWED[part])}")


def test_the_table_has_no_cycle_and_no_unused_permission():
    order = []
    remaining = dict(ALLOWED)
    while remaining:
        ready = sorted(k for k, deps in remaining.items() if deps <= set(order))
        assert ready, f"a cycle among {sorted(remaining)}"
        order += ready
        for k in ready:
            del remaining[k]
    used = {part: set() for part in ALLOWED}
    for path in _modules():
        used[_part(path)].update(_imported_parts(path))
    assert {k: sorted(v - used[k]) for k, v in ALLOWED.items() if v - used[k]} == {}  # keep the table tight


def test_print_the_table(capsys):
    width = max(map(len, ALLOWED))
    with capsys.disabled():
        print("\nliteppo_mcore: which part may import which (tests/unit/test_import_boundaries.py ALLOWED)")
        for part, deps in ALLOWED.items():
            print(f"  {part:<{width}} -> {', '.join(sorted(deps)) or '(nothing of the package)'}")
    assert "models" in ALLOWED and "checkpoint" not in ALLOWED["models"]  # weights are loaded from above


def test_the_readme_layout_table_matches_the_folders():
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout"):]
    section = section[:section.index("\n## ", 4)]
    import re

    named = set(re.findall(r"`(liteppo_mcore/[\w/.]*)`", section))
    for entry in named:
        assert (PACKAGE.parent / entry).exists(), f"README's layout table names {entry}, which does not exist"
    listed = {entry.split("/")[1].removesuffix(".py") for entry in named
              if entry.count("/") >= 1 and entry != "liteppo_mcore/"}
    assert listed == set(ALLOWED), (sorted(set(ALLOWED) - listed), sorted(listed - set(ALLOWED)))
    for folder in ("launch", "examples", "tools", "tests", "docs"):
        assert f"`{folder}/`" in section, folder


@pytest.mark.parametrize("package", PURE_PACKAGES)
def test_pure_package_has_no_forbidden_imports(package):
    assert violations(package) == []


def test_algo_is_not_empty():
    # The boundary test must not pass vacuously on the package that matters most.
    assert len(list((PACKAGE / "algo").rglob("*.py"))) >= 3


@pytest.mark.parametrize(
    "source, forbidden",
    [
        ("import megatron.core", True),
        ("from megatron.core import parallel_state", True),
        ("import torch.distributed as dist", True),
        ("from torch import distributed", True),
        ("from torch.distributed import all_reduce", True),
        ("from ..parallel import Reducer", True),
        ("from liteppo_mcore.models import gpt", True),
        ("import importlib\nimportlib.import_module('megatron.core')", True),
        ("def f():\n    import megatron", True),
        ("import torch\nfrom torch import nn\nfrom .stats import as_bool_mask", False),
        ("import megatron_like_name", False),
    ],
)
def test_checker_flags_what_it_should(source, forbidden):
    names = imported_modules(source, ["liteppo_mcore", "algo", "example"])
    assert any(_is_forbidden(n) for n in names) is forbidden, names


def test_math_verify_is_imported_at_first_use_only():
    """The trainer imports the rewards for every run; math-verify is needed only by the `math` reward
    (a GPU machine that runs a built-in task need not have it)."""
    import subprocess
    import sys

    code = ("import sys; import liteppo_mcore.rewards as r; assert 'math_verify' not in sys.modules; "
            "r.math_reward('\\\\boxed{1}', '1'); assert 'math_verify' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
