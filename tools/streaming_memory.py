"""Peak memory of `prepare-data` and of training on token shards, at corpus sizes below and above the memory
the run is given: streaming means the peak does not follow the corpus.

    python tools/streaming_memory.py --sizes-mib 64 3072 --limit-gib 2 --steps 20 --out /tmp/streaming

For each size: a text corpus of that many MiB is generated (the standard library's sources, repeated with a
counter so no two copies are equal), tokenized by `sparsemoe prepare-data` (bytes: uint16 shards, twice the
text's size), and the demo model trains --steps steps on the shards. Each step runs in its own process under
an address-space limit (RLIMIT_AS) of --limit-gib; its peak resident memory (ru_maxrss) is reported. Prints
a markdown table and writes it, with the raw numbers, to OUT/streaming_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys
from sparsemoe.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_corpus(path: Path, size: int) -> None:
    """A text file of `size` bytes: the standard library's sources, repeated, each copy prefixed by its number."""
    from sparsemoe.train.data import iter_documents

    docs = [data for _, data in iter_documents(None)]
    written, copy = 0, 0
    with open(path, "wb") as fh:
        while written < size:
            for data in docs:
                chunk = f"# copy {copy}\n".encode() + data
                chunk = chunk[: size - written]
                fh.write(chunk)
                written += len(chunk)
                if written >= size:
                    break
            copy += 1


def limited_run(args: list[str], limit: int) -> dict:
    """`sparsemoe ARGS` in a child process under RLIMIT_AS=limit: its status, peak RSS and wall time."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    if proc.returncode != 0:
        raise SystemExit(f"sparsemoe {' '.join(args)} failed under the limit:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 3072], help="corpus sizes, MiB of text")
    p.add_argument("--limit-gib", type=float, default=2.0, help="address-space limit of each process (GiB)")
    p.add_argument("--steps", type=int, default=20, help="training steps of the demo model")
    p.add_argument("--out", default="runs/streaming-memory", help="work and report folder")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora and shards")
    args = p.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limit = int(args.limit_gib * 2**30)
    rows = []
    for mib in args.sizes_mib:
        work = out / f"corpus-{mib}mib"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        text = work / "corpus.txt"
        write_corpus(text, mib * 2**20)
        shards = work / "shards"
        prep = limited_run(["prepare-data", str(text), str(shards)], limit)
        shard_bytes = sum(f.stat().st_size for f in shards.glob("*.bin"))
        train = limited_run(
            ["train", "--run-dir", str(work / "run"), "--data", str(shards), "--max-steps", str(args.steps),
             "--eval-interval", str(args.steps), "--no-progress"],
            limit,
        )  # fmt: skip
        rows.append({"text_mib": mib, "shard_mib": shard_bytes / 2**20, "prepare": prep, "train": train})
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(work)
    lines = [
        f"Address-space limit per process: {args.limit_gib:g} GiB; demo model, {args.steps} steps; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| corpus (text) | token shards | prepare-data peak RSS | prepare-data time | training peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['text_mib']:,} MiB | {r['shard_mib']:,.0f} MiB | {r['prepare']['maxrss_mib']:.0f} MiB | "
            f"{r['prepare']['seconds']:.0f} s | {r['train']['maxrss_mib']:.0f} MiB |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "streaming_memory.md").write_text(table + "\n", encoding="utf-8")
    (out / "streaming_memory.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
