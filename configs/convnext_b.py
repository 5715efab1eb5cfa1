"""VICRegL with a ConvNeXt-B on ImageNet-1k (the ConvNeXt recipe of configs/convnext_s.py).

    python main.py --config=configs/convnext_b.py --workdir=gs://BUCKET/vicregl_cnxb

Meant for 16 GPUs / a v4-32 TPU slice (batch 576, AdamW, base lr 5e-4, 2 x 224 + 6 x 96).
Aims at the released ImageNet linear top-1 of 76.3 (alpha 0.75) / 77.1 (alpha 0.9) and VOC
frozen linear mIoU 70.4 / 69.3.
"""

from vicregl_jax.config import apply_arg, convnext_recipe


def get_config(arg=None):
    return apply_arg(convnext_recipe("convnext_base"), arg)
