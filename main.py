"""vicregl-jax entry point: parses flags and calls one function per mode.

    python main.py --config=configs/r50.py --workdir=DIR                 # pre-train
    python main.py --config=configs/r50.py:alpha=0.9 --workdir=DIR       # a config variant
    python main.py --config=configs/demo.py --workdir=runs/demo          # laptop demo, offline
    python main.py --config=configs/r50.py --workdir=DIR --mode=knn      # evaluate DIR's model
"""

from absl import app, flags, logging
from ml_collections import config_flags

from vicregl_jax import sharding

MODES = ("pretrain", "linear", "knn", "segment", "correspond", "export", "demo")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:key=value,...]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_MODE = flags.DEFINE_enum("mode", None, MODES, "What to run; default: the config's `mode` (pretrain).")
_WEIGHTS = flags.DEFINE_string("weights", None, "Evaluate these weights (a workdir or a PyTorch .pth of the release) instead of --workdir's.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host GPU without SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host GPU without SLURM).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host GPU without SLURM).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save at INFO, over the progress bar; --verbosity=0 brings it back.
        logging.set_verbosity(logging.WARNING)
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    mode = _MODE.value or config.get("mode", "pretrain")
    logging.info("mode=%s workdir=%s", mode, _WORKDIR.value)
    if mode == "pretrain":
        from vicregl_jax import train

        train.train_and_evaluate(config, _WORKDIR.value)
    else:
        from vicregl_jax import evaluate

        evaluate.run(mode, config, _WORKDIR.value, weights=_WEIGHTS.value)


if __name__ == "__main__":
    app.run(main)
