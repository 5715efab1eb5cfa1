"""A laptop demo, offline: VICRegL on the photos that ship with scikit-image / scikit-learn.

    python main.py --config=configs/demo.py --workdir=runs/demo

Pre-trains a small ResNet on the embedded photos (CPU, a few minutes), then evaluates it and
the same architecture at random initialisation side by side (kNN and linear on the embedded
digits, correspondence on the photos), writes pictures, exports PyTorch weights, and prints
a summary. Not a result to compare with the paper: a check that everything runs end to end.
"""

from vicregl_jax.config import apply_arg, default_config


def get_config(arg=None):
    c = default_config()
    c.mode = "demo"
    c.dataset = "vicregl_photos"
    c.num_classes = 1
    c.arch = "resnet_test"
    c.crops = ((96, 2, 0.3, 1.0), (64, 2, 0.1, 0.4))
    c.num_matches = (6, 2)
    c.mlp = "256-256"
    c.maps_mlp = "128-128"
    c.batch_size = 32
    # AdamW moves a small network much further than LARS in a few hundred steps.
    c.optimizer = "adamw"
    c.base_lr = 0.01
    c.weight_decay = 0.05
    c.epochs = 250  # 76 photos: 2 steps an epoch, 500 steps
    c.warmup_epochs = 5
    c.compute_dtype = "float32"
    c.checkpoint_every_steps = 100
    c.log_every_steps = 10
    # Evaluations: digits upsampled to 64 px; linear on cached features (fast mode).
    c.eval_dataset = "vicregl_digits"
    c.eval_split = "test"
    c.eval_image_size = 64
    c.eval_resize_size = 64
    c.linear_mode = "fast"
    c.linear_epochs = 30
    c.correspond_crop_size = 160
    c.correspond_pairs = 256
    return apply_arg(c, arg)
