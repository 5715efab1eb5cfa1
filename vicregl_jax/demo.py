"""The quick start: pre-train, evaluate beside random initialisation, draw, export, summarise.

    python main.py --config=configs/demo.py --workdir=runs/demo

Everything runs offline on the datasets embedded in the package. The run resumes where it
stopped (pre-training from its checkpoint; the evaluations are cheap and run again).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from vicregl_jax import build, convert, release, train, viz
from vicregl_jax import data as data_lib
from vicregl_jax.data.embedded import natural_photos
from vicregl_jax.evaluate import common, correspond, knn, linear

PICTURE_SIZE = 448  # 14 x 14 locations for a stride-32 backbone


def _normalise(images: np.ndarray) -> np.ndarray:
    """Returns uint8 RGB images normalised as the pre-training views are, float32."""
    x = (images / 255.0 - np.asarray(data_lib.IMAGENET_MEAN)) / np.asarray(data_lib.IMAGENET_STD)
    return x.astype(np.float32)


def _photo_batch(num: int = 3) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Returns names, uint8 (num, S, S, 3) and normalised float (num, S, S, 3) centre crops of embedded photos."""
    names, raw = [], []
    for name, image in natural_photos()[:num]:
        image = Image.fromarray(np.asarray(image)).convert("RGB")
        scale = PICTURE_SIZE / min(image.size)
        image = image.resize(
            (max(PICTURE_SIZE, round(image.width * scale)), max(PICTURE_SIZE, round(image.height * scale))),
            Image.BICUBIC,
        )
        left, top = (image.width - PICTURE_SIZE) // 2, (image.height - PICTURE_SIZE) // 2
        raw.append(np.asarray(image.crop((left, top, left + PICTURE_SIZE, top + PICTURE_SIZE))))
        names.append(name)
    raw = np.stack(raw)
    return names, raw, _normalise(raw)


def draw_pictures(config, workdir: str, backbones: dict) -> list[str]:
    """Writes pca.png (PCA colours of local features, each backbone) and one correspondence
    picture per backbone; returns the paths."""
    names, raw, images = _photo_batch()
    rows = []
    for label, backbone in backbones.items():
        maps, _ = backbone(jnp.asarray(images))
        n = int(round(maps.shape[1] ** 0.5))
        for name, image, m in zip(names, raw, np.asarray(maps)):
            rows.append((f"{name}: {label}", image, m.reshape(n, n, -1)))
    paths = [os.path.join(workdir, "pca.png")]
    viz.save_pca_picture(paths[0], rows)

    # Two overlapping crops of the first photo, the second flipped, with their true grids.
    photo = Image.fromarray(raw[0])
    size, n = 224, 224 // 32
    boxes = [(40, 30, 300, 300, False), (130, 110, 300, 300, True)]  # top, left, height, width, flip
    views, grids = [], []
    for top, left, height, width, flip in boxes:
        crop = photo.crop((left, top, left + width, top + height)).resize((size, size), Image.BICUBIC)
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        views.append(np.asarray(crop))
        grids.append(data_lib.location_grid(top, left, height, width, n, flip))
    normalised = _normalise(np.stack(views))
    for label, backbone in backbones.items():
        maps, _ = backbone(jnp.asarray(normalised))
        maps = np.asarray(maps)
        path = os.path.join(workdir, f"correspondences_{label}.png")
        accuracy = viz.save_correspondence_picture(
            path,
            views[0],
            views[1],
            maps[0],
            maps[1],
            np.asarray(grids[0]),
            np.asarray(grids[1]),
            title=f"{label} (B is flipped): green = within one cell",
        )
        paths.append(path)
        print(f"[picture] {path}: {100 * accuracy:.0f}% of the lines correct", flush=True)
    return paths


def run_demo(config, workdir: str, *, check: bool = True) -> dict:
    """Runs the whole quick start and returns the summary (also in workdir/summary.json), or
    {"exit_code": 75 or 130} when a signal stopped its pre-training (resumable).
    check: run the config check of every part first (main.py has run it)."""
    workdir = str(workdir)
    if check:
        build.check_config(config, "demo", workdir=workdir)
    trained = train.train_and_evaluate(config, workdir, check=False)
    if trained.stopped_early:  # SIGTERM or Ctrl-C: the same command resumes; no evaluation of a part-trained model
        print("The demo's pre-training was stopped: run the same command again to resume it.", flush=True)
        return {"exit_code": trained.exit_code}
    results = {}
    for label, random_init in (("trained", False), ("random", True)):
        once = dict(random_init=random_init, check=False)
        results[label] = {
            "knn_top1": knn.run(config, workdir, name=f"knn_{label}", **once)["top1"],
            "linear_top1": linear.run(config, workdir, name=f"linear_{label}", **once)["top1"],
            "correspond": correspond.run(config, workdir, name=f"correspond_{label}", **once),
        }
        results[label]["correspond_chance"] = results[label]["correspond"]["chance"]
        results[label]["correspond"] = results[label]["correspond"]["accuracy"]

    trained, _, _ = release.load_workdir_model(workdir, compute=config.model)
    random_backbone = common.load_backbone(config, workdir, random_init=True).backbone
    pictures = draw_pictures(config, workdir, {"trained": trained.backbone, "random": random_backbone})
    exported = convert.export_torch(workdir)

    rows = [
        ("kNN top-1 (%), digits", "knn_top1"),
        ("linear top-1 (%), digits", "linear_top1"),
        ("correspondence (%), photos", "correspond"),
    ]
    beats = {key: results["trained"][key] > results["random"][key] for _, key in rows}
    lines = ["| evaluation | trained | random init | trained better |", "|---|---|---|---|"]
    for title, key in rows:
        lines.append(
            f"| {title} | {results['trained'][key]:.1f} | {results['random'][key]:.1f} | "
            f"{'yes' if beats[key] else 'NO'} |"
        )
    lines.append(
        f"| (correspondence by chance) | {results['trained']['correspond_chance']:.1f} | "
        f"{results['random']['correspond_chance']:.1f} | |"
    )
    table = "\n".join(lines)
    summary = {"results": results, "trained_beats_random": beats, "pictures": pictures, "exported": exported}
    if jax.process_index() == 0:  # through epath: the workdir may be a bucket
        (epath.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
        (epath.Path(workdir) / "summary.md").write_text(table + "\n")
    print("\n" + table + "\n", flush=True)
    print(f"Pictures: {', '.join(pictures)}\nPyTorch weights: {', '.join(exported['backbone'] + exported['full'])}")
    if not all(beats.values()):
        print("WARNING: the trained model does not beat random initialisation everywhere.", flush=True)
    return summary
