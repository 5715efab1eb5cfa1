"""A laptop demo, offline: VICRegL on the photos that ship with scikit-image / scikit-learn.

    python main.py --config=configs/demo.py --workdir=runs/demo

Pre-trains a small ResNet on the embedded photos (CPU, a few minutes), then evaluates it and
the same architecture at random initialisation side by side (kNN and linear on the embedded
digits, correspondence on the photos), writes pictures, exports PyTorch weights, and prints
a summary. Not a result to compare with the paper: a check that everything runs end to end.
"""

from vicregl_jax.config import default_config


def get_config(arg=None):
    del arg  # no variants
    c = default_config()
    c.mode = "demo"
    c.data.dataset = "vicregl_photos"
    c.data.crops = ((96, 2, 0.3, 1.0), (64, 2, 0.1, 0.4))
    c.model.arch = "resnet_test"
    c.model.num_classes = 1
    c.model.mlp = "256-256"
    c.model.maps_mlp = "128-128"
    c.model.dtype = "float32"
    c.loss.num_matches = (6, 2)
    c.batch_size = 32
    # AdamW moves a small network much further than LARS in a few hundred steps.
    c.optim.name = "adamw"
    c.optim.base_lr = 0.01
    c.optim.weight_decay = 0.05
    c.optim.warmup_epochs = 5
    c.epochs = 250  # 76 photos: 2 steps an epoch, 500 steps
    c.checkpoint.every_steps = 100
    c.log_every_steps = 10
    # Evaluations: digits upsampled to 64 px; linear on cached features (fast mode).
    c.eval.dataset = "vicregl_digits"
    c.eval.split = "test"
    c.eval.image_size = 64
    c.eval.resize_size = 64
    c.eval.linear.mode = "fast"
    c.eval.linear.epochs = 30
    c.eval.correspond.crop_size = 160
    c.eval.correspond.pairs = 256
    return c
