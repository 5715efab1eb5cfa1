"""VICRegL with a ConvNeXt-S on ImageNet-1k: the release's 400-epoch multi-crop recipe.

    python main.py --config=configs/convnext_s.py --workdir=gs://BUCKET/vicregl_cnxs
    python main.py --config=configs/convnext_s.py:alpha=0.9 --workdir=gs://BUCKET/vicregl_cnxs_a09

Meant for 16 GPUs / a v4-32 TPU slice (global batch 576, AdamW, base lr 5e-4, weight decay
0.05, drop path 0.1, 2 x 224 at 0.4-1 + 6 x 96 at 0.08-0.4). Aims at the released ImageNet
linear top-1 of 74.6 (alpha 0.75) / 75.9 (alpha 0.9), VOC frozen linear mIoU 67.5 / 66.7.
The release's single-node variant: `:epochs=100,batch_size=384,base_lr=0.00075` (8 GPUs).
"""

from vicregl_jax.config import apply_arg, convnext_recipe


def get_config(arg=None):
    return apply_arg(convnext_recipe("convnext_small"), arg)
