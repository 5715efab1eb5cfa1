"""VICRegL's features of images, for downstream work: global, dense, and the heads' outputs.

    model, _ = vicregl_jax.load("resnet50_alpha0.9")
    out = vicregl_jax.features(model, images)                 # uint8 (B, H, W, 3)
    out.pooled      # (B, C) float32: the global representation (C = 2048 for ResNet-50)
    out.maps        # (B, h, w, C) float32: the dense feature map (h = ceil(H / 32) for
                    #   ResNets, floor(H / 32) for ConvNeXts)
    out.locations   # (B, h, w, 2) float32: each cell's centre (row, col) in the given
                    #   images' pixels (pixel r covers [r, r + 1))
    out.embeddings, out.local_embeddings   # with heads=True: the expander's (B, D) and the
                    #   local projector's (B, h, w, D') outputs, float32; None otherwise

Images are normalised as the release's evaluation does (x / 255 - mean) / std, with its
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). `resize=256, crop=224` first
resizes each image's short side to 256 (bilinear, Pillow's bytes) and takes the centre
224 x 224 crop, as that evaluation does; `locations` still point into the given images.

`Extractor(model)` is the compiled form for large sets: the weights replicated over a mesh
of every device, each batch sharded over it (`extractor(images)` gives device arrays,
`extractor.all(images, batch_size=...)` numpy arrays of a whole set). The evaluations
(kNN, linear, correspondence) take their features from `Extractor.normalised`: the same
jitted function on the images their input pipeline has already normalised.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vicregl_jax import sharding
from vicregl_jax.data import resample
from vicregl_jax.data.colour import IMAGENET_MEAN
from vicregl_jax.models.vicregl import VICRegLModel

EVAL_MEAN = IMAGENET_MEAN
EVAL_STD = (0.229, 0.224, 0.225)  # the release's evaluation (its pre-training uses 0.228 for red)
EVAL_INTERPOLATION = "bilinear"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Features:
    """The features of a batch of images (shapes and dtypes in the module's docstring)."""

    pooled: jax.Array | np.ndarray
    maps: jax.Array | np.ndarray
    locations: np.ndarray
    embeddings: jax.Array | np.ndarray | None = None
    local_embeddings: jax.Array | np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# Preprocessing (host): optional resize and centre crop, and where the cells fall
# --------------------------------------------------------------------------------------------


def _resized_shape(height: int, width: int, resize: int) -> tuple[int, int]:
    """Returns the shape with the short side resized to `resize` (torchvision's Resize(int))."""
    if height <= width:
        return resize, int(resize * width / height)
    return int(resize * height / width), resize


def preprocess(images, *, resize: int | None = None, crop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 (B, S, S', 3) images, float64 (B, 4) boxes): the images resized (short
    side `resize`) and centre-cropped (`crop`) when asked, and the region (top, left, height,
    width) of each given image that each result shows."""
    if getattr(images, "ndim", None) == 4 and resize is None and crop is None:
        batch = np.asarray(images)  # as it is, not copied
        if batch.dtype != np.uint8 or batch.shape[-1] != 3 or batch.shape[0] < 1:
            raise ValueError(f"images is {batch.dtype} {batch.shape}: pass uint8 RGB images (B, H, W, 3), B >= 1.")
        return batch, np.tile([0.0, 0.0, *batch.shape[1:3]], (batch.shape[0], 1))
    batch = [np.asarray(image) for image in images]
    if not batch:
        raise ValueError("images is empty: pass uint8 (B, H, W, 3) images, B >= 1.")
    for k, image in enumerate(batch):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"images[{k}] is {image.dtype} {image.shape}: pass uint8 RGB images (B, H, W, 3) "
                "(e.g. np.asarray(PIL.Image.open(path).convert('RGB')))."
            )
    if resize is not None and crop is not None and crop > resize:
        raise ValueError(f"crop={crop} is larger than resize={resize}: the crop must fit (e.g. 256 and 224).")
    out, boxes = [], []
    for image in batch:
        h, w = image.shape[:2]
        rh, rw = _resized_shape(h, w, resize) if resize is not None else (h, w)
        ch, cw = (min(crop, rh), min(crop, rw)) if crop is not None else (rh, rw)
        top, left = round((rh - ch) / 2), round((rw - cw) / 2)  # torchvision's CenterCrop
        if (rh, rw) != (h, w):
            image = resample.resize(image, rh, rw, EVAL_INTERPOLATION, window=(top, left, ch, cw))
        else:
            image = image[top : top + ch, left : left + cw]
        out.append(image)
        sy, sx = h / rh, w / rw
        boxes.append((top * sy, left * sx, ch * sy, cw * sx))
    if len({image.shape for image in out}) > 1:
        raise ValueError(
            f"the images have different sizes ({sorted({i.shape[:2] for i in out})}): pass crop=SIZE "
            "(and resize=) to bring them to one size, or pass them one at a time."
        )
    return np.stack(out), np.asarray(boxes, np.float64)


def cell_centres(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """Returns float32 (B, h, w, 2): the (row, col) centre of each cell of an h x w map over
    each box (top, left, height, width), the map's cells dividing the box evenly."""
    boxes = np.asarray(boxes, np.float64)
    rows = boxes[:, 0, None] + (np.arange(h) + 0.5) / h * boxes[:, 2, None]  # (B, h)
    cols = boxes[:, 1, None] + (np.arange(w) + 0.5) / w * boxes[:, 3, None]  # (B, w)
    grid = np.stack(np.broadcast_arrays(rows[:, :, None], cols[:, None, :]), axis=-1)
    return grid.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The network (device): one jitted function for every caller
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "normalise", "heads", "grid"))
def _forward(graphdef, state, images, mean, std, *, normalise: bool, heads: bool, grid):
    """Returns {"maps", "pooled"} (float32; maps (B, h, w, C) when grid = (h, w) is given,
    else (B, h*w, C)), with "embeddings" / "local_embeddings" when heads."""
    net = nnx.merge(graphdef, state, copy=True)
    backbone = net.backbone if heads else net
    x = (images.astype(jnp.float32) / 255.0 - mean) / std if normalise else images
    maps, pooled = backbone(x)
    out = {"maps": maps.astype(jnp.float32), "pooled": pooled.astype(jnp.float32)}
    if heads:
        out["embeddings"] = None if net.expander is None else net.expander(pooled).astype(jnp.float32)
        out["local_embeddings"] = None if net.local_projector is None else net.local_projector(maps).astype(jnp.float32)
    if grid is not None:
        for key in ("maps", "local_embeddings"):
            if out.get(key) is not None:
                out[key] = out[key].reshape(out[key].shape[0], *grid, out[key].shape[-1])
    return out


class Extractor:
    """Features of images batch by batch, compiled once per image size: the weights replicated
    over `mesh` (default: every device), each batch sharded over it.

    model: a VICRegLModel, or a backbone (ResNet / ConvNeXt) such as `load` gives for a
    release backbone file; heads=True needs a VICRegLModel (a full checkpoint or a workdir).
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        mesh=None,
        heads: bool = False,
        mean: Sequence[float] = EVAL_MEAN,
        std: Sequence[float] = EVAL_STD,
    ):
        if heads and not isinstance(model, VICRegLModel):
            raise ValueError(
                f"heads=True needs the whole model (backbone, expander, local projector), not a "
                f"{type(model).__name__}: load a full checkpoint (NAME_fullckpt) or a workdir."
            )
        net = model if heads else getattr(model, "backbone", model)
        self.mesh = mesh or sharding.make_mesh()
        self.heads = heads
        self.graphdef, state = nnx.split(net)
        self.state = jax.device_put(state, sharding.replicated(self.mesh))
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self._grids: dict[tuple, tuple[int, int]] = {}

    def _run(self, images, *, normalise: bool, grid):
        return _forward(
            self.graphdef, self.state, images, self.mean, self.std, normalise=normalise, heads=self.heads, grid=grid
        )

    def normalised(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (maps (B, h*w, C), pooled (B, C)) float32 of already-normalised images
        (B, H, W, 3) (a global batch from the input pipeline): what the evaluations use."""
        out = self._run(images, normalise=False, grid=None)
        return out["maps"], out["pooled"]

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Returns the (h, w) of the feature map of an image of height x width."""
        if (height, width) not in self._grids:

            def last_stage(state, x):  # the module is rebuilt inside the trace: its scans update it there
                net = nnx.merge(self.graphdef, state)
                return (net.backbone if self.heads else net).stage_maps(x)[-1]

            shape = jax.eval_shape(
                last_stage, self.state, jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
            ).shape
            if shape[1] < 1 or shape[2] < 1:
                raise ValueError(
                    f"images of {height} x {width} are too small for this backbone (no feature map "
                    "cell): pass at least 32 x 32 pixels."
                )
            self._grids[(height, width)] = (shape[1], shape[2])
        return self._grids[(height, width)]

    def __call__(self, images, boxes: np.ndarray | None = None) -> Features:
        """Returns the Features (device arrays, the batch sharded over the mesh) of uint8
        images (B, H, W, 3); boxes (B, 4): the region of an original image each one shows
        (`preprocess`), by default the whole image."""
        images = np.asarray(images) if not isinstance(images, jax.Array) else images
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images is {images.dtype} {images.shape}: pass uint8 RGB images (B, H, W, 3).")
        b, height, width = images.shape[:3]
        grid = self.grid(height, width)
        pad = -b % self.mesh.size
        if pad:  # every device gets rows; the padding's features are dropped
            images = (
                jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
                if isinstance(images, jax.Array)
                else np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
            )
        images = jax.device_put(images, sharding.batch_sharding(self.mesh))
        out = self._run(images, normalise=True, grid=grid)
        if pad:
            out = {k: None if v is None else v[:b] for k, v in out.items()}
        boxes = np.tile([0.0, 0.0, height, width], (b, 1)) if boxes is None else boxes
        return Features(
            out["pooled"], out["maps"], cell_centres(boxes, *grid), out.get("embeddings"), out.get("local_embeddings")
        )

    def all(self, images, *, batch_size: int = 256, resize: int | None = None, crop: int | None = None) -> Features:
        """Returns the Features (numpy arrays) of a whole set of images (an array (N, H, W, 3)
        or a sequence of uint8 images), batch_size at a time (rounded up to the mesh size)."""
        batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        parts = []
        for start in range(0, len(images), batch_size):
            chunk, boxes = preprocess(images[start : start + batch_size], resize=resize, crop=crop)
            parts.append(jax.device_get(self(chunk, boxes)))
        if not parts:
            raise ValueError("images is empty: pass at least one image.")
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def features(
    model: nnx.Module, images, *, resize: int | None = None, crop: int | None = None, heads: bool = False, mesh=None
) -> Features:
    """Returns the Features of uint8 images (B, H, W, 3), or of a list of uint8 (H, W, 3)
    images brought to one size by resize / crop; device arrays (np.asarray to fetch them).
    See the module's docstring for the shapes and the preprocessing."""
    chunk, boxes = preprocess(images, resize=resize, crop=crop)
    return Extractor(model, mesh=mesh, heads=heads)(chunk, boxes)
