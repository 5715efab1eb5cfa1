"""main.py: one line and a non-zero status for every error of ours, nothing written before
the checks."""

import os
import re
import subprocess
import sys

from test_train import worker_env

from vicregl_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_prints_one_line_for_our_errors(tmp_path):
    (tmp_path / "file").write_text("")
    empty_data = tmp_path / "tfds"
    empty_data.mkdir()
    holder = workdir_lib.WorkdirLock(tmp_path / "locked").acquire()  # a live run of this process
    base = [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        "--config=configs/demo.py",
        "--config.mode=pretrain",
        f"--config.data.data_dir={empty_data}",
    ]
    cases = {
        "file": ([f"--workdir={tmp_path / 'file'}"], r"--workdir=.*file: .*file is a file, not a folder"),
        "init": (
            [f"--workdir={tmp_path / 'a'}", f"--config.model.init_weights={tmp_path / 'missing.pth'}"],
            r"config.model.init_weights='.*missing.pth' does not exist",
        ),
        "locked": (
            [f"--workdir={tmp_path / 'locked'}"],
            rf"locked is in use by another run \(host .*, pid {os.getpid()}",
        ),
        "verbose": (
            [f"--workdir={tmp_path / 'b'}", "--config.total_steps=0", "--verbosity=1"],
            r"ValueError: config.total_steps=0: must be 1 or more",
        ),
    }
    procs = {
        name: subprocess.Popen(
            base + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=worker_env()
        )
        for name, (args, _) in cases.items()
    }
    try:
        errors = {name: proc.communicate(timeout=240)[1] for name, proc in procs.items()}
    finally:
        holder.release()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, proc in procs.items():
        err = errors[name]
        assert proc.returncode == 1, (name, err[-3000:])
        assert re.search(cases[name][1], err), (name, err[-3000:])
        if name == "verbose":
            assert "Traceback" in err
        else:
            assert "Traceback" not in err, (name, err[-3000:])
            assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
    # Nothing was written before the checks of the workdir and the values, and no data was set
    # up before the init_weights check.
    assert (tmp_path / "file").read_text() == "" and not (tmp_path / "b").exists()
    assert os.listdir(empty_data) == []
