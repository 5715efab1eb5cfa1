"""Semantic segmentation data as mmsegmentation prepares it (evaluate/segment.py trains and scores on it).

layouts.py      the dataset layouts (VOC, ADE20K, Cityscapes), their file lists and masks
crops.py        the keep-ratio rescale, OpenCV's resizes, the class-balanced crop, windows
photometric.py  the photometric distortion with OpenCV's 8-bit HSV arithmetic
draws.py        the layout of a training example's uniform draws
iterators.py    the training, evaluation and resized iterators, on the shared position stream
"""

from vicregl_jax.data.segmentation.crops import (
    MEAN_RGB,
    STD_RGB,
    normalise,
    random_crop,
    rescale_size,
    resize_image,
    resize_mask,
    slide_windows,
)
from vicregl_jax.data.segmentation.iterators import (
    EvalChunk,
    eval_chunks,
    make_eval_iterator,
    make_resized_iterator,
    make_train_iterator,
    split_source,
)
from vicregl_jax.data.segmentation.layouts import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    IGNORE_LABEL,
    LAYOUTS,
    VOC_CLASSES,
    Layout,
    SegmentationSplit,
    decode_mask,
    image_size,
    image_sizes,
    open_split,
    parse_dataset,
    read_mask,
)
from vicregl_jax.data.segmentation.photometric import hsv_uint8_to_rgb, photometric_distortion, rgb_to_hsv_uint8

__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "IGNORE_LABEL",
    "LAYOUTS",
    "MEAN_RGB",
    "STD_RGB",
    "VOC_CLASSES",
    "EvalChunk",
    "Layout",
    "SegmentationSplit",
    "decode_mask",
    "eval_chunks",
    "hsv_uint8_to_rgb",
    "image_size",
    "image_sizes",
    "make_eval_iterator",
    "make_resized_iterator",
    "make_train_iterator",
    "normalise",
    "open_split",
    "parse_dataset",
    "photometric_distortion",
    "random_crop",
    "read_mask",
    "rescale_size",
    "resize_image",
    "resize_mask",
    "rgb_to_hsv_uint8",
    "slide_windows",
    "split_source",
]
