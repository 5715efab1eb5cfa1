"""Pictures of what the local features learned: PCA of a feature map as colours, and the
nearest-neighbour correspondences between two crops drawn as lines. PNG files."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vicregl_jax.evaluate.correspond import nearest_cell_matches


def pca_rgb(maps: np.ndarray) -> np.ndarray:
    """Returns the first three principal components of a map (h, w, C) as colours (h, w, 3) in [0, 1]."""
    h, w, c = maps.shape
    x = maps.reshape(-1, c).astype(np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-8), 0.0, 1.0)
    return rgb.reshape(h, w, 3)


def save_pca_picture(path: str, rows: list[tuple[str, np.ndarray, np.ndarray]], *, tile: int = 224) -> None:
    """Saves a PNG: one row per (title, uint8 image, map (h, w, C)): the image and its PCA colours."""
    label_height = 16
    canvas = Image.new("RGB", (2 * tile, len(rows) * (tile + label_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, image, maps) in enumerate(rows):
        top = r * (tile + label_height)
        draw.text((4, top + 2), title, fill="black")
        canvas.paste(Image.fromarray(image).resize((tile, tile), Image.BICUBIC), (0, top + label_height))
        colours = (pca_rgb(maps) * 255).astype(np.uint8)
        canvas.paste(Image.fromarray(colours).resize((tile, tile), Image.NEAREST), (tile, top + label_height))
    canvas.save(path)


def save_correspondence_picture(path: str, view_a: np.ndarray, view_b: np.ndarray, feat_a: np.ndarray,
                                feat_b: np.ndarray, grid_a: np.ndarray, grid_b: np.ndarray, *, title: str = "") -> float:
    """Saves two crops side by side with a line from every cell of A to its nearest neighbour
    (by feature distance) in B: green when within one cell of the truth, red otherwise.
    Returns the fraction of correct lines among cells of A that B shows."""
    size = view_a.shape[0]
    na, nb = grid_a.shape[0], grid_b.shape[0]
    nearest, correct_cells, inside, _ = (np.asarray(v) for v in nearest_cell_matches(feat_a, feat_b, grid_a, grid_b))
    label_height = 16 if title else 0
    canvas = Image.new("RGB", (2 * size + 8, size + label_height), "white")
    canvas.paste(Image.fromarray(view_a), (0, label_height))
    canvas.paste(Image.fromarray(view_b), (size + 8, label_height))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    step_a, step_b = size / na, size / nb
    correct = shown = 0
    for a in range(na * na):
        if not inside[a]:
            continue
        shown += 1
        b = nearest[a]
        ok = bool(correct_cells[a])
        correct += ok
        start = ((a % na + 0.5) * step_a, label_height + (a // na + 0.5) * step_a)
        end = (size + 8 + (b % nb + 0.5) * step_b, label_height + (b // nb + 0.5) * step_b)
        draw.line([start, end], fill=(40, 180, 60) if ok else (220, 40, 40), width=1)
    canvas.save(path)
    return correct / max(shown, 1)
