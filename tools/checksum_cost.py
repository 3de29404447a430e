"""What checkpoint checksums cost: one checkpoint of a preset (model and an AdamW state of the same size),
timed as saved (the SHA-256 of its files included and alone) and as verified on load.

    python tools/checksum_cost.py                  # the largest trainable preset, gpu (983 M parameters)
    python tools/checksum_cost.py --preset tiny --dir /tmp/x

The weights are zeros (their values do not change what hashing costs); the files go to --dir (default: a
temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sparsemoe.model import empty_model, preset
from sparsemoe.train import checkpoint as ckpt


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpu", help="model preset (default gpu, the largest trainable one)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="checksum-cost-"))
    try:
        model = empty_model(preset(args.preset), torch.float32, "cpu")
        state = {k: v.zero_() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        optimizer = {
            "state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for i, p in enumerate(params)},  # fmt: skip
            "param_groups": [{"params": list(range(len(params))), "lr": 1e-3}],
        }
        hashed = {"seconds": 0.0}
        real_write = ckpt.write_checksums

        def timed_write(folder, names):
            start = time.perf_counter()
            real_write(folder, names)
            hashed["seconds"] = time.perf_counter() - start

        ckpt.write_checksums = timed_write
        start = time.perf_counter()
        folder = ckpt.save_checkpoint(root / "checkpoints", 1, state, optimizer, {"model_config": {}})
        save = time.perf_counter() - start
        ckpt.write_checksums = real_write
        sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
        total = sum(sizes.values())
        start = time.perf_counter()
        ckpt.load_meta(folder)  # trainer.json's checksum, then both tensor files at once, as a resume does
        ckpt.verify_files(folder, (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE), ckpt.read_checksums(folder))
        verify = time.perf_counter() - start
        print(f"preset {args.preset}: {sum(p.numel() for p in params) / 1e6:.3g} M parameters; checkpoint "
              f"{_size(total)} ({', '.join(f'{n} {_size(s)}' for n, s in sorted(sizes.items()))})")
        print(f"save {save:.2f} s, of which checksums {hashed['seconds']:.2f} s ({hashed['seconds'] / save:.0%}); "
              f"verify on resume (all three files) {verify:.2f} s ({total / verify / 1e9:.2f} GB/s); "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
