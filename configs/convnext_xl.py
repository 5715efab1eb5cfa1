"""VICRegL with a ConvNeXt-XL on ImageNet-22k, parameters sharded FSDP-style.

    python main.py --config=configs/convnext_xl.py --workdir=gs://BUCKET/vicregl_cnxxl \
        --config.dataset=folder:/data/imagenet22k

Meant for a v4-64 TPU slice or 32+ GPUs (batch 576, AdamW, 2 x 224 + 6 x 96). The 350M
parameters, their AdamW moments and the 8192-wide expander are split over the data axis
(param_sharding="fsdp"). The release does not publish its ImageNet-22k schedule:
the 100 epochs here are our choice. Aims at the released ImageNet-1k linear top-1 of 79.4 and VOC
frozen linear mIoU 78.7 (alpha 0.75). ImageNet-22k is not in TFDS: give a folder with one
sub-folder per class (`folder:PATH`); num_classes is its 21841 classes.
"""

from vicregl_jax.config import apply_arg, convnext_recipe


def get_config(arg=None):
    c = convnext_recipe("convnext_xlarge")
    c.dataset = "folder:/data/imagenet22k"
    c.num_classes = 21841
    c.param_sharding = "fsdp"
    c.epochs = 100
    return apply_arg(c, arg)
