"""Pictures of what the local features learned: PCA of a feature map as colours, and the
nearest-neighbour correspondences between two crops drawn as lines. PNG files."""

from __future__ import annotations

import io

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from vicregl_jax.evaluate.correspond import nearest_cell_matches


def _save_png(canvas: Image.Image, path: str) -> None:
    """Writes canvas as a PNG at path, local or gs:// (through etils epath)."""
    out = io.BytesIO()
    canvas.save(out, "PNG")
    epath.Path(path).write_bytes(out.getvalue())


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
    _save_png(canvas, path)


def save_correspondence_picture(
    path: str,
    view_a: np.ndarray,
    view_b: np.ndarray,
    feat_a: np.ndarray,
    feat_b: np.ndarray,
    grid_a: np.ndarray,
    grid_b: np.ndarray,
    *,
    title: str = "",
) -> float:
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
    _save_png(canvas, path)
    return correct / max(shown, 1)


def mutual_matches(feat_a: np.ndarray, feat_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (index in A, index in B, cosine similarity) of the mutual nearest neighbours
    between features (N_a, C) and (N_b, C), most similar first."""
    a = feat_a / np.maximum(np.linalg.norm(feat_a, axis=-1, keepdims=True), 1e-12)
    b = feat_b / np.maximum(np.linalg.norm(feat_b, axis=-1, keepdims=True), 1e-12)
    sims = a @ b.T
    best_b, best_a = sims.argmax(axis=1), sims.argmax(axis=0)
    rows = np.flatnonzero(best_a[best_b] == np.arange(len(a)))
    order = np.argsort(-sims[rows, best_b[rows]])
    rows = rows[order]
    return rows, best_b[rows], sims[rows, best_b[rows]]


def save_matches_picture(
    path: str,
    image_a: np.ndarray,
    image_b: np.ndarray,
    feat_a: np.ndarray,
    feat_b: np.ndarray,
    loc_a: np.ndarray,
    loc_b: np.ndarray,
    *,
    count: int = 40,
    height: int = 320,
) -> int:
    """Saves two images side by side with lines between the `count` most similar mutual nearest
    neighbours of their dense features (maps (h, w, C), cell centres (h, w, 2) in each image's
    pixels), brighter for more similar; returns the number of mutual neighbours."""
    rows, cols, sims = mutual_matches(feat_a.reshape(-1, feat_a.shape[-1]), feat_b.reshape(-1, feat_b.shape[-1]))
    scale_a, scale_b = height / image_a.shape[0], height / image_b.shape[0]
    width_a = round(image_a.shape[1] * scale_a)
    canvas = Image.new("RGB", (width_a + 8 + round(image_b.shape[1] * scale_b), height), "white")
    canvas.paste(Image.fromarray(image_a).resize((width_a, height), Image.BICUBIC), (0, 0))
    canvas.paste(Image.fromarray(image_b).resize((canvas.width - width_a - 8, height), Image.BICUBIC), (width_a + 8, 0))
    draw = ImageDraw.Draw(canvas)
    points_a, points_b = loc_a.reshape(-1, 2), loc_b.reshape(-1, 2)
    low, high = (sims[:count].min(), sims[:count].max()) if len(sims) else (0.0, 1.0)
    for a, b, s in zip(rows[:count], cols[:count], sims[:count]):
        shade = (s - low) / max(high - low, 1e-8)
        (ya, xa), (yb, xb) = points_a[a] * scale_a, points_b[b] * scale_b
        draw.line([(xa, ya), (width_a + 8 + xb, yb)], fill=(int(255 * shade), 120, int(255 * (1 - shade))), width=2)
    _save_png(canvas, path)
    return len(rows)
