"""The bookkeeping of `tools/gpu_check.sh`: which wheels a GPU machine needs, one record per step, and the
final JSON (`gpu_check.json`) with the short table printed last. Standard library only (it runs before
anything is installed); the `env` command alone imports torch.

    python -m tests.gpu.check_report wheels DIR          # the wheels found / missing, as JSON
    python -m tests.gpu.check_report wheels DIR --names  # the packages to install, one a line
    python -m tests.gpu.check_report unpack DIR SITE NAME...   # without pip: the wheels extracted into SITE
    python -m tests.gpu.check_report env                 # python, torch, CUDA, GPU, importable modules
    python -m tests.gpu.check_report env-note env.json   # one line about it; exit status 4 without CUDA
    python -m tests.gpu.check_report step OUT --name NAME --status ok --rc 0 --seconds 12.3 --budget 60 \\
        --log logs/NAME.log [--result bench.json] -- the command line
    python -m tests.gpu.check_report summarize OUT --mode full|quick|dry   # writes OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

STEPS_FILE = "steps.jsonl"
RESULT_FILE = "gpu_check.json"
TESTS_XML = "gpu_tests.xml"
REPORTS_DIR = "reports"

# Wheel file-name prefixes (PEP 427 normalises '-' to '_'), by what needs them.
WHEELS = {
    # megatron-core, and the configuration loader; antlr4 for latex2sympy2_extended (omegaconf 2.4 no
    # longer needs it; older omegaconf releases do)
    "required": {"megatron-core": "megatron_core", "omegaconf": "omegaconf",
                 "antlr4-python3-runtime": "antlr4_python3_runtime"},
    # the trainer imports liteppo_mcore.rewards, which imports math_verify at module level
    "trainer": {"math-verify": "math_verify", "latex2sympy2_extended": "latex2sympy2_extended"},
    # megatron-core uses psutil in a few places (dist-checkpointing's async writer, its dynamic engine)
    "optional": {"psutil": "psutil"},
}
# Modules a GPU check imports, and what each is for.
MODULES = {"torch": "everything", "megatron.core": "models, optimizer, checkpoints", "omegaconf": "configuration",
           "transformers": "the hf engine", "safetensors": "weights", "yaml": "configuration",
           "tokenizers": "the built-in tokenizer", "tqdm": "the trainer's progress bar",
           "math_verify": "the trainer (liteppo_mcore.rewards)", "psutil": "megatron-core, some paths",
           "pytest": "the tests"}


# ------------------------------------------------------------------------------------------ wheels, env
def find_wheels(folder: str) -> dict[str, dict[str, str | None]]:
    """{group: {package: wheel file name or None}} for the wheels in `folder`."""
    files = (sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.whl")))
             if os.path.isdir(folder) else [])
    out: dict[str, dict[str, str | None]] = {}
    for group, packages in WHEELS.items():
        out[group] = {}
        for package, prefix in packages.items():
            match = [f for f in files if f.lower().startswith(prefix.lower() + "-")]
            out[group][package] = match[-1] if match else None
    return out


def unpack_wheels(folder: str, site: str, names: list[str]) -> list[str]:
    """Where pip is missing: extract the wheels of `names` from `folder` into `site` (a wheel is a zip of
    its files; scripts and metadata hooks are not run). Returns the wheel files used."""
    import zipfile

    found = find_wheels(folder)
    os.makedirs(site, exist_ok=True)
    used = []
    for group in found.values():
        for name, wheel in group.items():
            if wheel and name in names:
                with zipfile.ZipFile(os.path.join(folder, wheel)) as z:
                    z.extractall(site)
                used.append(wheel)
    return used


def missing_wheels(found: dict[str, dict[str, str | None]]) -> list[str]:
    """Packages without a wheel that a full check needs (required ones and the trainer's)."""
    return [name for group in ("required", "trainer") for name, wheel in found[group].items() if not wheel]


def env_note(info: dict[str, Any]) -> str:
    lacks = [m for m, ok in info.get("modules", {}).items() if not ok]
    note = (f"python {info.get('python')}, torch {info.get('torch')}, cuda {info.get('cuda_version')}, "
            f"gpu {info.get('gpu')}")
    if info.get("torch_error"):
        note += f"; torch: {info['torch_error']}"
    return note + (f"; missing modules: {' '.join(lacks)}" if lacks else "")


def environment() -> dict[str, Any]:
    """What this Python has: versions, CUDA, the GPU, and which modules import."""
    import importlib.util
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    modules = {}
    for name in MODULES:
        try:
            modules[name] = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            modules[name] = False
    info["modules"] = modules
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        info["cuda_version"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name() if info["cuda"] else None
        info["gpu_count"] = torch.cuda.device_count() if info["cuda"] else 0
    except Exception as err:  # a broken torch is a finding, not a crash of the report
        info["torch_error"] = f"{type(err).__name__}: {err}"
    return info


# ------------------------------------------------------------------------------------------ steps
def add_step(out: str, record: dict[str, Any]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, STEPS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_steps(out: str) -> list[dict[str, Any]]:
    path = os.path.join(out, STEPS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load(path: str | None) -> Any | None:
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ summaries
def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if isinstance(x, (int, float)) else "-"


def summarize_train_step(result: dict[str, Any]) -> dict[str, Any]:
    rows = result.get("rows", [])
    table = [{k: r.get(k) for k in ("case", "median_s", "tokens_per_s", "tflops", "mfu", "peak_bytes",
                                    "ratio_tokens_per_s", "ratio_peak_memory")} for r in rows]
    seq = result.get("seq_len") or 1

    def label(r: dict[str, Any]) -> str:
        base = f"mb{r['micro_batch']}" if r.get("micro_batch") else f"<={(r.get('max_tokens') or 0) // seq}seq"
        return base + ("+offload/" + base if r.get("kind") == "ours + offload" else "")

    parts = [f"{label(r)} {_ratio(r.get('ratio_tokens_per_s'))}" for r in rows if r.get("kind", "").startswith("ours")]
    best = max((r.get("mfu") or 0 for r in rows), default=0)
    return {"rows": table, "headline": f"ours/stock tokens/s: {', '.join(parts)}; best MFU {100 * best:.0f}%"}


def summarize_logprob(result: dict[str, Any]) -> dict[str, Any]:
    rows = result.get("rows", [])
    table = [{k: r.get(k) for k in ("version", "median_ms", "time_ratio_vs_naive", "extra_peak_bytes")} for r in rows]
    ours = [r for r in rows if r.get("version", "").startswith("ours")]
    best = min(ours, key=lambda r: r["median_ms"]) if ours else None
    floor = result.get("memory_floor_ms")
    head = (f"best ours {best['median_ms']:.1f} ms ({_ratio(best.get('time_ratio_vs_naive'))} of naive "
            f"{rows[0]['median_ms']:.1f} ms)" if best and rows else "no rows")
    if floor:
        head += f"; memory floor {floor:.1f} ms"
    return {"rows": table, "headline": head}


def summarize_rollout(result: dict[str, Any]) -> dict[str, Any]:
    rows = result.get("rows", [])
    table = [{k: r.get(k) for k in ("engine", "batch", "median_s", "tokens_per_s", "ratio_vs_transformers", "error")}
             for r in rows]
    parts = []
    for r in rows:
        if r.get("engine", "").startswith("ours"):
            parts.append(f"b{r['batch']}: " + (f"{r['tokens_per_s']:,.0f} tok/s "
                                               f"({_ratio(r.get('ratio_vs_transformers'))})"
                                               if "tokens_per_s" in r else "failed"))
    errors = [f"{r.get('engine')} @ {r.get('batch')}: {r['error'][:200]}" for r in rows if "error" in r]
    head = "fast engine " + "; ".join(parts) + (f"; {len(errors)} rows failed" if errors else "")
    return {"rows": table, "headline": head, "problems": errors}


def summarize_weight_sync(result: dict[str, Any]) -> dict[str, Any]:
    rows = result.get("rows", [])
    table = [{k: r.get(k) for k in ("case", "median_s", "gb_per_s", "time_vs_state_dict_copy",
                                    "cuda_peak_extra_bytes")} for r in rows]
    loads = [r for r in rows if r.get("kind") == "export + hf load"]
    best = min(loads, key=lambda r: r["median_s"]) if loads else None
    head = (f"export + hf load best {best['median_s'] * 1e3:.1f} ms ({best['gb_per_s']:.3g} GB/s, "
            f"{best['time_vs_state_dict_copy']:.1f}x the state_dict copy; target {result.get('target_s')} s)"
            if best else "no rows")
    return {"rows": table, "headline": head}


SUMMARIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "bench_train_step": summarize_train_step, "bench_logprob": summarize_logprob,
    "bench_rollout": summarize_rollout, "bench_weight_sync": summarize_weight_sync}


def summarize_tests(out: str) -> dict[str, Any]:
    """Counts and failures from the junit XML, and the tests' own reports (reports/*.json)."""
    summary: dict[str, Any] = {}
    path = os.path.join(out, TESTS_XML)
    if os.path.exists(path):
        try:
            root = ET.parse(path).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                      if case.find("failure") is not None or case.find("error") is not None]
            counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            summary.update(counts=counts, failed=failed)
        except ET.ParseError as err:
            summary["xml_error"] = str(err)
    reports = {}
    for report in sorted(glob.glob(os.path.join(out, REPORTS_DIR, "*.json"))):
        reports[os.path.splitext(os.path.basename(report))[0]] = _load(report)
    summary["reports"] = reports
    head = []
    if "counts" in summary:
        c = summary["counts"]
        head.append(f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped")
    syncs = reports.get("host_syncs")
    if isinstance(syncs, dict):
        head.append(f"host syncs/step {syncs.get('total')}")
    diffs = [v for k, r in reports.items() if k.startswith("trainer_") and isinstance(r, dict)
             for v in r.get("logprob_abs_diff", []) if isinstance(v, (int, float))]
    if diffs:
        head.append(f"max logprob_abs_diff {max(diffs):.1e}")
    summary["headline"] = "; ".join(head)
    return summary


_ARG_KEYS = ("size", "dtype", "warmup", "repeats", "micro_batches", "offload_row", "buckets_mib", "batches",
             "new_tokens", "skip_megatron")


def dry_check(out: str, step: dict[str, Any]) -> str:
    """What a dry step checked, from its log: the tests collected, or a benchmark's resolved arguments
    (also kept in the step as `args`)."""
    if not step.get("log"):
        return step.get("note", "")
    try:
        with open(os.path.join(out, step["log"]), encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return step.get("note", "")
    if step["name"] == "tests":
        found = [line for line in lines if re.search(r"\b\d+ tests? collected|no tests collected", line)]
        return found[-1] if found else (lines[-1] if lines else "")
    try:
        args = json.loads(lines[-1]) if lines else None
    except ValueError:
        args = None
    if not isinstance(args, dict):
        return step.get("note", "")
    step["args"] = args
    return "arguments accepted: " + ", ".join(f"{k} {args[k]}" for k in _ARG_KEYS if k in args)


def summarize(out: str, mode: str, extra: dict[str, Any]) -> dict[str, Any]:
    steps = read_steps(out)
    for step in steps:
        if step["status"] == "dry":
            step["headline"] = "dry run: " + (dry_check(out, step) or "checked")
            continue
        if step["name"] == "tests":
            step["summary"] = summarize_tests(out)
        elif step["name"] in SUMMARIES:
            result = _load(os.path.join(out, step["result"])) if step.get("result") else None
            if result is not None:
                try:
                    step["summary"] = SUMMARIES[step["name"]](result)
                except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
                    step["summary"] = {"headline": f"unreadable result: {type(err).__name__}: {err}"}
        problems = (step.get("summary") or {}).get("problems")
        if problems and step["status"] == "ok":  # it ran, but some of its figures are missing
            step["status"], step["note"] = "failed", f"{len(problems)} rows failed: {problems[0]}"
        step.setdefault("headline", (step.get("summary") or {}).get("headline") or step.get("note", ""))
    ok = {"ok", "dry"}
    result = {"mode": mode, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "passed": bool(steps) and all(s["status"] in ok for s in steps),
              "seconds": round(sum(s.get("seconds", 0.0) for s in steps), 1), "steps": steps, **extra}
    with open(os.path.join(out, RESULT_FILE), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    return result


def print_table(result: dict[str, Any], out: str) -> None:
    print(f"\ngpu check ({result['mode']}) | {'PASSED' if result['passed'] else 'FAILED'} | "
          f"{result['seconds']:.0f} s | {os.path.join(out, RESULT_FILE)}")
    print(f"{'step':<18} {'status':<8} {'seconds':>8} {'budget':>7}  result")
    for s in result["steps"]:
        print(f"{s['name']:<18} {s['status']:<8} {s.get('seconds', 0):>8.1f} {s.get('budget', 0):>7}  "
              f"{str(s.get('headline', ''))[:150]}")


# ------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command_line: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command_line = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m tests.gpu.check_report", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels")
    wheels.add_argument("folder")
    wheels.add_argument("--names", action="store_true", help="the packages found, one a line")
    unpack = sub.add_parser("unpack")
    unpack.add_argument("folder")
    unpack.add_argument("site")
    unpack.add_argument("names", nargs="+")
    sub.add_parser("env")
    note = sub.add_parser("env-note")
    note.add_argument("file")
    step = sub.add_parser("step")
    step.add_argument("out")
    step.add_argument("--name", required=True)
    step.add_argument("--status", required=True, choices=["ok", "failed", "timeout", "skipped", "dry"])
    step.add_argument("--rc", type=int, default=0)
    step.add_argument("--seconds", type=float, default=0.0)
    step.add_argument("--budget", type=int, default=0)
    step.add_argument("--log", default=None)
    step.add_argument("--result", default=None)
    step.add_argument("--note", default="")
    summ = sub.add_parser("summarize")
    summ.add_argument("out")
    summ.add_argument("--mode", required=True, choices=["full", "quick", "dry"])
    summ.add_argument("--extra", default=None, help="a JSON file merged into the result (machine, wheels)")
    args = parser.parse_args(argv)

    if args.command == "wheels":
        found = find_wheels(args.folder)
        if args.names:
            print("\n".join(name for group in found.values() for name, wheel in group.items() if wheel))
        else:
            print(json.dumps({"folder": os.path.abspath(args.folder), **found,
                              "missing": missing_wheels(found)}))
        return 0 if all(found["required"].values()) else 2
    if args.command == "unpack":
        print("\n".join(unpack_wheels(args.folder, args.site, args.names)))
        return 0
    if args.command == "env":
        print(json.dumps(environment()))
        return 0
    if args.command == "env-note":
        info = _load(args.file)
        if not isinstance(info, dict):
            print(f"unreadable {args.file}")
            return 3
        print(env_note(info))
        return 0 if info.get("cuda") else 4
    if args.command == "step":
        add_step(args.out, {"name": args.name, "status": args.status, "rc": args.rc,
                            "seconds": round(args.seconds, 1), "budget": args.budget, "log": args.log,
                            "result": args.result, "note": args.note, "command": command_line})
        return 0
    extra = _load(args.extra) or {}
    result = summarize(args.out, args.mode, extra)
    print_table(result, args.out)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
