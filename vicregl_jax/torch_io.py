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
    # Through etils epath: a gs:// workdir's export goes to the bucket (os.makedirs would make
    # a local folder named "gs:").
    target = epath.Path(path if "://" in str(path) else os.path.abspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    target.write_bytes(buffer.getvalue())
    written = [path]
    if safetensors:
        from safetensors.torch import save

        st_path = os.path.splitext(str(path))[0] + ".safetensors"
        target.with_suffix(".safetensors").write_bytes(save(tensors))
        written.append(st_path)
    return written
