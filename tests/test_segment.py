"""Linear segmentation: masks and dataset layouts, mmsegmentation's transforms, features,
optimiser and metrics against references, and the protocols end to end on a small VOC-layout
set built offline."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from flax import nnx
from helpers import torch_no_grad
from PIL import Image
from segmentation_data import save_palette_png, write_voc

from references.torch_modules import TORCH_BACKBONES, nchw, numpy_state, randomize_torch_
from vicregl_jax import convert, layout, sharding, torch_io
from vicregl_jax.config import default_config
from vicregl_jax.data import segmentation as seg_data
from vicregl_jax.evaluate import segment
from vicregl_jax.models import create_backbone, stage_channels

torch.set_num_threads(1)


no_torch_grad = pytest.fixture(autouse=True)(torch_no_grad)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A VOC-layout set: 24 + 24 training images (palette / grey masks), 12 validation
    images of two sizes."""
    return write_voc(str(tmp_path_factory.mktemp("voc")), train=24, aug=24, val=12, seed=0)


def png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------- masks


def test_masks_read_as_class_indices(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 21, size=(37, 53)).astype(np.uint8)
    labels[:3] = 255
    save_palette_png(labels, str(tmp_path / "palette.png"))
    # The palette PNG holds indices; read as grey levels (TF, one channel) it gives colours.
    data = (tmp_path / "palette.png").read_bytes()
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(seg_data.decode_mask(data, num_classes=21), labels)
    grey = tf.io.decode_png(data, channels=1).numpy()[..., 0]
    assert not np.array_equal(grey, labels) and grey.max() > 20
    # Grey-level PNG (SBD aug masks, Cityscapes trainIds, ADE20k).
    Image.fromarray(labels, mode="L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(seg_data.read_mask(str(tmp_path / "grey.png"), num_classes=21), labels)
    train_ids = rng.integers(0, 19, size=(16, 32)).astype(np.uint8)
    train_ids[0, 0] = 255
    Image.fromarray(train_ids, mode="L").save(tmp_path / "a_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(
        seg_data.read_mask(str(tmp_path / "a_gtFine_labelTrainIds.png"), num_classes=19), train_ids
    )
    # ADE20k: 0 ("other") ignored, the 150 classes shifted down.
    ade = np.array([[0, 1, 150, 255]], np.uint8)
    np.testing.assert_array_equal(
        seg_data.decode_mask(png_bytes(Image.fromarray(ade, mode="L")), num_classes=150, reduce_zero_label=True),
        [[255, 0, 149, 255]],
    )
    # Colours or another dataset's labels are refused with the file's name.
    with pytest.raises(ValueError, match="grey.png holds label (19|20) but the dataset has 19 "):
        seg_data.read_mask(str(tmp_path / "grey.png"), num_classes=19)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png is a RGB image: masks must hold class"):
        seg_data.read_mask(str(tmp_path / "rgb.png"), num_classes=21)


def test_dataset_layouts_and_their_errors(voc, tmp_path):
    split = seg_data.open_split(f"voc:{voc}")
    assert split.split == "trainaug" and len(split) == 48
    assert split.masks[0].endswith("SegmentationClass/2099_train0000.png")
    assert split.masks[-1].endswith("SegmentationClassAug/2099_aug0023.png")
    assert len(seg_data.open_split(f"voc:{voc}/VOC2012", train=False)) == 12
    assert len(seg_data.open_split(f"voc:{voc}", "train")) == 24
    with pytest.raises(ValueError, match="'pascal:/x'.*voc:/data/VOCdevkit, ade20k:"):
        seg_data.parse_dataset("pascal:/x")
    with pytest.raises(ValueError, match="split 'validation' of voc: use one of"):
        seg_data.open_split(f"voc:{voc}", "validation")
    with pytest.raises(FileNotFoundError, match="/nowhere does not exist.*voc:/data/VOCdevkit"):
        seg_data.open_split("voc:/nowhere")
    # VOC without the SBD files: trainaug names the converter; a missing mask is named.
    bare = tmp_path / "bare" / "VOC2012"
    (bare / "ImageSets" / "Segmentation").mkdir(parents=True)
    (bare / "JPEGImages").mkdir()
    (bare / "SegmentationClass").mkdir()
    Image.new("RGB", (8, 8)).save(bare / "JPEGImages" / "a.jpg")
    (bare / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match="aug.txt does not exist: make .*voc_aug.py"):
        seg_data.open_split(f"voc:{tmp_path / 'bare'}")
    with pytest.raises(
        FileNotFoundError, match="1 of 1 masks of train.txt are missing from .*SegmentationClass, e.g. a.png"
    ):
        seg_data.open_split(f"voc:{tmp_path / 'bare'}", "train")
    # ADE20k and Cityscapes.
    ade = tmp_path / "ADEChallengeData2016"
    (ade / "images" / "training").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(ade / "images" / "training" / "ADE_train_1.jpg")
    with pytest.raises(
        FileNotFoundError, match="annotations/training does not exist: the ade20k layout needs annotations/training"
    ):
        seg_data.open_split(f"ade20k:{tmp_path}")
    (ade / "annotations" / "training").mkdir(parents=True)
    Image.new("L", (8, 8)).save(ade / "annotations" / "training" / "ADE_train_1.png")
    assert seg_data.open_split(f"ade20k:{tmp_path}").layout.num_classes == 150
    city = tmp_path / "cityscapes"
    (city / "leftImg8bit" / "val" / "lindau").mkdir(parents=True)
    (city / "gtFine" / "val" / "lindau").mkdir(parents=True)
    Image.new("RGB", (16, 8)).save(city / "leftImg8bit" / "val" / "lindau" / "l_0_leftImg8bit.png")
    Image.new("L", (16, 8)).save(city / "gtFine" / "val" / "lindau" / "l_0_gtFine_labelIds.png")
    with pytest.raises(FileNotFoundError, match="labelTrainIds.png: make .*createTrainIdLabelImgs"):
        seg_data.open_split(f"cityscapes:{city}", train=False)
    Image.new("L", (16, 8)).save(city / "gtFine" / "val" / "lindau" / "l_0_gtFine_labelTrainIds.png")
    assert len(seg_data.open_split(f"cityscapes:{city}", train=False)) == 1


# ------------------------------------------------------------------------ the transforms


def test_rescale_sizes_and_slide_windows():
    assert seg_data.rescale_size(375, 500, (2048, 512)) == (512, 683)
    assert seg_data.rescale_size(500, 375, (2048, 512)) == (683, 512)
    assert seg_data.rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long edge limits
    assert seg_data.rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert seg_data.slide_windows(512, 683, (512, 512), (341, 341)) == [(0, 0, 512, 512), (0, 171, 512, 512)]
    windows = seg_data.slide_windows(1024, 2048, (512, 512), (341, 341))
    assert len(windows) == 3 * 6 and windows[-1] == (512, 1536, 512, 512)
    assert seg_data.slide_windows(205, 700, (512, 512), (341, 341)) == [(0, 0, 205, 512), (0, 188, 205, 512)]


def reference_rgb_to_hsv(rgb):
    """OpenCV's uint8 RGB -> HSV (H 0-179), integer arithmetic with 12-bit reciprocals."""
    rgb = rgb.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, diff = rgb.max(-1), rgb.max(-1) - rgb.min(-1)
    i = np.arange(256)
    sdiv = np.where(i > 0, np.rint(255 * 4096 / np.maximum(i, 1)), 0).astype(np.int64)
    hdiv = np.where(i > 0, np.rint(180 * 4096 / (6 * np.maximum(i, 1))), 0).astype(np.int64)
    s = (diff * sdiv[v] + 2048) >> 12
    h = np.select([v == r, v == g], [g - b, b - r + 2 * diff], r - g + 4 * diff)
    h = (h * hdiv[diff] + 2048) >> 12
    return np.stack([np.where(h < 0, h + 180, h), s, v], -1)


def reference_hsv_to_rgb(hsv):
    """OpenCV's uint8 HSV -> RGB in float32, truncated (its vectorised path)."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6 / 180)
    s = hsv[..., 1].astype(np.float32) * np.float32(1 / 255)
    v = hsv[..., 2].astype(np.float32) * np.float32(1 / 255)
    sector = np.floor(h)
    f = h - sector
    one = np.float32(1)
    p, q, t = v * (one - s), v * (one - s * f), v * (one - s * (one - f))
    table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    out = np.zeros(hsv.shape, np.float32)
    for k, channels in table.items():
        out[sector == k] = np.stack(channels, -1)[sector == k]
    return np.floor(out * np.float32(255)).astype(np.uint8)


def reference_distortion(image, d):
    """mmsegmentation's PhotoMetricDistortion with the draws d (same positions as ours)."""

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)

    def contrast(x):
        return convert(x, alpha=0.5 + d[28]) if d[27] < 0.5 else x

    x = convert(image, beta=64 * d[25] - 32) if d[24] < 0.5 else image
    if d[26] >= 0.5:
        x = contrast(x)
    if d[29] < 0.5:
        hsv = reference_rgb_to_hsv(x)
        hsv[..., 1] = convert(hsv[..., 1], alpha=0.5 + d[30])
        x = reference_hsv_to_rgb(hsv)
    if d[31] < 0.5:
        hsv = reference_rgb_to_hsv(x)
        hsv[..., 0] = (hsv[..., 0] + int(np.floor(d[32] * 36)) - 18) % 180
        x = reference_hsv_to_rgb(hsv)
    return contrast(x) if d[26] < 0.5 else x


def test_photometric_distortion_matches_reference():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    image[0, :16] = np.arange(16)[:, None] * 17  # greys: saturation 0
    np.testing.assert_array_equal(seg_data.rgb_to_hsv_uint8(tf.constant(image)).numpy(), reference_rgb_to_hsv(image))
    hsv = reference_rgb_to_hsv(image).astype(np.uint8)
    np.testing.assert_array_equal(seg_data.hsv_uint8_to_rgb(tf.constant(hsv)).numpy(), reference_hsv_to_rgb(hsv))
    for seed in range(6):
        d = np.random.default_rng(seed).random(33).astype(np.float32)
        if seed < 2:  # every step on, contrast first then last
            d[[24, 27, 29, 31]] = 0.1
            d[26] = 0.9 if seed else 0.1
        got = seg_data.photometric_distortion(tf.constant(image, tf.float32), tf.constant(d))
        np.testing.assert_array_equal(got.numpy(), reference_distortion(image, d))


def test_transforms_match_opencv_when_installed():
    """OpenCV itself (mmsegmentation's backend), where it is installed."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(120, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        seg_data.rgb_to_hsv_uint8(tf.constant(image)).numpy(), cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    )
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    diff = np.abs(seg_data.hsv_uint8_to_rgb(tf.constant(hsv)).numpy() - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # FMA rounding in OpenCV's build
    mask = rng.integers(0, 21, size=(120, 256), dtype=np.uint8)
    for h, w in ((187, 341), (60, 128), (240, 512)):
        resized = seg_data.resize_image(tf.constant(image), h, w).numpy()
        assert np.abs(resized - cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)).max() <= 1
        np.testing.assert_array_equal(
            seg_data.resize_mask(tf.constant(mask), h, w).numpy(),
            cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST),
        )


def test_random_crop_redraws_unbalanced_windows():
    mask = np.zeros((8, 32), np.uint8)
    mask[:, 28:] = 1  # only windows reaching column 28+ hold two classes
    mask[0, :] = 255
    image = tf.constant(np.arange(8 * 32 * 3, dtype=np.float32).reshape(8, 32, 3))
    d = np.full(33, 0.0, np.float32)  # every candidate at left 0: one class only
    d[12 + 3] = 1 - 1e-6  # the 4th candidate at the right end: two classes, 1 of them 4/8
    _, crop = seg_data.random_crop(image, tf.constant(mask), tf.constant(d), (8, 8), 0.75)
    np.testing.assert_array_equal(crop.numpy(), mask[:, 24:])
    # Balanced only at the 11th candidate, which is never tested: taken anyway.
    d[12 + 3], d[12 + 10] = 0.0, 0.5
    _, crop = seg_data.random_crop(image, tf.constant(mask), tf.constant(d), (8, 8), 0.75)
    np.testing.assert_array_equal(crop.numpy(), mask[:, 12:20])
    # Smaller than the crop: the whole image (the pipeline pads it afterwards).
    image_crop, crop = seg_data.random_crop(image, tf.constant(mask), tf.constant(d), (16, 64), 0.75)
    assert crop.shape == (8, 32) and image_crop.shape == (8, 32, 3)


def test_train_batches_are_a_function_of_seed_and_step(voc):
    split = seg_data.open_split(f"voc:{voc}")
    kwargs = dict(global_batch_size=4, seed=3, scale=(64, 48), crop_size=(40, 40))
    stream = seg_data.make_train_iterator(split, **kwargs)
    batches = [next(stream) for _ in range(3)]
    stream.close()
    assert batches[0]["image"].shape == (4, 40, 40, 3) and batches[0]["mask"].dtype == np.uint8
    assert set(np.unique(np.concatenate([b["mask"] for b in batches]))) <= {0, 1, 2, 3, 255}
    # Short side 48 * U(0.5, 2) is often below the crop: padded with 255 and 0.
    masks = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    padded = np.all(images == 0, axis=-1)
    assert padded.any() and np.all(masks[padded] == 255) and images.std() > 0.5
    resumed = seg_data.make_train_iterator(split, start_step=2, **kwargs)
    np.testing.assert_array_equal(next(resumed)["image"], batches[2]["image"])
    resumed.close()
    hosts = [
        seg_data.make_train_iterator(split, start_step=1, process_index=p, process_count=2, **kwargs) for p in range(2)
    ]
    halves = [next(h) for h in hosts]
    for h in hosts:
        h.close()
    np.testing.assert_array_equal(np.concatenate([h["mask"] for h in halves]), batches[1]["mask"])
    other = seg_data.make_train_iterator(split, **{**kwargs, "seed": 4})
    assert not np.array_equal(next(other)["image"], batches[0]["image"])
    other.close()


def test_eval_chunks_group_sizes_and_split_over_hosts(voc):
    split = seg_data.open_split(f"voc:{voc}", train=False)
    sizes = seg_data.image_sizes(split.masks)
    assert sorted(set(sizes)) == [(96, 128), (128, 96)]
    chunks = seg_data.eval_chunks(sizes, scale=(128, 64), images_per_chunk=4, row_multiple=2)
    assert [c.count for c in chunks] == [4, 2, 4, 2]
    assert chunks[0].resized_size == (64, 85) and chunks[-1].resized_size == (85, 64)
    chunks = seg_data.eval_chunks(sizes, scale=(128, 64), images_per_chunk=8, row_multiple=4)
    assert [len(c.indices) for c in chunks] == [8, 8] and chunks[0].valid.sum() == 6
    one = list(seg_data.make_eval_iterator(split, chunks))
    two = [list(seg_data.make_eval_iterator(split, chunks, process_index=p, process_count=2)) for p in range(2)]
    for whole, a, b in zip(one, *two):
        for key in ("image", "mask", "valid"):
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key])
    first = one[0]
    assert first["image"].shape == (8, 64, 85, 3) and first["mask"].shape == (8, 96, 128)
    np.testing.assert_array_equal(
        first["mask"][0], np.asarray(Image.open(split.masks[chunks[0].indices[0]]))
    )  # scored at the original resolution


# ------------------------------------------------------------------ features and optimiser


def test_concatenated_stage_features_match_torch():
    reference = TORCH_BACKBONES["convnext_test"]().eval()
    randomize_torch_(reference, seed=5)
    model = nnx.eval_shape(lambda: create_backbone("convnext_test", drop_path_rate=0.0, rngs=nnx.Rngs(0)))
    layout.load_torch_state_dict(model, numpy_state(reference))
    model.eval()
    x = np.random.default_rng(6).standard_normal((2, 64, 96, 3)).astype(np.float32)
    got = nnx.jit(lambda m, x: segment.dense_features(m, x, "concat"))(model, jnp.asarray(x))
    assert got.shape == (2, 16, 24, sum(stage_channels("convnext_test"))) == (2, 16, 24, 120)
    stages = reference.forward_stages(nchw(x))
    expected = torch.cat(
        [F.interpolate(s, size=stages[0].shape[2:], mode="bilinear", align_corners=False) for s in stages], dim=1
    )
    expected = expected.numpy().transpose(0, 2, 3, 1)
    assert np.abs(np.asarray(got) - expected).max() <= 1e-4 * np.abs(expected).max()
    # Shrinking too, as the logits are shrunk back to small original images.
    y = np.random.default_rng(7).standard_normal((1, 40, 50, 3)).astype(np.float32)
    np.testing.assert_allclose(
        segment.resize_bilinear(jnp.asarray(y), (17, 23)),
        F.interpolate(nchw(y), size=(17, 23), mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1),
        atol=1e-5,
    )


def test_poly_schedule_is_mmcv_s():
    sgd = segment.poly_schedule(0.01, 100, power=0.9, min_lr=1e-4)
    for t in (0, 1, 50, 99, 100):
        assert float(sgd(t)) == pytest.approx((0.01 - 1e-4) * (1 - t / 100) ** 0.9 + 1e-4)
    adamw = segment.poly_schedule(1e-4, 1000, power=1.0, min_lr=0.0, warmup_steps=150)
    for t in (0, 75, 149, 150, 600):
        regular = 1e-4 * (1 - t / 1000)
        warm = regular * (1 - (1 - t / 150) * (1 - 1e-6)) if t < 150 else regular
        assert float(adamw(t)) == pytest.approx(warm, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_head_steps_match_torch(optimizer):
    """Our head, loss and optimiser against mmsegmentation's head in PyTorch: SyncBN (one
    process: BatchNorm2d), 1x1 conv, logits resized to the labels, cross-entropy with 255
    ignored averaged over all pixels, torch's SGD / AdamW decaying every parameter."""
    rng = np.random.default_rng(8)
    features = [rng.standard_normal((4, 6, 7, 5)).astype(np.float32) * 2 + 1 for _ in range(3)]
    masks = [rng.integers(0, 3, size=(4, 12, 14)).astype(np.uint8) for _ in range(3)]
    for m in masks:
        m[:, :2] = 255
    settings = segment.segment_settings(
        "resnet" if optimizer == "sgd" else "convnext",
        "voc:/unused",
        steps=10,
        warmup_steps=2 if optimizer == "adamw" else None,
        lr=0.1 if optimizer == "sgd" else 0.01,
    )
    head = segment.LinearHead(5, 3, rngs=nnx.Rngs(0))
    norm, conv = torch.nn.BatchNorm2d(5), torch.nn.Conv2d(5, 3, 1)
    conv.weight.copy_(torch.from_numpy(np.array(head.classifier.kernel[...]).T[:, :, None, None]))
    conv.bias.zero_()
    params = list(norm.parameters()) + list(conv.parameters())
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.999), weight_decay=settings.weight_decay)
    schedule = segment.poly_schedule(
        settings.lr, settings.steps, power=settings.power, min_lr=settings.min_lr, warmup_steps=settings.warmup_steps
    )
    for t in range(3):
        for group in opt.param_groups:
            group["lr"] = float(schedule(t))
        with torch.enable_grad():
            logits = F.interpolate(conv(norm(nchw(features[t]))), size=(12, 14), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, torch.from_numpy(masks[t]).long(), ignore_index=255, reduction="none").mean()
            opt.zero_grad()
            loss.backward()
        opt.step()
    mesh = sharding.make_mesh(1)

    def batches(t):
        return {"input": jnp.asarray(features[t]), "mask": jnp.asarray(masks[t])}

    segment.train_head(head, lambda x: x, batches, settings, mesh, seed=0, stop_after_steps=3, progress=False)
    np.testing.assert_allclose(head.classifier.kernel[...], conv.weight[:, :, 0, 0].numpy().T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head.classifier.bias[...], conv.bias.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head.norm.scale[...], norm.weight.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head.norm.var[...], norm.running_var.numpy(), rtol=1e-5)


def test_head_fits_classes_linear_in_the_features_exactly():
    """Labels that are the argmax of the first K feature channels: the head learns them, mIoU
    100 at the features' resolution (the fast protocol's path: cached features)."""
    rng = np.random.default_rng(10)
    k, n = 4, 32
    classes = rng.integers(0, k, size=(n, 6, 6))
    features = (0.3 * rng.standard_normal((n, 6, 6, 8))).astype(np.float32)
    features[..., :k] += 3.0 * np.eye(k, dtype=np.float32)[classes]
    masks = classes.astype(np.uint8)
    masks[:, 0, 0] = 255
    mesh = sharding.make_mesh()
    settings = segment.segment_settings("resnet", "voc:/unused", steps=150, lr=0.1, batch_size=8, dropout=0.0)
    head = segment.LinearHead(8, k, rngs=nnx.Rngs(0))
    segment.train_head(
        head,
        lambda x: x,
        lambda t: {"input": jnp.asarray(features[t % 3 * 8 :][:8]), "mask": jnp.asarray(masks[t % 3 * 8 :][:8])},
        settings,
        mesh,
        seed=0,
        progress=False,
    )
    logits = segment.make_logits_fn(None, head, "map", mesh)(jnp.asarray(features[24:]))
    score = segment.make_scorer(k)
    confusion = score((logits,), ((0, 0, 6, 6),), (6, 6), jnp.asarray(classes[24:]), jnp.ones(8, bool))
    assert segment.segmentation_metrics(np.asarray(confusion), "abcd")["mIoU"] == 100.0


# --------------------------------------------------------------------- metrics, inference


def test_metrics_by_hand_with_an_absent_class_and_ignored_pixels():
    labels = np.array([[0, 0, 1, 1, 255], [2, 2, 255, 255, 0]])
    pred = np.array([[0, 1, 1, 1, 3], [2, 0, 0, 2, 3]])
    confusion = np.asarray(segment.confusion_matrix(jnp.asarray(pred), jnp.asarray(labels), 5))
    expected = np.zeros((5, 5), int)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0), (0, 3)]:
        expected[t, p] += 1
    np.testing.assert_array_equal(confusion, expected)
    out = segment.segmentation_metrics(confusion, ["a", "b", "c", "d", "e"])
    # a: tp 1, 3 labelled, 2 predicted -> 1/4; b: 2 / 3; c: 1 / 2; d: predicted only -> 0;
    # e: neither labelled nor predicted -> left out.
    iou = {k: v["IoU"] for k, v in out["per_class"].items()}
    assert iou == pytest.approx({"a": 25.0, "b": 200 / 3, "c": 50.0, "d": 0.0, "e": None})
    assert out["mIoU"] == pytest.approx((25 + 200 / 3 + 50 + 0) / 4)
    acc = {k: v["Acc"] for k, v in out["per_class"].items()}
    assert acc == pytest.approx({"a": 100 / 3, "b": 100.0, "c": 50.0, "d": None, "e": None})
    assert out["mAcc"] == pytest.approx((100 / 3 + 100 + 50) / 3)
    assert out["aAcc"] == pytest.approx(100 * 4 / 7)
    table = segment.format_table(out)
    assert "| e     |      - |      - |" in table and "mIoU 35.42" in table
    # Rows marked invalid (batch padding) count nothing.
    weights = jnp.asarray([[True] * 5, [False] * 5])
    assert int(segment.confusion_matrix(jnp.asarray(pred), jnp.asarray(labels), 5, weights).sum()) == 4


def test_slide_inference_of_a_per_pixel_head_equals_whole(voc):
    """A head whose logits at a pixel depend on that pixel only gives the same scores with
    overlapping windows (averaged) as on the whole image; both equal a direct computation."""
    split = seg_data.open_split(f"voc:{voc}", train=False)
    mesh = sharding.make_mesh()
    sizes = seg_data.image_sizes(split.masks)
    weights = jnp.asarray(np.random.default_rng(9).standard_normal((3, 21)), jnp.float32)
    logits_fn = jax.jit(lambda images: images @ weights)
    results = {}
    for inference in ("whole", "slide"):
        settings = segment.segment_settings(
            "resnet",
            f"voc:{voc}",
            inference=inference,
            crop_size=(48, 48),
            scale=(128, 64),
            slide_stride=(20, 20),
            eval_batch_size=8,
        )
        chunks = seg_data.eval_chunks(sizes, scale=settings.scale, images_per_chunk=8, row_multiple=8)
        results[inference] = segment.evaluate_chunks(
            logits_fn, seg_data.make_eval_iterator(split, chunks), chunks, settings, 21, mesh, progress=False
        )
    np.testing.assert_array_equal(results["slide"], results["whole"])
    expected = np.zeros((21, 21), np.int64)
    for chunk, batch in zip(chunks, seg_data.make_eval_iterator(split, chunks)):
        logits = F.interpolate(
            nchw(np.asarray(batch["image"] @ np.asarray(weights))),
            size=chunk.original_size,
            mode="bilinear",
            align_corners=False,
        )
        pred = logits.argmax(1).numpy()[batch["valid"]]
        labels = batch["mask"][batch["valid"]]
        keep = labels != 255
        np.add.at(expected, (labels[keep], pred[keep]), 1)
    np.testing.assert_array_equal(results["whole"], expected)
    assert expected.sum() > 0.9 * sum(h * w for h, w in sizes) * 0.8


# ------------------------------------------------------------------------ end to end

SMALL = dict(crop_size=(64, 64), scale=(128, 64), batch_size=16, eval_batch_size=8, slide_stride=(43, 43))


def majority_baseline(voc) -> float:
    """mIoU of predicting background everywhere on the validation set."""
    split = seg_data.open_split(f"voc:{voc}", train=False)
    confusion = np.zeros((21, 21), np.int64)
    for path in split.masks:
        labels = seg_data.read_mask(path, num_classes=21)
        confusion += np.asarray(segment.confusion_matrix(jnp.zeros(labels.shape, jnp.int32), jnp.asarray(labels), 21))
    return segment.segmentation_metrics(confusion, seg_data.VOC_CLASSES)["mIoU"]


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("resnet_test", dict(steps=60, lr=0.2, checkpoint_every=30)),
        ("convnext_test", dict(steps=60, lr=0.03, warmup_steps=6)),
    ],
)
def test_the_head_learns_and_resumes(voc, tmp_path, arch, overrides):
    mesh = sharding.make_mesh()
    backbone = create_backbone(arch, rngs=nnx.Rngs(0))
    family = segment.backbone_family(backbone)
    settings = segment.segment_settings(family, f"voc:{voc}", **SMALL, **overrides)
    assert settings.inference == ("whole" if family == "resnet" else "slide")
    result = segment.evaluate_segmentation(backbone, f"voc:{voc}", mesh=mesh, settings=settings, progress=False)
    baseline = majority_baseline(voc)
    assert result["mIoU"] > 2.5 * baseline, (result["mIoU"], baseline)  # 61-67 vs 21
    assert result["per_class"]["boat"]["IoU"] is None  # absent classes stay out of the mean
    if family != "resnet":
        return
    # Stopped half-way, then run again: the same result as the uninterrupted run.
    workdir = str(tmp_path)
    stopped = segment.evaluate_segmentation(
        backbone, f"voc:{voc}", mesh=mesh, settings=settings, workdir=workdir, stop_after_steps=30, progress=False
    )
    assert stopped == {"stopped_at_step": 30}
    assert os.listdir(tmp_path / "segment_head") == ["30"]
    resumed = segment.evaluate_segmentation(
        backbone, f"voc:{voc}", mesh=mesh, settings=settings, workdir=workdir, progress=False
    )
    assert resumed["mIoU"] == result["mIoU"] and resumed["per_class"] == result["per_class"]
    other = segment.segment_settings(family, f"voc:{voc}", **SMALL, **{**overrides, "lr": 0.1})
    with pytest.raises(
        ValueError, match="written by another evaluation \\(lr: saved 0.2, now 0.1\\): delete that folder"
    ):
        segment.evaluate_segmentation(
            backbone, f"voc:{voc}", mesh=mesh, settings=other, workdir=workdir, progress=False
        )


def segment_config(**overrides) -> ml_collections.ConfigDict:
    """config.eval.segment of the default config with overrides."""
    c = default_config().eval.segment
    c.update(overrides)
    return c


def test_run_reads_the_config_and_writes_results(voc, tmp_path):
    config = default_config()
    config.model.arch = "resnet_test"
    config.eval.segment = segment_config(
        dataset=f"voc:{voc}", protocol="fast", steps=20, batch_size=16, eval_batch_size=16, fast_image_size=64, lr=0.05
    )
    results = segment.run(config, str(tmp_path), random_init=True)
    written = json.loads((tmp_path / "eval_segment.json").read_text())
    assert written["mIoU"] == pytest.approx(results["mIoU"]) and written["protocol"] == "fast"
    assert written["scored_at"] == "64x64" and "random initialisation" in written["weights"]
    assert written["settings"]["split"] == "val" and written["settings"]["optimizer"] == "sgd"
    assert results["mIoU"] > 0
    config.eval.segment.dataset = None
    with pytest.raises(ValueError, match="set config.eval.segment.dataset"):
        segment.run(config, str(tmp_path), random_init=True)
    config.eval.segment = segment_config(dataset=f"voc:{voc}", num_classes=21)
    with pytest.raises(
        ValueError,
        match="eval.segment.num_classes is not a segmentation "
        "setting \\(the class count comes from the dataset's layout\\)",
    ):
        segment.run(config, str(tmp_path), random_init=True)
    config.eval.segment = segment_config(dataset=f"voc:{voc}")
    config.eval.segment.inference = "sliding"
    with pytest.raises(ValueError, match="segment inference='sliding': use one of"):
        segment.run(config, str(tmp_path), random_init=True)


# ------------------------------------------------------- the backbone a workdir holds


@pytest.fixture(scope="module")
def convnext_workdir(tmp_path_factory):
    """A workdir holding a convnext_test (written by `convert from-torch`, its saved config
    at the default compute settings)."""
    root = tmp_path_factory.mktemp("convnext_workdir")
    pth = str(root / "backbone.pth")
    backbone = create_backbone("convnext_test", rngs=nnx.Rngs(0))
    torch_io.write_torch_weights(layout.to_torch_state_dict(backbone, "convnext_test"), pth)
    convert.main(["from-torch", pth, str(root / "run"), "--arch", "convnext_test"])
    return str(root / "run")


def captured_run(config, workdir, monkeypatch) -> dict:
    """Runs segment.run up to the evaluation, which it captures (backbone, settings, arch)
    instead of training a head."""
    seen = {}

    def capture(backbone, dataset, *, settings, arch, **_):
        seen.update(backbone=backbone, settings=settings, arch=arch)
        return {"mIoU": 0.0, "aAcc": 0.0, "mAcc": 0.0, "per_class": {"background": {"IoU": None, "Acc": None}}}

    monkeypatch.setattr(segment, "evaluate_segmentation", capture)
    segment.run(config, workdir)
    return seen


def test_compute_settings_apply_to_a_workdir_backbone(voc, convnext_workdir, monkeypatch):
    """The weights come from the workdir, the compute settings (dtype, remat; unroll_blocks
    with them) from the evaluation's config, as they do for a release file."""
    config = default_config()
    config.model.arch = "convnext_test"
    config.model.dtype, config.model.remat, config.model.unroll_blocks = "bfloat16", "none", False
    config.eval.segment = segment_config(dataset=f"voc:{voc}")
    backbone = captured_run(config, convnext_workdir, monkeypatch)["backbone"]
    stages = backbone.stage_maps(jnp.zeros((1, 32, 32, 3), jnp.float32))  # what the head reads
    assert backbone.dtype == jnp.bfloat16 and {x.dtype for x in stages} == {jnp.dtype(jnp.bfloat16)}
    assert backbone.remat == "none"
    stored = nnx.state(backbone, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(stored)} == {jnp.dtype(jnp.float32)}  # the weights as saved


def test_segmentation_lr_follows_the_loaded_backbone_s_arch(voc, convnext_workdir, monkeypatch):
    """ConvNeXt-XL's lr (8e-5) is the loaded backbone's to get: a convnext_test loaded from a
    workdir under a config naming convnext_xlarge gets the other ConvNeXts' 1e-4."""
    config = default_config()
    config.model.arch = "convnext_xlarge"
    config.eval.segment = segment_config(dataset=f"voc:{voc}")
    seen = captured_run(config, convnext_workdir, monkeypatch)
    assert seen["arch"] == "convnext_test"
    assert seen["settings"].lr == 1e-4 and seen["settings"].optimizer == "adamw"
    assert segment.segment_settings("convnext", f"voc:{voc}", arch="convnext_xlarge").lr == 8e-5
