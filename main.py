"""vicregl-jax entry point: parses flags and calls one function per mode.

    python main.py --config=configs/r50.py --workdir=DIR                 # pre-train
    python main.py --config=configs/r50.py:alpha=0.9 --workdir=DIR       # a config variant
    python main.py --config=configs/r50.py --workdir=DIR --config.batch_size=1024 --config.optim.base_lr=0.3
    python main.py --config=configs/demo.py --workdir=runs/demo          # laptop demo, offline
    python main.py --config=configs/r50.py --workdir=DIR --mode=knn      # evaluate DIR's model

An error of ours (a bad value, a missing or damaged file, a diverged run, a locked workdir)
prints one line and exits with status 1; --verbosity=1 shows its traceback. A run stopped by
a preemption notice exits with status 75 after saving, so that the launchers restart it.
"""

import os
import sys

# TensorFlow's gs:// file system logs each request it retries (a bucket's 429 / 503 / dropped
# connection) only at this verbosity; read when TensorFlow loads, so set before any import.
os.environ.setdefault("TF_CPP_VMODULE", "retrying_utils=1")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vicregl_jax import build, checkpoint, config_files, convert, coordination, demo, distributed, train  # noqa: E402
from vicregl_jax import workdir as workdir_lib  # noqa: E402
from vicregl_jax.evaluate import correspond, knn, linear, segment  # noqa: E402

MODES = {"knn": knn.run, "linear": linear.run, "segment": segment.run, "correspond": correspond.run}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant,...]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_MODE = flags.DEFINE_enum(
    "mode", None, ["pretrain", *MODES, "export", "demo"], "What to run; default: the config's `mode` (pretrain)."
)
_WEIGHTS = flags.DEFINE_string(
    "weights",
    None,
    "Evaluate these weights (a workdir, a PyTorch .pth of the release, or release:NAME, a published "
    "model by name) instead of --workdir's.",
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    distributed.MODES,
    "jax.distributed: auto (when SLURM, a Cloud TPU pod slice or the coordinator flags make this one of "
    "several processes), on (always), off (never; refused as one of several).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host GPU without SLURM)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host GPU without SLURM).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host GPU without SLURM).")
flags.mark_flags_as_required(["config", "workdir"])


def check_overrides(argv) -> None:
    """Exits with one line when a --config.<key> override names no key of the config file."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None or not any(a.startswith("--config.") for a in argv):
        return
    try:
        config_files.check_override_names(argv, config_files.load(path))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


def user_errors() -> tuple[type[BaseException], ...]:
    """Returns the exception types that are a user's to fix: printed as one line, no traceback."""
    errors = [
        ValueError,
        FileNotFoundError,
        train.NonFiniteLossError,
        distributed.LaunchError,
        coordination.PeerFailureError,
        checkpoint.CheckpointError,
        workdir_lib.WorkdirLockedError,
    ]
    # The input pipeline's errors; its module imports TensorFlow, so it is looked up only if
    # this run imported it (it raised nothing otherwise).
    pipeline = sys.modules.get("vicregl_jax.data.iterator")
    if pipeline is not None:
        errors.append(pipeline.PipelineError)
    return tuple(errors)


def one_line(error: BaseException) -> str:
    """Returns an error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save at INFO, over the progress bar; --verbosity=0 brings it back.
        logging.set_verbosity(logging.WARNING)
    try:
        run_mode()
    except Exception as error:
        if verbose or not isinstance(error, user_errors()):
            raise
        sys.exit(f"error: {one_line(error)}")


def run_mode():
    """Runs what --mode asks for (exits with REQUEUE_EXIT_CODE after a preemption save)."""
    config = _CONFIG.value
    distributed.start(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    workdir = _WORKDIR.value
    mode = _MODE.value or config.get("mode", "pretrain")
    build.check_config(config, mode, workdir=workdir)  # the one check, before anything is written or read
    distributed.enable_compilation_cache(config.compilation_cache_dir, workdir)
    logging.info("mode=%s workdir=%s", mode, workdir)
    if mode == "pretrain":
        result = train.train_and_evaluate(config, workdir, check=False)
        if result.stopped_early:  # SIGTERM: a checkpoint was saved; the launchers restart the run
            if jax.process_count() > 1:
                jax.distributed.shutdown()  # every process past its save before any exits
            sys.exit(distributed.REQUEUE_EXIT_CODE)
    elif mode == "export":
        convert.export_torch(workdir, _WEIGHTS.value)
    elif mode == "demo":
        demo.run_demo(config, workdir, check=False)
    else:
        MODES[mode](config, workdir, _WEIGHTS.value, check=False)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    app.run(main)
