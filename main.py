"""vicregl-jax entry point: parses flags and calls one function per mode.

    python main.py --config=configs/r50.py --workdir=DIR                 # pre-train
    python main.py --config=configs/r50.py:alpha=0.9 --workdir=DIR       # a config variant
    python main.py --config=configs/r50.py --workdir=DIR --config.batch_size=1024 --config.optim.base_lr=0.3
    python main.py --config=configs/demo.py --workdir=runs/demo          # laptop demo, offline
    python main.py --config=configs/r50.py --workdir=DIR --mode=knn      # evaluate DIR's model

An error of ours (a bad value, a missing or damaged file, a diverged run, a locked workdir)
prints one line and exits with status 1; --verbosity=1 shows its traceback. A run stopped by
a preemption notice (SIGTERM) exits with status 75 after saving, so that the launchers restart
it; Ctrl-C exits with status 130, also resumable.
"""

import os
import signal
import sys

# TensorFlow's gs:// file system logs each request it retries (a bucket's 429 / 503 / dropped
# connection) only at this verbosity; read when TensorFlow loads, so set before any import.
os.environ.setdefault("TF_CPP_VMODULE", "retrying_utils=1")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vicregl_jax import (  # noqa: E402
    build,
    checkpoint,
    config_files,
    convert,
    coordination,
    demo,
    distributed,
    library_logs,
    safe_io,
    train,
)
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
# An empty --workdir (an unset $WORKDIR) would train in the current directory.
flags.register_validator("workdir", lambda value: value is None or bool(value.strip()), workdir_lib.EMPTY_WORKDIR)
config_files.allow_none_overrides()


def config_argument(argv) -> str | None:
    """Returns the value of the last --config (as --config=X or --config X) in argv, as absl
    reads it, or None."""
    found = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            found = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
    return found


def check_overrides(argv) -> None:
    """Exits with one line when --config names no config file, a variant the file refuses, or a
    --config.<key> override names no key of the config file (or gives None to one that needs a value)."""
    path = config_argument(argv)
    if path is None:
        return
    try:
        config_files.check_override_names(argv, config_files.load(path))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {one_line(error)}")


def parse_flags(argv):
    """Parses the flags as absl does; a flag error prints one `error:` line, as every other error."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {one_line(error)} (see --helpfull for the flags)")


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
        safe_io.DiskFullError,
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
    if verbose:  # the libraries' own tracebacks too (Orbax's unawaited tasks around a damaged checkpoint)
        os.environ[library_logs.LIBRARY_TRACEBACKS_ENV] = "1"
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save at INFO, over the progress bar; --verbosity=0 brings it back.
        logging.set_verbosity(logging.WARNING)
    try:
        run_mode()
    except KeyboardInterrupt:  # Ctrl-C outside pre-training's handler (flags, checks, evaluations)
        if verbose:
            raise
        print("stopped (Ctrl-C).", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as error:
        if not verbose and safe_io.is_disk_full(error) and not isinstance(error, safe_io.DiskFullError):
            error = safe_io.disk_full_error(getattr(error, "filename", None) or _WORKDIR.value)
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
        if result.stopped_early:  # SIGTERM (75: the launchers restart the run) or Ctrl-C (130), resumable
            if jax.process_count() > 1:
                jax.distributed.shutdown()  # every process past its save before any exits
            sys.exit(result.exit_code)
    elif mode == "export":
        convert.export_torch(workdir, _WEIGHTS.value)
    elif mode == "demo":
        summary = demo.run_demo(config, workdir, check=False)
        if "exit_code" in summary:  # stopped by a signal during its pre-training
            sys.exit(summary["exit_code"])
    else:
        MODES[mode](config, workdir, _WEIGHTS.value, check=False)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    app.run(main, flags_parser=parse_flags)
