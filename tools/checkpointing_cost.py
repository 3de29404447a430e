"""Peak memory and time of one training step of a preset model, with and without activation checkpointing.

    python tools/checkpointing_cost.py                    # the demo preset at its training batch (16 x 256)
    python tools/checkpointing_cost.py --preset tiny --batch-size 8 --seq-len 64

Peak memory: bytes allocated during the step (forward, backward, gradients), from torch.profiler's allocation
events on the CPU or the allocator's statistics on a GPU. Time: the best of --repeats steps, the two settings
alternated (twice each) so that a change in the machine's load shows as a spread.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsemoe.bench.measure import peak_memory_bytes
from sparsemoe.model import MoETransformer, preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = preset(args.preset, bias_update="step")
    model = MoETransformer(config).train()
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))

    def step() -> None:
        out = model(ids[:, :-1], targets=ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        model.zero_grad(set_to_none=True)

    print(f"{args.preset} preset, batch {args.batch_size} x {args.seq_len}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| activation checkpointing | peak MiB | step ms |\n|---|---|---|")
    for enabled in (False, True, False, True):
        model.set_activation_checkpointing(enabled)
        step()  # warm up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        peak = peak_memory_bytes(step) / 2**20
        print(f"| {'on' if enabled else 'off'} | {peak:.1f} | {best * 1e3:.0f} |")


if __name__ == "__main__":
    main()
