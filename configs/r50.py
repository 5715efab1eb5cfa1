"""VICRegL with a ResNet-50 on ImageNet-1k: the release's 300-epoch recipe.

    python main.py --config=configs/r50.py --workdir=gs://BUCKET/vicregl_r50 \
        --config.data.manual_dir=gs://BUCKET/imagenet_manual --config.data.data_dir=gs://BUCKET/tfds
    python main.py --config=configs/r50.py:alpha=0.9 --workdir=gs://BUCKET/vicregl_r50_a09
    python main.py --config=configs/r50.py:schedule=100ep --workdir=/ckpt/vicregl_r50_100ep

Meant for 32 GPUs / a v4-64 or v5e-64 TPU slice (global batch 2048, LARS, base lr 0.2,
2 views of 224 at scale 0.08-1). Aims at the released ImageNet linear top-1 of 70.4
(alpha 0.75) / 71.2 (alpha 0.9) and Pascal VOC frozen linear mIoU 55.9 / 54.0.
Variants: alpha (0.75 | 0.9); schedule "300ep" (the default above) or "100ep", the release's
single-node run (8 GPUs: batch 512, base lr 0.3, 100 epochs).
ImageNet comes from TFDS `imagenet2012` with the manual download in config.data.manual_dir.
The defaults of vicregl_jax/config.py are this recipe; only the variants change it.
"""

from vicregl_jax.config import default_config
from vicregl_jax.config_files import parse_variant


def get_config(arg=None):
    v = parse_variant(arg, alpha=0.75, schedule="300ep")
    c = default_config()
    c.loss.alpha = v.alpha
    if v.schedule == "100ep":
        c.epochs, c.batch_size, c.optim.base_lr = 100, 512, 0.3
    elif v.schedule != "300ep":
        raise ValueError(f"configs/r50.py:schedule={v.schedule!r}: use 300ep or 100ep")
    return c
