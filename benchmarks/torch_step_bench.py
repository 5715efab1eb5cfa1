"""The release's whole pre-training step in PyTorch, as a yardstick for train_bench.py.

    python benchmarks/torch_step_bench.py --batch 128            # a GPU: autocast float16, channels-last
    python benchmarks/torch_step_bench.py --batch 2 --repeats 2  # a CPU dry run (float32)

For configs/r50.py and configs/convnext.py:size=s: the PyTorch reference model of
references/torch_modules.py (the release's backbone, expander, local projector and online
classifier, one forward pass per view), the criterion (torch_vicregl_loss: the global and
local terms of the VICRegL criterion, checked against references/loss.py), the online
classifier's cross-entropy, and the optimiser (LARS for ResNet-50, AdamW with weight decay on
2+ dim parameters for ConvNeXt), on synthetic views of the config's crops and location grids.
On CUDA as the release trains: torch.autocast float16 with a GradScaler, channels-last
memory format; drop path 0.1 for ConvNeXt. Columns: step time (median after warm-up),
images/s, the allocator's peak (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from common import ROOT, median_seconds, print_table

from references.torch_modules import TORCH_BACKBONES, TorchConvNeXt, TorchLARS, TorchVICRegL, torch_vicregl_loss
from vicregl_jax import config_files
from vicregl_jax.data import location_grid

CONFIGS = {"r50": "configs/r50.py", "convnext_s": "configs/convnext.py:size=s"}
DIMS = {"resnet50": (2048, "batch"), "convnext_small": (768, "layer")}


def make_model(config) -> torch.nn.Module:
    arch = config.model.arch
    if arch.startswith("convnext"):
        backbone = TorchConvNeXt((3, 3, 27, 3), (96, 192, 384, 768), drop_path_rate=config.model.drop_path_rate or 0.1)
    else:
        backbone = TORCH_BACKBONES[arch]()
    dim, norm = DIMS[arch]
    return TorchVICRegL(
        backbone, dim, norm, config.model.mlp, config.model.maps_mlp, config.loss.alpha, config.model.num_classes
    )


def make_optimizer(model, config, lr: float):
    if config.optim.name == "lars":
        return TorchLARS(model.parameters(), lr=lr, weight_decay=config.optim.weight_decay)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )


def synthetic_views(config, batch: int, device, channels_last: bool, seed: int = 0):
    """Returns (views NCHW per view, grids (B, N, 2) per view, labels) of the config's crops."""
    rng = np.random.default_rng(seed)
    views, grids = [], []
    for size, count, lo, hi in config.data.crops:
        for _ in range(count):
            x = torch.from_numpy(rng.normal(size=(batch, 3, size, size)).astype(np.float32)).to(device)
            views.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
            side = np.sqrt(rng.uniform(lo, hi, size=batch)) * 400
            top, left = rng.uniform(0, 100, size=(2, batch))
            grid = location_grid(top, left, side, side, size // 32).reshape(batch, -1, 2)
            grids.append(torch.from_numpy(np.ascontiguousarray(grid, np.float32)).to(device))
    labels = torch.from_numpy(rng.integers(0, config.model.num_classes, size=batch)).to(device)
    return views, grids, labels


def bench(name: str, batch: int, repeats: int) -> dict:
    config = config_files.load(os.path.join(ROOT, CONFIGS[name]))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = make_model(config).to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config, lr=config.optim.base_lr * batch / 256)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    views, grids, labels = synthetic_views(config, batch, device, cuda)
    nm = tuple(config.loss.num_matches)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            out = model(views)
            loss, _ = torch_vicregl_loss(
                out["embeddings"],
                out["local_embeddings"],
                grids,
                alpha=config.loss.alpha,
                num_matches=nm,
                l2_all_matches=config.loss.l2_all_matches,
            )
            loss = loss + torch.nn.functional.cross_entropy(out["logits"].float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if cuda:
            torch.cuda.synchronize()

    step()  # first step: cuDNN autotuning, allocator warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, repeats)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    crops = " + ".join(f"{n} x {s}" for s, n, _, _ in config.data.crops)
    return {
        "config": CONFIGS[name],
        "crops": crops,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": "autocast float16, channels-last" if cuda else "float32",
        "batch": batch,
        "step": f"{seconds * 1e3:.0f} ms",
        "images/s": f"{batch / seconds:.1f}",
        "peak memory": "n/a" if peak is None else f"{peak / 2**30:.2f} GiB",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="r50,convnext_s")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.configs.split(","):
        rows.append(bench(name, args.batch, args.repeats))
        print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)  # in case a later one fails
    print_table(rows)


if __name__ == "__main__":
    main()
