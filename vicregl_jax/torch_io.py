"""PyTorch weight files of the release's layout, read and written without running their code.

  read_torch_weights(path) -> dict[str, np.ndarray]    .pth / .pt (backbone file or checkpoint)
                                                       or .safetensors
  write_torch_weights(state_dict, path, *, epoch=None, safetensors=False) -> list[str]

torch is imported here only, and only when a .pth file is read or written.

Reading never executes code from a file. `torch.load(weights_only=True)` refuses any pickled
global outside tensors and plain containers, and so refuses the release's own training
checkpoints whole: their optimiser state (LARS) pickles a reference to a function. Such
references are listed first (`get_unsafe_globals_in_checkpoint`, which reads the pickle
without running it) and each is replaced by an inert placeholder that does nothing when
called; the `"optimizer"` entry is then dropped. Modules torch blocks outright (os, posix,
subprocess, ...) keep the file refused.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Mapping

import numpy as np
from etils import epath

from vicregl_jax import safe_io

TORCH_SUFFIXES = (".pth", ".pt", ".safetensors")  # the files read_torch_weights reads


def _inert(*args, **kwargs):
    """Stands for any global a checkpoint references: calling it does nothing."""
    return None


def _load_pth(path: str):
    """Returns the unpickled object of a .pth file, with unknown globals made inert."""
    import torch

    try:
        # The globals can be listed only in torch's zip format; a file of the older format
        # (torch.save(..., _use_new_zipfile_serialization=False)) loads with weights_only as it is.
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipfile.is_zipfile(path) else []
        with torch.serialization.safe_globals([(_inert, name) for name in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, KeyError, OSError) as error:
        # torch's own message suggests weights_only=False (running the file's code): never
        # pass that on; say what is wrong instead.
        reason = str(error).strip().splitlines()
        blocked = [line for line in reason if "GLOBAL" in line]
        detail = blocked[0].strip() if blocked else (reason[0] if reason else type(error).__name__)
        if blocked:
            raise ValueError(
                f"{path}: refused: the file references code that reading it would run ({detail}). "
                "It is not a plain checkpoint; export the weights again as a state_dict of tensors."
            ) from None
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {detail[:200]}); "
            "the file may be truncated or damaged: download or export it again."
        ) from None


def read_torch_weights(path: str) -> dict[str, np.ndarray]:
    """Returns the state_dict in a .pth (backbone or full checkpoint) or .safetensors file.

    A full checkpoint ({"epoch", "model", "optimizer"}) gives its "model" entry (keys still
    with ``module.``); its optimiser state is ignored. Raises ValueError naming the file for
    a damaged file, one that is not a state_dict, or non-finite weights.
    """
    path = str(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a weights file: give the .pth / .pt / .safetensors file in it.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: give a .pth / .pt / .safetensors weights file.")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            weights = dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"{path}: not a readable .safetensors file ({error}); it may be truncated: download or export it again."
            ) from None
    else:
        import torch

        obj = _load_pth(path)
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
        if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(
                f"{path}: not a state_dict nor a checkpoint with a 'model' state_dict "
                "(expected a mapping of names to tensors)."
            )
        weights = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}
    bad = [k for k, v in weights.items() if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} tensors hold NaN or Inf (e.g. {', '.join(sorted(bad)[:3])}): "
            "these weights come from a diverged run; use an earlier checkpoint."
        )
    return weights


def write_torch_weights(
    state_dict: Mapping[str, np.ndarray], path: str, *, epoch: int | None = None, safetensors: bool = False
) -> list[str]:
    """Writes a .pth (a plain state_dict, or {"epoch", "model"} when epoch is given) and,
    if safetensors, the tensors beside it as .safetensors; returns the paths written."""
    import torch

    # np.require keeps 0-d arrays 0-d (num_batches_tracked); np.ascontiguousarray would make them 1-d.
    tensors = {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in state_dict.items()}
    obj = tensors if epoch is None else {"epoch": int(epoch), "model": tensors}
    written = [str(path)] + ([os.path.splitext(str(path))[0] + ".safetensors"] if safetensors else [])
    if "://" in str(path):
        # Through etils epath (os.makedirs would make a local folder named "gs:"); an object
        # store's upload is whole or absent, so no temporary file.
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payloads = [buffer.getvalue()]
        if safetensors:
            from safetensors.torch import save

            payloads.append(save(tensors))
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        for out, payload in zip(written, payloads):
            epath.Path(out).write_bytes(payload)
        return written
    for out in written:
        check_output_file(out)

    def save_safetensors(tmp: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, tmp)

    writers = [lambda tmp: torch.save(obj, tmp), save_safetensors]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        for out, write in zip(written, writers):
            # Each file whole or not at all (a full disk, a kill): a temporary file, then a rename.
            safe_io.write_with(out, write)
    except safe_io.DiskFullError:
        raise
    except OSError as error:  # a read-only file system, a path the system refuses
        raise ValueError(
            f"{path}: cannot write it ({error.strerror or error}): give a path in a folder you can write to."
        ) from None
    return written


def check_output_file(path: str) -> None:
    """Raises ValueError naming path and the fix when a file cannot be written there: it is a
    folder, a file stands where a folder above it should be, or that folder is not writable."""
    if os.path.isdir(path):
        example = os.path.join(path, "model.pth")
        raise ValueError(f"{path} is a folder: give the path of the file to write, e.g. {example}.")
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{path}: {probe} is a file, not a folder: give a path whose folders are folders.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: {probe} is not writable (read-only or another user's): give a path you can write.")
