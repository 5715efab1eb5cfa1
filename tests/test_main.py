"""main.py: one line and a non-zero status for every error of ours, nothing written before
the checks."""

import os
import re
import subprocess
import sys

import pytest
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


def test_flag_and_config_file_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch):
    """In process: main.py's checks of its command line, before app.run calls main()."""
    sys.path.insert(0, ROOT)
    try:
        import main as entry
    finally:
        sys.path.remove(ROOT)
    monkeypatch.chdir(tmp_path)
    demo, convnext = os.path.join(ROOT, "configs", "demo.py"), os.path.join(ROOT, "configs", "convnext.py")
    cases = {
        "empty workdir": ([f"--config={demo}", "--workdir="], r"^error: .*--workdir is empty \(an unset"),
        "missing file": (["--config=configs/nope.py", "--workdir=x"], r"^error: configs/nope.py is not a config file"),
        "bad variant": ([f"--config={convnext}:size=q", "--workdir=x"], r"^error: .*size='q': use one of s, b, xl$"),
        "absl flag": ([f"--config={demo}", "--workdir=x", "--nosuch"], r"^error: Unknown command line flag 'nosuch'"),
        "None for a value": (
            [f"--config={demo}", "--workdir=x", "--config.batch_size=None"],
            r"^error: config.batch_size=None: config.batch_size needs a value",
        ),
    }

    def parse(argv):  # ml_collections reads the overrides off sys.argv
        monkeypatch.setattr(sys, "argv", ["main.py", *argv])
        entry.check_overrides(argv)
        entry.parse_flags(sys.argv)

    for name, (argv, pattern) in cases.items():
        with pytest.raises(SystemExit) as stop:
            parse(argv)
        message = str(stop.value.code)
        assert re.search(pattern, message) and "\n" not in message, (name, message)
    # None where unset is the default: accepted.
    parse([f"--config={demo}", "--workdir=x", "--config.total_steps=None", "--config.data.num_examples=7"])
    assert entry._CONFIG.value.total_steps is None and entry._CONFIG.value.data.num_examples == 7
    assert os.listdir(tmp_path) == []  # not even in the current directory
