"""SGLang's own source, read from its released wheels, for the contract tests of our SGLang client.

SGLang cannot be installed next to this project (it pins its own torch and CUDA kernels) and importing
it pulls CUDA, so the contract tests (tests/unit/test_sglang_contract.py) never import it: they download
the wheel of each supported version (`pip download --no-deps`), open it as a zip file and read the few
modules that define the HTTP contract with `ast`:

* `sglang/srt/entrypoints/http_server.py`: the routes (`@app.get/post/.../api_route(...)`, also
  `app.add_api_route(...)` and routes registered in a loop over a literal list of paths), their HTTP
  methods and the request class each handler takes as its body;
* `sglang/srt/managers/io_struct.py`: the fields of the request classes (`*ReqInput`: msgspec structs
  `class X(BaseReq, kw_only=True)` inheriting `rid`/`http_worker_ipc`, and the `@dataclass`
  `GenerateReqInput`);
* `sglang/srt/sampling/sampling_params.py`: the fields of `SamplingParams` (the API ones, before the
  "Internal fields" comment);
* `sglang/srt/server_args.py` and the namespaces it assembles `ServerArgs` from
  (`sglang/srt/arg_groups/fields/*.py`, `A[T, "help"]` / `A[T, Arg(...)]` fields turned into flags by
  `arg_groups/arg_utils.add_cli_args_from_dataclass`), plus the flags `ServerArgs.add_cli_args`
  registers by hand;
* `sglang/srt/managers/tokenizer_manager.py` (and the detokenizer): the `meta_info` keys of /generate
  answers and the answers' top-level keys; `schedule_batch.py`: the finish-reason JSON;
* `sglang/api/v1/api_types.py` (0.5.23 on): the generated JSON contract that gates /generate. It is
  pure Python on `typing` and `msgspec.Struct`; `api_types_module()` runs it with a stand-in for
  `msgspec.Struct` (after checking it imports nothing else), so a payload can be validated by
  SGLang's own decoder.

The wheel is cached in $LITEPPO_SGLANG_WHEEL_CACHE, else ~/.cache/liteppo-mcore/sglang-wheels, and
reused when present. When it cannot be downloaded, `SGLangWheelUnavailable` is raised;
`source_for_test` turns that into a skip, or a failure when LITEPPO_REQUIRE_SGLANG_WHEELS=1 (CI).
"""

from __future__ import annotations

import argparse
import ast
import base64
import binascii
import builtins
import dataclasses
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SUPPORTED_VERSIONS = ("0.5.20", "0.5.23")  # the lowest and highest of pyproject's sglang>=0.5.20,<0.6
CACHE_ENV = "LITEPPO_SGLANG_WHEEL_CACHE"
REQUIRE_ENV = "LITEPPO_REQUIRE_SGLANG_WHEELS"
DEFAULT_CACHE = Path("~/.cache/liteppo-mcore/sglang-wheels")
DOWNLOAD_TIMEOUT_S = 900

HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
SAMPLING_PARAMS = "sglang/srt/sampling/sampling_params.py"
SERVER_ARGS = "sglang/srt/server_args.py"
ARG_UTILS = "sglang/srt/arg_groups/arg_utils.py"
TOKENIZER_MANAGER = "sglang/srt/managers/tokenizer_manager.py"
DETOKENIZER_MANAGER = "sglang/srt/managers/detokenizer_manager.py"
SCHEDULE_BATCH = "sglang/srt/managers/schedule_batch.py"
SCHEDULER_WEIGHT_UPDATER = "sglang/srt/managers/scheduler_components/weight_updater.py"
SAMPLING_BATCH_INFO = "sglang/srt/sampling/sampling_batch_info.py"
API_TYPES = "sglang/api/v1/api_types.py"
LAUNCH_SERVER = "sglang/launch_server.py"

_HTTP_VERBS = ("get", "post", "put", "delete", "patch", "head", "options")


class SGLangWheelUnavailable(RuntimeError):
    """The wheel of an SGLang version could not be downloaded (registry unreachable, no such release)."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable  # the registry did not answer (so other versions will not either)


class SGLangSourceError(RuntimeError):
    """The wheel's source does not have the shape this reader expects (SGLang changed its layout)."""


# -- download and cache ---------------------------------------------------------------------------

def wheels_required(env: dict[str, str] | None = None) -> bool:
    return (env if env is not None else os.environ).get(REQUIRE_ENV, "") not in ("", "0")


def cache_dir(env: dict[str, str] | None = None) -> Path:
    configured = (env if env is not None else os.environ).get(CACHE_ENV, "")
    return Path(configured).expanduser() if configured else DEFAULT_CACHE.expanduser()


def _wheel_version(zf: zipfile.ZipFile) -> str | None:
    for name in zf.namelist():
        if name.endswith(".dist-info/METADATA") and name.count("/") == 1:
            for line in zf.read(name).decode(errors="replace").splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
            return None
    return None


def _usable(path: Path, version: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            zf.getinfo(HTTP_SERVER)
            return _wheel_version(zf) == version
    except (zipfile.BadZipFile, KeyError, OSError):
        return False


def cached_wheel(version: str, directory: Path | None = None, validate: bool = False) -> Path | None:
    """The cached wheel of `version`, or None. With `validate`, a corrupt or mismatched file is removed
    (otherwise `SGLangSource` checks the file it opens)."""
    directory = directory or cache_dir()
    for candidate in sorted(glob.glob(str(directory / f"sglang-{version}-*.whl"))):
        path = Path(candidate)
        if not validate or _usable(path, version):
            return path
        path.unlink(missing_ok=True)
    return None


def _pip_download(version: str, dest: str, extra: Sequence[str], timeout_s: float) -> tuple[int, str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               "--timeout", "30", "--retries", "2", "-d", dest, *extra, f"sglang=={version}"]
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout_s:g} s: {(exc.output or '')[-2000:]}"
    except OSError as exc:
        return 127, f"{type(exc).__name__}: {exc}"
    return done.returncode, done.stdout


def download_wheel(version: str, directory: Path | None = None,
                   timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The wheel of `version` in the cache, downloaded with `pip download --no-deps` when missing."""
    directory = directory or cache_dir()
    found = cached_wheel(version, directory)
    if found is not None:
        return found
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".sglang-{version}-", dir=str(directory))
    except OSError as exc:
        raise SGLangWheelUnavailable(f"cannot create the SGLang wheel cache {directory}: {exc} "
                                     f"(set {CACHE_ENV} to a writable folder)") from None
    try:
        # SGLang publishes CPython 3.11 manylinux wheels: a second try asks for that one explicitly, so
        # the tests can read it from another interpreter too.
        attempts = ([], ["--implementation", "cp", "--python-version", "3.11", "--abi", "cp311",
                         "--platform", "manylinux_2_34_x86_64", "--platform", "any"])
        outputs = []
        for extra in attempts:
            code, output = _pip_download(version, staging, extra, timeout_s)
            outputs.append(f"exit {code}: {_summary(output)}")
            if code != 0 and _unreachable(output):
                break  # the other interpreter tag would not reach the registry either
            wheels = glob.glob(os.path.join(staging, f"sglang-{version}-*.whl"))
            if code == 0 and wheels:
                target = directory / os.path.basename(wheels[0])
                os.replace(wheels[0], target)
                with zipfile.ZipFile(target) as zf:
                    bad = zf.testzip()
                if bad is not None or not _usable(target, version):
                    target.unlink(missing_ok=True)
                    raise SGLangWheelUnavailable(f"the downloaded sglang=={version} wheel is damaged ({bad})")
                return target
        raise SGLangWheelUnavailable(
            f"cannot download the sglang=={version} wheel with pip (is the package registry reachable?): "
            + " | ".join(outputs), unreachable=any(_unreachable(o) for o in outputs))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_NETWORK_ERRORS = ("NewConnectionError", "ConnectTimeout", "ReadTimeout", "Max retries exceeded",
                   "Temporary failure in name resolution", "Name or service not known", "Connection refused",
                   "Network is unreachable", "timed out", "ProxyError", "SSLError")


def _unreachable(output: str) -> bool:
    return any(marker in output for marker in _NETWORK_ERRORS)


def _summary(output: str) -> str:
    """pip's ERROR lines, and its last connection warning (its whole output is long)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    network = [line for line in lines if _unreachable(line)][-1:]
    picked = network + errors or lines[-3:]
    return " ".join(line[:300] for line in picked)


_SOURCES: dict[str, SGLangSource] = {}
_FAILURES: dict[str, SGLangWheelUnavailable] = {}
_LOCK = threading.Lock()


def source(version: str) -> SGLangSource:
    """The parsed source of SGLang `version` (downloaded once per process; a failure is remembered)."""
    with _LOCK:
        if version in _SOURCES:
            return _SOURCES[version]
        if version in _FAILURES:
            raise _FAILURES[version]
        down = next((f for f in _FAILURES.values() if f.unreachable), None)
        if down is not None and cached_wheel(version) is None:
            raise SGLangWheelUnavailable(f"not trying again for {version}: {down}", unreachable=True)
        try:
            path = download_wheel(version)
            try:
                opened = SGLangSource(version, path)
            except (zipfile.BadZipFile, SGLangSourceError, OSError):  # a damaged or foreign cached file
                path.unlink(missing_ok=True)
                opened = SGLangSource(version, download_wheel(version))
        except SGLangWheelUnavailable as exc:
            _FAILURES[version] = exc
            raise
        _SOURCES[version] = opened
        return opened


def source_for_test(version: str) -> SGLangSource:
    """`source(version)`, or pytest.skip with the reason (pytest.fail when LITEPPO_REQUIRE_SGLANG_WHEELS=1)."""
    import pytest

    try:
        return source(version)
    except SGLangWheelUnavailable as exc:
        if wheels_required():
            pytest.fail(f"{REQUIRE_ENV}=1 but {exc}", pytrace=False)
        pytest.skip(f"SGLang {version} wheel unavailable: {exc}")


# -- what is read -----------------------------------------------------------------------------------


def _import_source(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a `from ... import` in `package` reads from (relative levels resolved)."""
    source = node.module or ""
    if node.level:
        parts = package.split(".")
        source = ".".join(parts[:len(parts) - node.level + 1] + ([source] if source else []))
    return source

@dataclasses.dataclass(frozen=True)
class Field:
    """One annotated field of a class: its annotation and default as source text."""

    name: str
    annotation: str
    default: str | None  # source of the default, "factory:<src>" for a default_factory; None: required
    owner: str              # the class that declares it
    line: int

    @property
    def required(self) -> bool:
        return self.default is None


@dataclasses.dataclass(frozen=True)
class Route:
    """One registered HTTP route of http_server.py."""

    path: str
    methods: frozenset[str]
    handler: str
    body: str | None           # the request class the handler parses its JSON body into
    query: tuple[str, ...]        # query parameters (FastAPI Query(...))
    deprecated: bool              # the handler's docstring says so
    line: int


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag of `python -m sglang.launch_server`."""

    dest: str                     # the ServerArgs field it sets
    names: tuple[str, ...]        # the flag and its aliases
    kind: str                     # "store_true", "value", "list" (nargs +) or "action" (custom action)
    nargs: str | None
    value_type: str               # "int", "float" or "str" (what argparse converts the value with)
    required: bool
    choices: tuple[Any, ...] | None
    origin: str                   # "field" (auto-derived from a ServerArgs field) or "manual"


def _const_str(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _call_name(node: ast.AST) -> str:
    """`foo` for foo(...), `a.b.c` for a.b.c(...)."""
    func = node.func if isinstance(node, ast.Call) else node
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _literal(node: ast.AST | None) -> Any:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _unwrap_annotated(node: ast.AST) -> tuple[ast.AST, list[ast.AST]]:
    """(inner annotation, metadata) of `Annotated[T, ...]` / `A[T, ...]`; (node, []) otherwise."""
    if isinstance(node, ast.Subscript) and _call_name(node.value).split(".")[-1] in ("Annotated", "A"):
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return elts[0], list(elts[1:])
    return node, []


def _unwrap_optional(node: ast.AST) -> tuple[ast.AST, bool]:
    if isinstance(node, ast.Subscript) and _call_name(node.value).split(".")[-1] == "Optional":
        return node.slice, True
    members = _union_members(node)
    if members is not None:
        rest = [m for m in members if not (isinstance(m, ast.Constant) and m.value is None)]
        if len(rest) == 1 and len(members) == 2:
            return rest[0], True
    return node, False


def _union_members(node: ast.AST) -> list[ast.AST] | None:
    if isinstance(node, ast.Subscript) and _call_name(node.value).split(".")[-1] == "Union":
        return list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return (_union_members(node.left) or [node.left]) + (_union_members(node.right) or [node.right])
    return None


def _class_fields(tree: ast.Module, name: str, path: str) -> dict[str, Field]:
    """Annotated fields of class `name` in `tree`, those of its same-module bases first."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    if name not in classes:
        raise SGLangSourceError(f"{path} defines no class {name}")

    def collect(cls_name: str, seen: tuple[str, ...]) -> dict[str, Field]:
        node = classes[cls_name]
        fields: dict[str, Field] = {}
        for base in node.bases:
            base_name = _call_name(base)
            if base_name in classes and base_name not in seen:
                fields.update(collect(base_name, seen + (cls_name,)))
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            if _call_name(stmt.annotation).split(".")[-1] == "ClassVar" or (
                    isinstance(stmt.annotation, ast.Subscript)
                    and _call_name(stmt.annotation.value).split(".")[-1] == "ClassVar"):
                continue
            default: str | None
            value = stmt.value
            if value is None:
                default = None
            elif isinstance(value, ast.Call) and _call_name(value).split(".")[-1] == "field":
                given = _keyword(value, "default")
                factory = _keyword(value, "default_factory")
                default = (ast.unparse(given) if given is not None
                           else f"factory:{ast.unparse(factory)}" if factory is not None else None)
            else:
                default = ast.unparse(value)
            fields[stmt.target.id] = Field(stmt.target.id, ast.unparse(stmt.annotation), default, cls_name,
                                           stmt.lineno)
        return fields

    return collect(name, ())


class SGLangSource:
    """The source files of one SGLang wheel, read on demand (nothing is imported or extracted)."""

    def __init__(self, version: str, wheel: Path):
        self.version = version
        self.wheel = Path(wheel)
        self._zip = zipfile.ZipFile(self.wheel)  # kept open: reading its directory is the slow part
        self._zip_lock = threading.Lock()
        self.names = frozenset(self._zip.namelist())
        self._text: dict[str, str] = {}
        self._trees: dict[str, ast.Module] = {}
        found = _wheel_version(self._zip)
        if HTTP_SERVER not in self.names or found != version:
            self._zip.close()
            raise SGLangSourceError(f"{self.wheel} is not SGLang {version}'s wheel (version {found})")

    def __repr__(self) -> str:
        return f"SGLangSource({self.version!r}, {self.wheel.name!r})"

    def where(self, path: str) -> str:
        """`<wheel file>:<path>`, for messages and docs."""
        return f"{self.wheel.name}:{path}"

    def has(self, path: str) -> bool:
        return path in self.names

    def read(self, path: str) -> str:
        if path not in self._text:
            if path not in self.names:
                raise SGLangSourceError(f"SGLang {self.version}'s wheel has no {path}")
            with self._zip_lock:
                self._text[path] = self._zip.read(path).decode("utf-8")
        return self._text[path]

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(self.read(path), filename=self.where(path))
        return self._trees[path]

    def metadata_version(self) -> str | None:
        with self._zip_lock:
            return _wheel_version(self._zip)

    # (a) routes --------------------------------------------------------------------------------
    @functools.cached_property
    def routes(self) -> list[Route]:
        tree = self.tree(HTTP_SERVER)
        functions = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        routes: list[Route] = []

        def paths_of(node: ast.AST, env: dict[str, list[str]]) -> list[str]:
            text = _const_str(node)
            if text is not None:
                return [text]
            if isinstance(node, ast.Name) and node.id in env:
                return env[node.id]
            if isinstance(node, ast.Call) and _call_name(node) in ("os.environ.get", "os.getenv", "environ.get"):
                if len(node.args) > 1 and _const_str(node.args[1]) is not None:
                    return [_const_str(node.args[1])]
            return []

        def register(call: ast.Call, handler: ast.AST | None, env: dict[str, list[str]], line: int) -> None:
            verb = call.func.attr
            path_node = call.args[0] if call.args else _keyword(call, "path")
            if path_node is None:
                return
            if verb in ("api_route", "add_api_route"):
                methods = _literal(_keyword(call, "methods")) or ["GET"]
            elif verb == "websocket":
                methods = ["WEBSOCKET"]
            else:
                methods = [verb.upper()]
            fn = None
            if isinstance(handler, (ast.FunctionDef, ast.AsyncFunctionDef)):
                fn = handler
            elif isinstance(handler, ast.Name):
                fn = functions.get(handler.id)
            body, query = self._handler_inputs(fn)
            doc = (ast.get_docstring(fn) or "") if fn is not None else ""
            for path in paths_of(path_node, env):
                routes.append(Route(path, frozenset(m.upper() for m in methods), fn.name if fn else "?", body,
                                    query, "deprecated" in doc.lower(), line))

        def is_app_call(node: ast.AST, verbs: Iterable[str]) -> bool:
            return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in verbs and _call_name(node.func.value) in ("app", "router"))

        def visit(node: ast.AST, env: dict[str, list[str]]) -> None:
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                values = _literal(node.iter)
                if isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values):
                    env = {**env, node.target.id: list(values)}
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for deco in node.decorator_list:
                    if is_app_call(deco, _HTTP_VERBS + ("api_route", "websocket")):
                        register(deco, node, env, deco.lineno)
            if isinstance(node, ast.Call):
                if is_app_call(node, ("add_api_route",)) and len(node.args) >= 2:
                    register(node, node.args[1], env, node.lineno)
                elif (isinstance(node.func, ast.Call) and is_app_call(node.func, _HTTP_VERBS + ("api_route",))
                      and node.args):  # app.api_route(path, ...)(handler)
                    register(node.func, node.args[0], env, node.lineno)
            for child in ast.iter_child_nodes(node):
                visit(child, env)

        visit(tree, {})
        return routes

    def _handler_inputs(self, fn: ast.AST | None) -> tuple[str | None, tuple[str, ...]]:
        if fn is None:
            return None, ()
        args = fn.args.args + fn.args.kwonlyargs
        defaults = [None] * (len(fn.args.args) - len(fn.args.defaults)) + list(fn.args.defaults)
        defaults += list(fn.args.kw_defaults)
        body, query = None, []
        for arg, default in zip(args, defaults):
            if isinstance(default, ast.Call) and _call_name(default).split(".")[-1] == "Query":
                query.append(arg.arg)
                continue
            if arg.annotation is None:
                continue
            inner, _ = _unwrap_annotated(arg.annotation)
            name = _call_name(inner) if isinstance(inner, (ast.Name, ast.Attribute)) else ""
            if name and name.split(".")[-1] not in ("Request", "Response", "BackgroundTasks", "str", "int",
                                                    "float", "bool", "WebSocket") and body is None:
                body = name.split(".")[-1]
        return body, tuple(query)

    def route(self, path: str) -> list[Route]:
        """Every registration of `path` (a path may be registered once per method)."""
        return [r for r in self.routes if r.path == path]

    def methods(self, path: str) -> frozenset[str]:
        return frozenset(m for r in self.route(path) for m in r.methods)

    def route_for(self, method: str, path: str) -> Route | None:
        for r in self.route(path):
            if method.upper() in r.methods:
                return r
        return None

    # (b) request classes -----------------------------------------------------------------------
    def class_fields(self, path: str, name: str) -> dict[str, Field]:
        return _class_fields(self.tree(path), name, path)

    def classes(self, path: str) -> list[str]:
        return [n.name for n in self.tree(path).body if isinstance(n, ast.ClassDef)]

    @functools.cached_property
    def req_inputs(self) -> dict[str, dict[str, Field]]:
        """Every `*ReqInput` class of io_struct.py -> its fields (base-class fields included)."""
        return {name: self.class_fields(IO_STRUCT, name) for name in self.classes(IO_STRUCT)
                if name.endswith("ReqInput")}

    def request_class_kind(self, name: str) -> str:
        """"dataclass" or "msgspec" (a struct deriving, through its bases, from msgspec.Struct)."""
        classes = {n.name: n for n in self.tree(IO_STRUCT).body if isinstance(n, ast.ClassDef)}
        node = classes[name]
        if any(_call_name(d.func if isinstance(d, ast.Call) else d).split(".")[-1] == "dataclass"
               for d in node.decorator_list):
            return "dataclass"
        todo, seen = list(node.bases), set()
        while todo:
            base = _call_name(todo.pop())
            if base.split(".")[-1] == "Struct":
                return "msgspec"
            if base in classes and base not in seen:
                seen.add(base)
                todo.extend(classes[base].bases)
        return "other"

    # (c) sampling params -----------------------------------------------------------------------
    @functools.cached_property
    def sampling_params(self) -> dict[str, Field]:
        return self.class_fields(SAMPLING_PARAMS, "SamplingParams")

    @functools.cached_property
    def sampling_params_api(self) -> dict[str, Field]:
        """The fields callers set: those before SamplingParams' "Internal fields" comment (all of them
        when there is no such comment)."""
        node = next(n for n in self.tree(SAMPLING_PARAMS).body
                    if isinstance(n, ast.ClassDef) and n.name == "SamplingParams")
        lines = self.read(SAMPLING_PARAMS).splitlines()
        marker = next((i + 1 for i in range(node.lineno - 1, node.end_lineno)
                       if lines[i].lstrip().startswith("#") and "internal fields" in lines[i].lower()), None)
        return {k: f for k, f in self.sampling_params.items() if marker is None or f.line < marker}

    # (d) server arguments ----------------------------------------------------------------------
    def _server_args_sources(self) -> list[tuple[str, str]]:
        """(module path, class) of every class ServerArgs collects its fields from, ServerArgs last."""
        tree = self.tree(SERVER_ARGS)
        imported: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    imported[alias.asname or alias.name] = node.module
        sources: list[tuple[str, str]] = []
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == "_INPUT_NAMESPACES" and isinstance(node.value, (ast.List, ast.Tuple))):
                for elt in node.value.elts:
                    name = _call_name(elt)
                    if name not in imported:
                        raise SGLangSourceError(f"{SERVER_ARGS}: cannot tell where namespace {name} comes from")
                    sources.append((imported[name].replace(".", "/") + ".py", name))
        sources.append((SERVER_ARGS, "ServerArgs"))
        return sources

    @functools.cached_property
    def server_args_fields(self) -> dict[str, tuple[Field, ast.AST]]:
        """Every ServerArgs field -> (Field, its annotation node)."""
        out: dict[str, tuple[Field, ast.AST]] = {}
        for path, cls in self._server_args_sources():
            tree = self.tree(path)
            node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
            if node is None:
                raise SGLangSourceError(f"{path} defines no class {cls}")
            fields = _class_fields(tree, cls, path)
            annotations = {s.target.id: s.annotation for s in node.body
                           if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
            for name, field in fields.items():
                out[name] = (field, annotations.get(name, ast.parse(field.annotation, mode="eval").body))
        return out

    @functools.cached_property
    def cli_flags(self) -> dict[str, Flag]:
        """Every flag `ServerArgs.add_cli_args` registers (each alias too) -> its `Flag`.

        Fields follow `add_cli_args_from_dataclass`: a field annotated `A[T, "help"]` or
        `A[T, Arg(...)]` becomes `Arg.cli_name or "--" + name.replace("_", "-")` plus `Arg.aliases`,
        unless `Arg(no_cli=True)`; bool -> store_true, List[...] -> nargs "+", else one value."""
        flags: dict[str, Flag] = {}
        for name, (field, annotation) in self.server_args_fields.items():
            flag = _field_flag(name, field, annotation)
            if flag is not None:
                for alias in flag.names:
                    flags[alias] = flag
        for flag in self._manual_flags():
            for alias in flag.names:
                flags[alias] = flag
        return flags

    def _manual_flags(self) -> list[Flag]:
        tree = self.tree(SERVER_ARGS)
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ServerArgs")
        method = next((n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                       and n.name == "add_cli_args"), None)
        if method is None:
            raise SGLangSourceError(f"{SERVER_ARGS}: ServerArgs has no add_cli_args")
        flags = []
        for call in ast.walk(method):
            if not (isinstance(call, ast.Call) and _call_name(call).endswith("add_argument")):
                continue
            names = tuple(s for s in (_const_str(a) for a in call.args) if s and s.startswith("-"))
            if not names:
                continue
            long_name = next((n for n in names if n.startswith("--")), names[0])
            dest = _const_str(_keyword(call, "dest")) if _keyword(call, "dest") is not None else None
            dest = dest or long_name.lstrip("-").replace("-", "_")
            action = _keyword(call, "action")
            action_name = _const_str(action) if action is not None else None
            nargs = _literal(_keyword(call, "nargs"))
            if action_name in ("store_true", "store_false", "store_const", "count") or (
                    action is not None and action_name is None and nargs is None
                    and re.search(r"Store(True|False|Const)", ast.unparse(action))):
                kind = "store_true"
            elif action is not None and action_name is None:
                kind = "action"
            else:
                kind = "list" if nargs in ("+", "*") else "value"
            type_node = _keyword(call, "type")
            value_type = _call_name(type_node) if isinstance(type_node, ast.Name) else "str"
            choices = _literal(_keyword(call, "choices"))
            flags.append(Flag(dest, names, kind, None if kind == "store_true" else nargs,
                              value_type if value_type in ("int", "float") else "str",
                              bool(_literal(_keyword(call, "required"))),
                              tuple(choices) if isinstance(choices, (list, tuple)) else None, "manual"))
        return flags

    def cli_parser(self) -> argparse.ArgumentParser:
        """An argparse parser with SGLang's flags (their arity, value type, choices, required ones);
        abbreviations are refused, errors raise ValueError."""
        parser = _RaisingParser(prog=f"sglang {self.version} launch_server", add_help=False, allow_abbrev=False,
                                conflict_handler="resolve")
        done: set[int] = set()
        for flag in self.cli_flags.values():
            if id(flag) in done:
                continue
            done.add(id(flag))
            kwargs: dict[str, Any] = {"dest": flag.dest}
            if flag.kind == "store_true":
                kwargs["action"] = "store_true"
            elif flag.kind == "action":
                kwargs["nargs"] = "?"
            else:
                kwargs["type"] = {"int": int, "float": float}.get(flag.value_type, str)
                kwargs["nargs"] = "+" if flag.kind == "list" and flag.nargs is None else flag.nargs
                if flag.choices:
                    kwargs["choices"] = list(flag.choices)
                if flag.required:
                    kwargs["required"] = True
            parser.add_argument(*flag.names, **kwargs)
        return parser

    # (e) what /generate answers ------------------------------------------------------------------
    def _answer_files(self) -> list[str]:
        return [p for p in (TOKENIZER_MANAGER, DETOKENIZER_MANAGER) if self.has(p)]

    @functools.cached_property
    def meta_info_keys(self) -> frozenset[str]:
        """Keys the server writes into an answer's `meta_info`: `meta_info["k"] = ...`,
        `meta_info = {"k": ...}` and `meta_info.update({...} / k=...)`."""
        keys: set[str] = set()
        for path in self._answer_files():
            for node in ast.walk(self.tree(path)):
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
                for target in targets:
                    if (isinstance(target, ast.Subscript) and _call_name(target.value) == "meta_info"
                            and _const_str(target.slice) is not None):
                        keys.add(_const_str(target.slice))
                    if (isinstance(target, ast.Name) and target.id == "meta_info"
                            and isinstance(node.value, ast.Dict)):
                        keys.update(k for k in map(_const_str, node.value.keys) if k)
                if isinstance(node, ast.Call) and _call_name(node) in ("meta_info.update", "meta_info.setdefault"):
                    if node.func.attr == "setdefault" and node.args and _const_str(node.args[0]):
                        keys.add(_const_str(node.args[0]))
                    for arg in node.args:
                        if isinstance(arg, ast.Dict):
                            keys.update(k for k in map(_const_str, arg.keys) if k)
                    keys.update(kw.arg for kw in node.keywords if kw.arg)
        return frozenset(keys)

    @functools.cached_property
    def response_keys(self) -> frozenset[str]:
        """Top-level keys of the answers built next to a "meta_info" key (the /generate items)."""
        keys: set[str] = set()
        for path in self._answer_files():
            for node in ast.walk(self.tree(path)):
                if isinstance(node, ast.Dict):
                    names = [_const_str(k) for k in node.keys if k is not None]
                    if "meta_info" in names:
                        keys.update(n for n in names if n)
        return frozenset(keys)

    @functools.cached_property
    def finish_reasons(self) -> dict[str, frozenset[str]]:
        """The finish-reason classes' JSON (`to_json`) -> {class: keys}, with their "type" values in
        `finish_reason_types`."""
        out: dict[str, frozenset[str]] = {}
        for node in self.tree(SCHEDULE_BATCH).body:
            if isinstance(node, ast.ClassDef) and node.name.startswith(("FINISH", "FINISHED")):
                for fn in node.body:
                    if isinstance(fn, ast.FunctionDef) and fn.name == "to_json":
                        keys: set[str] = set()
                        for d in ast.walk(fn):
                            if isinstance(d, ast.Dict):
                                keys.update(k for k in map(_const_str, [k for k in d.keys if k]) if k)
                        out[node.name] = frozenset(keys)
        return out

    @functools.cached_property
    def finish_reason_types(self) -> frozenset[str]:
        types_: set[str] = set()
        for node in self.tree(SCHEDULE_BATCH).body:
            if isinstance(node, ast.ClassDef) and node.name.startswith(("FINISH", "FINISHED")):
                for d in ast.walk(node):
                    if isinstance(d, ast.Dict):
                        for k, v in zip(d.keys, d.values):
                            if k is not None and _const_str(k) == "type" and _const_str(v):
                                types_.add(_const_str(v))
        return frozenset(types_)

    def logprob_entry_order(self) -> tuple[str, ...]:
        """Where each element of an `output_token_logprobs` entry comes from, when the server does not
        decode text (our servers run --skip-tokenizer-init): e.g. ("token_logprobs_val",
        "token_logprobs_idx", "None") for `(logprob, token_id, None)`."""
        fn = next((n for n in ast.walk(self.tree(TOKENIZER_MANAGER))
                   if isinstance(n, ast.FunctionDef) and n.name == "detokenize_logprob_tokens"), None)
        if fn is None:
            raise SGLangSourceError(f"{TOKENIZER_MANAGER} has no detokenize_logprob_tokens")
        for comp in ast.walk(fn):
            if isinstance(comp, ast.ListComp) and isinstance(comp.elt, ast.Tuple) and comp.generators:
                gen = comp.generators[0]
                if (isinstance(gen.target, ast.Tuple) and isinstance(gen.iter, ast.Call)
                        and _call_name(gen.iter) == "zip"):
                    names = [t.id for t in gen.target.elts if isinstance(t, ast.Name)]
                    sources = [ast.unparse(a) for a in gen.iter.args]
                    order = []
                    for elt in comp.elt.elts:
                        if isinstance(elt, ast.Name) and elt.id in names:
                            order.append(sources[names.index(elt.id)])
                        else:
                            order.append(ast.unparse(elt))
                    return tuple(order)
        raise SGLangSourceError(f"{TOKENIZER_MANAGER}: cannot read the order of a log-prob entry")

    # server info --------------------------------------------------------------------------------
    def server_info_keys(self) -> tuple[frozenset[str], bool]:
        """(explicit keys of /server_info's answer, whether it spreads the server arguments into it)."""
        fn = next((n for n in ast.walk(self.tree(HTTP_SERVER)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and n.name == "server_info"), None)
        if fn is None:
            raise SGLangSourceError(f"{HTTP_SERVER} has no server_info handler")
        keys: set[str] = set()
        spreads_args = False
        for d in ast.walk(fn):
            if isinstance(d, ast.Dict):
                for k, v in zip(d.keys, d.values):
                    if k is None:
                        spreads_args |= "server_args" in ast.unparse(v)
                    elif _const_str(k):
                        keys.add(_const_str(k))
        return frozenset(keys), spreads_args

    # weight-update sessions ---------------------------------------------------------------------
    def session_guards(self) -> dict[str, str]:
        """Scheduler weight-updater methods refused outside a begin/end_weight_update session ->
        the refusal message."""
        if not self.has(SCHEDULER_WEIGHT_UPDATER):
            return {}
        out: dict[str, str] = {}
        for fn in ast.walk(self.tree(SCHEDULER_WEIGHT_UPDATER)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for stmt in fn.body:
                if (isinstance(stmt, ast.If) and "_session is None" in ast.unparse(stmt.test)
                        and any(isinstance(s, ast.Return) for s in stmt.body)):
                    texts = [n.value for s in stmt.body for n in ast.walk(s)
                             if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                    out[fn.name] = "".join(texts)
        return out

    def sampling_seed_needs_deterministic(self) -> bool | None:
        """True when the per-request sampling_seed reaches the sampler only under deterministic
        inference (an `... if enable_deterministic... else None` around it); None when not found."""
        if not self.has(SAMPLING_BATCH_INFO):
            return None
        for node in ast.walk(self.tree(SAMPLING_BATCH_INFO)):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == "sampling_seed" and isinstance(node.value, ast.IfExp)):
                return "deterministic" in ast.unparse(node.value.test)
        return None

    def weight_version_recorders(self) -> frozenset[str]:
        """Tokenizer-side methods that adopt an update request's `weight_version` (the value every later
        /generate answer reports in meta_info.weight_version)."""
        path = "sglang/srt/managers/tokenizer_control_mixin.py"
        if not self.has(path):
            path = TOKENIZER_MANAGER
        names = set()
        for fn in ast.walk(self.tree(path)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for call in ast.walk(fn):
                    if (isinstance(call, ast.Call) and _call_name(call).endswith("_update_weight_version_if_provided")
                            and call.args and ast.unparse(call.args[0]).endswith(".weight_version")):
                        names.add(fn.name)
        return frozenset(names)

    def constants(self, path: str) -> dict[str, Any]:
        """Top-level `NAME = <literal>` assignments of a module."""
        out: dict[str, Any] = {}
        for node in self.tree(path).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                value = _literal(node.value)
                if value is not None:
                    out[node.targets[0].id] = value
        return out

    def class_attribute(self, path: str, cls: str, name: str) -> Any:
        """The literal value of `cls.name = <literal>` in a module (None when absent or not a literal)."""
        node = next((n for n in self.tree(path).body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        for stmt in (node.body if node is not None else []):
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                return _literal(stmt.value)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                return _literal(stmt.value)
        return None

    def function_source(self, path: str, qualname: str) -> str | None:
        """The source of a function or "Class.method" of a module (None when absent)."""
        head, _, attr = qualname.partition(".")
        node = next((n for n in self.tree(path).body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == head), None)
        if node is not None and attr:
            node = next((n for n in getattr(node, "body", [])
                         if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == attr), None)
        return ast.get_source_segment(self.read(path), node) if node is not None else None

    # (f) the JSON contract of /generate (0.5.23 on) -------------------------------------------------
    @property
    def has_api_types(self) -> bool:
        return self.has(API_TYPES)

    def api_struct_fields(self, name: str) -> dict[str, Field]:
        return self.class_fields(API_TYPES, name)

    def api_rejects_unknown_keys(self, name: str) -> bool:
        """Whether `decode_<name>` refuses keys it does not know (else they are ignored)."""
        fn = next((n for n in self.tree(API_TYPES).body if isinstance(n, ast.FunctionDef)
                   and n.name == f"decode_{name}"), None)
        if fn is None:
            raise SGLangSourceError(f"{API_TYPES} has no decode_{name}")
        return any(isinstance(n, ast.Call) and _call_name(n) == "_unknown_field" for n in ast.walk(fn))

    @functools.cached_property
    def api_types_module(self) -> types.ModuleType | None:
        """sglang/api/v1/api_types.py run on its own (None when the wheel has none). It may import only
        __future__, typing and msgspec; msgspec.Struct is replaced by a keyword-only record."""
        if not self.has_api_types:
            return None
        tree = self.tree(API_TYPES)
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                if module.split(".")[0] not in ("__future__", "typing", "msgspec"):
                    raise SGLangSourceError(f"{self.where(API_TYPES)} imports {module}; refusing to run it")
        stub = types.ModuleType("msgspec")
        stub.Struct = _Struct  # type: ignore[attr-defined]
        real_import = builtins.__import__

        def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
            if name == "msgspec":
                return stub
            return real_import(name, globals, locals, fromlist, level)

        module = types.ModuleType(f"sglang_{self.version.replace('.', '_')}_api_types")
        module.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": guarded_import}
        exec(compile(self.read(API_TYPES), self.where(API_TYPES), "exec"), module.__dict__)
        return module

    def generate_contract_gate(self) -> bool:
        """Whether the /generate handler checks the raw JSON body with api_contract (else the body is
        only parsed into GenerateReqInput, which ignores unknown keys)."""
        route = self.route_for("POST", "/generate")
        if route is None:
            return False
        fn = next(n for n in ast.walk(self.tree(HTTP_SERVER))
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == route.handler)
        return any(isinstance(n, ast.Call) and _call_name(n) == "generate_contract_error" for n in ast.walk(fn))

    # symbols ------------------------------------------------------------------------------------
    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for candidate in (base + ".py", base + "/__init__.py"):
            if self.has(candidate):
                return candidate
        return None

    def module_names(self, module: str, _depth: int = 0) -> frozenset[str]:
        """Names a module defines or imports at top level (star imports followed)."""
        path = self.module_file(module)
        if path is None or _depth > 4:
            return frozenset()
        names: set[str] = set()
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]

        def scan(stmts: Sequence[ast.stmt]) -> None:
            for node in stmts:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
                elif isinstance(node, ast.Import):
                    names.update((a.asname or a.name).split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    source = _import_source(node, package)
                    for alias in node.names:
                        if alias.name == "*":
                            names.update(self.module_names(source, _depth + 1))
                        else:
                            names.add(alias.asname or alias.name)
                elif isinstance(node, ast.If):
                    scan(node.body)
                    scan(node.orelse)
                elif isinstance(node, ast.Try):
                    scan(node.body)
                    for handler in node.handlers:
                        scan(handler.body)
                    scan(node.orelse)

        scan(self.tree(path).body)
        return frozenset(names)

    def defines(self, module: str, name: str) -> bool:
        return name in self.module_names(module) or self.module_file(f"{module}.{name}") is not None

    def _definition(self, module: str, name: str, _depth: int = 0) -> tuple[str, ast.AST] | None:
        """(module, node) where `module.name` is defined, following `from x import name` re-exports."""
        path = self.module_file(module)
        if path is None or _depth > 5:
            return None
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        stars = []
        for node in self.tree(path).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return module, node
        for node in self.tree(path).body:
            if isinstance(node, ast.ImportFrom):
                source = _import_source(node, package)
                for alias in node.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        return self._definition(source, alias.name, _depth + 1)
        for source in stars:
            found = self._definition(source, name, _depth + 1)
            if found is not None:
                return found
        return None

    def parameters(self, module: str, qualname: str) -> tuple[tuple[str, ...], bool] | None:
        """(parameter names, accepts **kwargs) of `module.qualname`: a function, a class (its __init__,
        or its fields for a dataclass/struct), or "Class.method"; None when not found."""
        head, _, attr = qualname.partition(".")
        found = self._definition(module, head)
        if found is None:
            return None
        where, node = found
        if attr:
            if not isinstance(node, ast.ClassDef):
                return None
            node = next((n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                         and n.name == attr), None)
            if node is None:
                return None
        if isinstance(node, ast.ClassDef):
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            if init is None:
                path = self.module_file(where)
                return tuple(_class_fields(self.tree(path), node.name, path)), False
            node = init
        args = node.args
        names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        if names and names[0] in ("self", "cls"):
            names = names[1:]
        return tuple(names), args.kwarg is not None


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


class _Struct:
    """Stand-in for msgspec.Struct when running api_types.py: keyword-only fields with class defaults."""

    def __init_subclass__(cls, **options: Any) -> None:  # kw_only=True, frozen=True, ...
        super().__init_subclass__()

    def __init__(self, **values: Any) -> None:
        known: set[str] = set()
        for klass in type(self).__mro__:
            known.update(getattr(klass, "__annotations__", {}))
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}")
        for key, value in values.items():
            object.__setattr__(self, key, value)


def _field_flag(name: str, field: Field, annotation: ast.AST) -> Flag | None:
    """The flag `add_cli_args_from_dataclass` makes of one ServerArgs field (None: no flag)."""
    inner, metadata = _unwrap_annotated(annotation)
    arg: ast.Call | None = None
    has_help = False
    for meta in metadata:
        if isinstance(meta, ast.Call) and _call_name(meta).split(".")[-1] == "Arg":
            arg = meta
            break
        if isinstance(meta, (ast.Constant, ast.JoinedStr, ast.BinOp)) and not (
                isinstance(meta, ast.Constant) and not isinstance(meta.value, str)):
            has_help = True
            break
    if arg is None and not has_help:
        return None
    opt = (lambda key: _keyword(arg, key)) if arg is not None else (lambda key: None)
    if _literal(opt("no_cli")) is True:
        return None
    cli_name = _const_str(opt("cli_name")) if opt("cli_name") is not None else None
    cli_name = cli_name or "--" + name.replace("_", "-")
    aliases = _literal(opt("aliases")) or []
    names = (cli_name, *aliases)
    dest = name
    if opt("action") is not None:
        return Flag(dest, names, "action", None, "str", False, None, "field")
    inner, _ = _unwrap_optional(inner)
    type_parser = opt("type_parser")
    nargs = _literal(opt("nargs"))
    choices = _literal(opt("choices"))
    choices = tuple(choices) if isinstance(choices, (list, tuple)) else None

    def type_name(node: ast.AST) -> str:
        text = ast.unparse(node)
        return text if text in ("int", "float") and type_parser is None else "str"

    base = _call_name(inner.value).split(".")[-1] if isinstance(inner, ast.Subscript) else ""
    if base == "Literal":
        values = _literal(inner.slice)
        values = tuple(values) if isinstance(values, tuple) else (values,)
        kind_type = {int: "int", float: "float"}.get(type(values[0]), "str") if values else "str"
        return Flag(dest, names, "value", None, kind_type if type_parser is None else "str", False,
                    choices or values, "field")
    if base in ("List", "list") and type_parser is None:
        elem = inner.slice.elts[0] if isinstance(inner.slice, ast.Tuple) else inner.slice
        return Flag(dest, names, "list", nargs or "+", type_name(elem), False, choices, "field")
    if ast.unparse(inner) == "bool":
        return Flag(dest, names, "store_true", None, "str", False, None, "field")
    required_kw = _literal(opt("required"))
    required = required_kw is True or (required_kw is None and field.required)
    return Flag(dest, names, "value", nargs, type_name(inner), required, choices, "field")


# -- values against annotations -------------------------------------------------------------------

def value_matches(annotation: str, value: Any) -> bool | None:
    """Whether a JSON `value` fits the annotation source (`Optional[int]`, `List[List[int]]`,
    `Literal["a"]`, `Annotated[List[bytes], Base64Bytes()]`...): True, False, or None when the
    annotation names a type this check does not know (a class, an alias)."""
    try:
        node = ast.parse(annotation, mode="eval").body
    except SyntaxError:
        return None
    return _matches(node, value, b64=False)


def _all(results: Iterable[bool | None]) -> bool | None:
    out: bool | None = True
    for r in results:
        if r is False:
            return False
        if r is None:
            out = None
    return out


def _any(results: Iterable[bool | None]) -> bool | None:
    unknown = False
    for r in results:
        if r is True:
            return True
        if r is None:
            unknown = True
    return None if unknown else False


def _matches(node: ast.AST, value: Any, b64: bool) -> bool | None:
    if isinstance(node, ast.Constant):
        if node.value is None:
            return value is None
        if isinstance(node.value, str):  # a forward reference
            try:
                return _matches(ast.parse(node.value, mode="eval").body, value, b64)
            except SyntaxError:
                return None
        return None
    members = _union_members(node)
    if members is not None:
        return _any(_matches(m, value, b64) for m in members)
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = _call_name(node).split(".")[-1]
        simple = {
            "str": lambda v: isinstance(v, str),
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
            "dict": lambda v: isinstance(v, dict), "Dict": lambda v: isinstance(v, dict),
            "list": lambda v: isinstance(v, list), "List": lambda v: isinstance(v, list),
            "Any": lambda v: True, "object": lambda v: True,
        }
        if name == "bytes":
            return _is_base64(value) if b64 else isinstance(value, (bytes, bytearray))
        if name in simple:
            return simple[name](value)
        return None
    if isinstance(node, ast.Subscript):
        base = _call_name(node.value).split(".")[-1]
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Optional":
            return True if value is None else _matches(args[0], value, b64)
        if base in ("Annotated", "A"):
            marker = any(isinstance(a, ast.Call) and _call_name(a).split(".")[-1] == "Base64Bytes" for a in args[1:])
            return _matches(args[0], value, b64 or marker)
        if base == "Literal":
            allowed = _literal(node.slice)
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            return any(value == a and type(value) is type(a) for a in allowed)
        if base in ("List", "list", "Sequence", "Set", "set", "FrozenSet", "frozenset", "Tuple", "tuple"):
            if not isinstance(value, list):  # JSON arrays (sets and tuples travel as arrays too)
                return False
            variadic = len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis
            if base in ("Tuple", "tuple") and not variadic:  # Tuple[int, str]: fixed positions
                return len(args) == len(value) and _all(_matches(a, v, b64) for a, v in zip(args, value))
            return _all(_matches(args[0], v, b64) for v in value)
        if base in ("Dict", "dict", "Mapping"):
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                return False  # JSON object keys are strings
            return _all(_matches(args[1], v, b64) for v in value.values()) if len(args) == 2 else True
        return None
    return None


def _is_base64(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        base64.b64decode(value, validate=True)
        return True
    except (binascii.Error, ValueError):
        return False
