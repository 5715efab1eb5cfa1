"""VICRegL with a ResNet-50 on ImageNet-1k: the release's 300-epoch recipe (SPEC.md 4-5).

    python main.py --config=configs/r50.py --workdir=gs://BUCKET/vicregl_r50
    python main.py --config=configs/r50.py:alpha=0.9 --workdir=gs://BUCKET/vicregl_r50_a09

Meant for 32 GPUs / a v4-64 or v5e-64 TPU slice (global batch 2048, LARS, base lr 0.2,
2 views of 224 at scale 0.08-1). Aims at the released ImageNet linear top-1 of 70.4
(alpha 0.75) / 71.2 (alpha 0.9) and Pascal VOC frozen linear mIoU 55.9 / 54.0.
The release's single-node variant: `:epochs=100,batch_size=512,base_lr=0.3` (8 GPUs).
ImageNet comes from TFDS `imagenet2012` with the manual download in --config.manual_dir.
"""

from vicregl_jax.config import apply_arg, default_config


def get_config(arg=None):
    c = default_config()
    c.arch = "resnet50"
    c.dataset = "imagenet2012"
    c.num_classes = 1000
    c.crops = ((224, 2, 0.08, 1.0),)
    c.alpha = 0.75
    c.mlp = "8192-8192-8192"
    c.maps_mlp = "512-512-512"
    c.optimizer = "lars"
    c.batch_size = 2048
    c.base_lr = 0.2
    c.weight_decay = 1e-6
    c.epochs = 300
    c.warmup_epochs = 10
    return apply_arg(c, arg)
