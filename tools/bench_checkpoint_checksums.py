"""Benchmark: what the checkpoint checksums (checkpoint/manifest.py) cost next to writing the files.

A folder of `--files` tensor files of `--mb` MB each in total is written with torch.save (the
baseline: what a save writes anyway, through the page cache), then hashed into its checksums.json
(`write_manifest`, at save) and checked (`verify`, at load). One process: on a cluster each rank
hashes its own share, so the per-rank cost is this one with its share's size. Reports the median
seconds of each over `--repeats` runs, the hashing rate, and the ratio to the write.

    python tools/bench_checkpoint_checksums.py --mb 512 --out bench_checksums.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.utils.bench import emit  # noqa: E402


def _write(folder: str, mb: int, files: int) -> None:
    import torch

    per_file = max(1, (mb << 20) // files // 4)
    for i in range(files):
        torch.save({"shard": torch.randn(per_file)}, os.path.join(folder, f"__0_{i}.distcp"))
        os.sync()


def measure(mb: int, files: int, repeats: int, where: str) -> dict:
    from liteppo_mcore.checkpoint import manifest as M

    times = {"write": [], "write_manifest": [], "verify": []}
    for _ in range(repeats):
        folder = tempfile.mkdtemp(prefix="bench-ckpt-", dir=where)
        try:
            begin = time.perf_counter()
            _write(folder, mb, files)
            times["write"].append(time.perf_counter() - begin)
            begin = time.perf_counter()
            M.write_manifest(folder)
            times["write_manifest"].append(time.perf_counter() - begin)
            begin = time.perf_counter()
            problems, _ = M.verify(folder)
            times["verify"].append(time.perf_counter() - begin)
            assert problems == [], problems
            size = M.folder_bytes(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"bytes": size, "files": files, "repeats": repeats, "seconds": med,
            "hash_mb_per_s": size / 2**20 / med["write_manifest"],
            "ratios": {"write_manifest/write": med["write_manifest"] / med["write"],
                       "verify/write": med["verify"] / med["write"]}}


def print_table(result: dict) -> None:
    s, r = result["seconds"], result["ratios"]
    print(f"checkpoint checksums: {result['bytes'] / 2**20:.0f} MB in {result['files']} files, "
          f"median of {result['repeats']}")
    print(f"{'step':<16}{'seconds':>10}{'x write':>10}")
    print(f"{'write (baseline)':<16}{s['write']:>10.3f}{1.0:>10.2f}")
    print(f"{'write_manifest':<16}{s['write_manifest']:>10.3f}{r['write_manifest/write']:>10.2f}")
    print(f"{'verify':<16}{s['verify']:>10.3f}{r['verify/write']:>10.2f}")
    print(f"hashing: {result['hash_mb_per_s']:.0f} MB/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="total size of the files (MB)")
    parser.add_argument("--files", type=int, default=4, help="how many files")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs")
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temporary folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    emit(measure(args.mb, args.files, args.repeats, args.dir or tempfile.gettempdir()), args.out, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
