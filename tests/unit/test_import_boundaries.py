"""The pure packages never import megatron or torch.distributed (checked by parsing, not importing)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "liteppo_mcore"
PURE_PACKAGES = ("algo", "config", "data", "rewards", "convert")
# Packages of this project that import megatron or torch.distributed, so importing them would too.
HEAVY_SUBPACKAGES = ("parallel", "models", "train", "rollout", "checkpoint", "trainer")
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
