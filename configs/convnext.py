"""VICRegL with a ConvNeXt (S, B or XL): the release's multi-crop recipe.

    python main.py --config=configs/convnext.py:size=s --workdir=gs://BUCKET/vicregl_cnxs
    python main.py --config=configs/convnext.py:size=b,alpha=0.9 --workdir=gs://BUCKET/vicregl_cnxb_a09

The recipe: AdamW, base lr 5e-4 at global batch 576, weight decay 0.05, drop path 0.1, no
layer scale, 2 x 224 at scale 0.4-1 + 6 x 96 at 0.08-0.4, 400 epochs on ImageNet-1k; meant
for 16 GPUs / a v4-32 TPU slice (S, B). Released results (ImageNet linear top-1 / VOC frozen
linear mIoU): S 74.6 / 67.5 (alpha 0.75), 75.9 / 66.7 (0.9); B 76.3 / 70.4, 77.1 / 69.3.
size=xl pre-trains on ImageNet-22k, which is not in TFDS: give a folder with one sub-folder
per class, on gs:// for a TPU pod (the run refuses to start without it), and write its file
list once so that no host walks 14M files:

    gcloud storage ls -r 'gs://BUCKET/imagenet22k/**' > listing.txt
    python -m vicregl_jax.data.manifest gs://BUCKET/imagenet22k --listing=listing.txt
    launch/tpu_pod.sh run configs/convnext.py:size=xl gs://BUCKET/vicregl_cnxxl \
        --config.data.dataset=folder:gs://BUCKET/imagenet22k

21841 classes, parameters FSDP-sharded, 100 epochs (the release does not publish its
ImageNet-22k schedule: our choice). Aims at the released ImageNet-1k linear top-1 of 79.4
and VOC mIoU 78.7 (alpha 0.75).
Variants: size (s | b | xl), alpha (0.75 | 0.9), schedule "400ep" or "100ep" (the release's
single-node S run: 8 GPUs, batch 384, base lr 7.5e-4, 100 epochs).
"""

from ml_collections import config_dict

from vicregl_jax.config import default_config
from vicregl_jax.config_files import parse_variant

ARCH = {"s": "convnext_small", "b": "convnext_base", "xl": "convnext_xlarge"}


def get_config(arg=None):
    v = parse_variant(arg, size="s", alpha=0.75, schedule="400ep")
    if v.size not in ARCH:
        raise ValueError(f"configs/convnext.py:size={v.size!r}: use one of {', '.join(ARCH)}")
    c = default_config()
    c.model.arch = ARCH[v.size]
    c.model.drop_path_rate = 0.1
    c.loss.alpha = v.alpha
    c.data.crops = ((224, 2, 0.4, 1.0), (96, 6, 0.08, 0.4))
    c.optim.name = "adamw"
    c.optim.weight_decay = 0.05
    c.optim.base_lr = 0.0005
    c.batch_size = 576
    c.epochs = 400
    if v.size == "xl":
        c.data.dataset = config_dict.placeholder(str)  # required: your copy of ImageNet-22k (see above)
        c.model.num_classes = 21841
        c.mesh.param_sharding = "fsdp"
        c.epochs = 100
    if v.schedule == "100ep":
        c.epochs, c.batch_size, c.optim.base_lr = 100, 384, 0.00075
    elif v.schedule != "400ep":
        raise ValueError(f"configs/convnext.py:schedule={v.schedule!r}: use 400ep or 100ep")
    return c
