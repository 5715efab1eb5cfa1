"""The layout of the authors' PyTorch release, mapped to and from our Flax models: pure
functions of arrays (no file I/O, no torch).

  to_torch_state_dict(model_or_state, arch, *, full=False) -> dict[str, np.ndarray]
  load_torch_state_dict(model, state_dict) -> tuple[str, ...]   (the parts loaded)
  infer_model_kwargs(state_dict) -> dict                         (of a full checkpoint)
  guess_architecture(shapes) -> str | None

Backbone files hold a plain state_dict with the torchvision ResNet names (without fc) or the
release's ConvNeXt names. Full checkpoints hold ``{"epoch", "model", "optimizer"}`` with model
keys ``module.backbone.*``, ``module.projector.{0,1,3,4,6}.*`` (the expander),
``module.maps_projector.*`` (the local projector) and ``module.classifier.*``. Conv kernels are
(kh, kw, in, out) in Flax, (out, in, kh, kw) in PyTorch; Dense (in, out), Linear (out, in).
BatchNorm's ``num_batches_tracked`` is written as 0 (PyTorch reads it only when momentum=None)
and ignored, or may be absent, when reading. Blocks that run as one scan keep their parameters
stacked (``stages.2.0.stacked.dwconv.kernel``, (27, 7, 7, 1, C)): block j of the stack at list
index i of its stage is the release's block i + j, whether or not a model scans.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vicregl_jax.models import ARCHITECTURES, abstract_backbone, backbone_norm
from vicregl_jax.sharding import STACKED

# Flax attribute of VICRegLModel -> the release's attribute of its VICRegL module.
PARTS = dict(backbone="backbone", expander="projector", local_projector="maps_projector", classifier="classifier")
_LEAVES = dict(kernel="weight", scale="weight", bias="bias", mean="running_mean", var="running_var", gamma="gamma")
DDP_PREFIX = "module."
_MAX_LISTED = 12


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One PyTorch tensor: its name, its Flax path (None: num_batches_tracked), kind."""

    name: str
    path: tuple | None
    kind: str  # "conv" | "linear" | "copy" | "counter"


# ----------------------------------------------------------------------------- layout


def _flat_weights(model_or_state: Any) -> dict[tuple, Any]:
    """Returns {path: array} of the parameters and batch statistics (no RNG state)."""
    if isinstance(model_or_state, nnx.Module):
        tree = nnx.to_pure_dict(nnx.state(model_or_state, (nnx.Param, nnx.BatchStat)))
    elif isinstance(model_or_state, nnx.State):
        tree = nnx.to_pure_dict(model_or_state)
    elif isinstance(model_or_state, Mapping):
        tree = model_or_state
    else:
        raise ValueError(
            f"cannot convert a {type(model_or_state).__name__}: pass an nnx Module, an nnx.State or its pure dict"
        )
    flat = {}

    def visit(node, path):
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, path + (key,))
        elif "rngs" not in path:  # drop path RNG streams are not weights
            flat[tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in path)] = node

    visit(tree, ())
    return flat


def _block_of(value: Any, j: int) -> Any:
    """Returns block j of a stacked array (a ShapeDtypeStruct gives one of the block's shape)."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
    return value[j]


def _unstack(flat: Mapping[tuple, Any]) -> tuple[dict[tuple, Any], dict[tuple, tuple[tuple, int]]]:
    """Returns (flat, origins): the flat state with every stacked leaf split into its blocks
    at the paths an unrolled model has, and {block path: (stacked path, block index)}."""
    out, origins = {}, {}
    for path, value in flat.items():
        if STACKED not in path:
            out[path] = value
            continue
        at = path.index(STACKED)
        first = path[at - 1]  # the stack's index in its stage's list: its first block's number
        for j in range(value.shape[0]):
            block_path = path[: at - 1] + (first + j,) + path[at + 1 :]
            out[block_path] = _block_of(value, j)
            origins[block_path] = (path, j)
    return out, origins


def _torch_entry(path: tuple, ndim: int, *, full: bool) -> _Entry:
    """Returns the PyTorch name and conversion kind of the Flax leaf at path."""
    leaf = path[-1]
    if leaf not in _LEAVES:
        raise ValueError(f"unexpected leaf {'.'.join(map(str, path))!r}: not a weight of a vicregl_jax model")
    parts = list(path[:-1])
    if full:
        if parts[0] not in PARTS:
            raise ValueError(f"unexpected module {parts[0]!r}: not a part of VICRegLModel")
        parts[0] = PARTS[parts[0]]
    names, i = [], 0
    while i < len(parts):
        # MLP: linears[i] / norms[i] are the release's Sequential indices 3i / 3i + 1.
        if parts[i] in ("linears", "norms") and i + 1 < len(parts):
            names.append(str(3 * int(parts[i + 1]) + (parts[i] == "norms")))
            i += 2
        else:
            names.append(str(parts[i]))
            i += 1
    kind = {4: "conv", 2: "linear"}.get(ndim, "copy") if leaf == "kernel" else "copy"
    return _Entry(".".join(names + [_LEAVES[leaf]]), path, kind)


def _layout(flat: Mapping[tuple, Any], *, full: bool) -> list[_Entry]:
    """Returns the PyTorch entries of a flat Flax state, in PyTorch's own order."""
    entries = []
    for path, value in flat.items():
        entry = _torch_entry(path, len(np.shape(value)), full=full)
        entries.append(entry)
        if path[-1] == "mean":
            prefix = entry.name.rsplit(".", 1)[0]
            entries.append(_Entry(prefix + ".num_batches_tracked", None, "counter"))
    return sorted(entries, key=lambda e: _natural_key(e.name))


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    if kind == "linear":
        return np.ascontiguousarray(value.T)
    return np.asarray(value)


def _from_torch(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "linear":
        return value.T
    return value


def _torch_shape(shape: tuple, kind: str) -> tuple:
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "linear":
        return (shape[1], shape[0])
    if kind == "counter":
        return ()
    return tuple(shape)


@functools.cache
def backbone_torch_shapes(arch: str, layer_scale: bool = False) -> dict[str, tuple]:
    """Returns {name: shape} of arch's backbone state_dict in the release's layout.

    Built abstractly (nnx.eval_shape): nothing is allocated, even for the largest
    models. layer_scale: ConvNeXt with layer scale (a ``gamma`` per block).
    """
    flat = _unstack(_flat_weights(abstract_backbone(arch, 1e-6 if layer_scale else 0.0)))[0]
    return {e.name: _torch_shape(flat[e.path].shape, e.kind) if e.path else () for e in _layout(flat, full=False)}


def _signature(shapes: Mapping[str, tuple]) -> dict | None:
    """Returns the constructor keywords that the names and shapes of a backbone imply."""

    def count(prefix):
        return len({k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)})

    if "conv1.weight" in shapes:
        return {
            "block": "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic",
            "stage_sizes": tuple(count(f"layer{i}.") for i in range(1, 5)),
            "width": shapes["conv1.weight"][0],
        }
    if "downsample_layers.0.0.weight" in shapes:
        return {
            "depths": tuple(count(f"stages.{i}.") for i in range(4)),
            "dims": tuple(shapes.get(f"downsample_layers.{i}.{min(i, 1)}.weight", (0,))[0] for i in range(4)),
        }
    return None


def guess_architecture(shapes: Mapping[str, tuple]) -> str | None:
    """Returns the registered backbone whose state_dict has exactly these names and shapes."""
    shapes = {k: tuple(v) for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
    signature = _signature(shapes)
    layer_scale = any(k.endswith(".gamma") for k in shapes)
    for arch, constructor in ARCHITECTURES.items():
        if signature is None or any(constructor.keywords.get(k) != v for k, v in signature.items()):
            continue
        if layer_scale and backbone_norm(arch) != "layer":
            continue
        expected = {
            k: v for k, v in backbone_torch_shapes(arch, layer_scale).items() if not k.endswith("num_batches_tracked")
        }
        if expected == shapes:
            return arch
    return None


def _listing(names: Iterable[str]) -> str:
    names = sorted(names, key=_natural_key)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _mismatch_error(what: str, missing, unexpected, wrong_shapes, hint: str = "") -> ValueError:
    lines = [f"{what} do not match" + (f"; {hint}" if hint else "") + ":"]
    if missing:
        lines.append(f"  missing: {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected: {_listing(unexpected)}")
    if wrong_shapes:
        shown = [f"{n} {a} vs {b}" for n, a, b in sorted(wrong_shapes, key=lambda t: _natural_key(t[0]))]
        more = f", ... ({len(shown)} in all)" if len(shown) > _MAX_LISTED else ""
        lines.append("  shapes (given vs expected): " + "; ".join(shown[:_MAX_LISTED]) + more)
    return ValueError("\n".join(lines))


def _compare(given: Mapping[str, tuple], expected: Mapping[str, tuple]):
    """Returns (missing, unexpected, wrong shapes); num_batches_tracked may be absent."""
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        (k, tuple(given[k]), tuple(expected[k]))
        for k in given
        if k in expected and tuple(given[k]) != tuple(expected[k])
    ]
    return missing, unexpected, wrong


def _architecture_hint(backbone_shapes: Mapping[str, tuple], arch: str | None) -> str:
    guess = guess_architecture(backbone_shapes)
    if guess is not None and guess != arch:
        return f"these are the weights of {guess!r}" + (f", not {arch!r}: use arch={guess!r}" if arch else "")
    if arch is None or guess == arch:
        return ""
    return f"check that the weights are those of {arch!r} (known: {', '.join(ARCHITECTURES)})"


def _split_full(flat: Mapping[tuple, Any]) -> tuple[dict, bool]:
    """Returns (the backbone's flat state, whether flat is a whole VICRegLModel state)."""
    if any(path[0] == "backbone" for path in flat):
        return {path[1:]: v for path, v in flat.items() if path[0] == "backbone"}, True
    return dict(flat), False


# ------------------------------------------------------------------------- Flax -> torch


def to_torch_state_dict(model_or_state: Any, arch: str, *, full: bool = False) -> dict[str, np.ndarray]:
    """Returns the release's state_dict (numpy arrays) of a Flax model or its state.

    model_or_state: a VICRegLModel or a backbone, an nnx.State of one, or its pure dict
    (e.g. restored by Orbax). With full=False, the backbone's state_dict (loadable with
    strict=True into the release's resnet/convnext); with full=True, the model entry of a
    release checkpoint: ``module.backbone.*``, ``module.projector.*``,
    ``module.maps_projector.*``, ``module.classifier.*``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    model_arch = getattr(model_or_state, "arch", arch)
    if model_arch != arch:
        raise ValueError(f"arch={arch!r} but the model is a {model_arch!r}: pass arch={model_arch!r}")
    flat = {path: np.asarray(jax.device_get(v)) for path, v in _flat_weights(model_or_state).items()}
    flat = _unstack(flat)[0]
    backbone_flat, is_full = _split_full(flat)
    if full and not is_full:
        raise ValueError(
            "full=True needs the state of a whole VICRegLModel (backbone and "
            "heads); this is a backbone's: use full=False"
        )
    # Check the backbone against the architecture before writing anything.
    entries = _layout(backbone_flat, full=False)
    shapes = {e.name: _torch_shape(backbone_flat[e.path].shape, e.kind) if e.path else () for e in entries}
    layer_scale = backbone_norm(arch) == "layer" and any(e.name.endswith(".gamma") for e in entries)
    expected = backbone_torch_shapes(arch, layer_scale)
    missing, unexpected, wrong = _compare(shapes, expected)
    if missing or unexpected or wrong:
        raise _mismatch_error(
            f"the Flax state and architecture {arch!r}", missing, unexpected, wrong, _architecture_hint(shapes, arch)
        )
    if full:
        entries, source, prefix = _layout(flat, full=True), flat, DDP_PREFIX
    else:
        source, prefix = backbone_flat, ""
    out = {}
    for e in entries:
        if e.kind == "counter":
            out[prefix + e.name] = np.zeros((), np.int64)
        else:
            out[prefix + e.name] = _to_torch(source[e.path].astype(np.float32), e.kind)
    return out


# ------------------------------------------------------------------------- torch -> Flax


def strip_ddp_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Returns state_dict without DistributedDataParallel's ``module.`` prefix."""
    prefixed = [k for k in state_dict if k.startswith(DDP_PREFIX)]
    if not prefixed:
        return dict(state_dict)
    if len(prefixed) != len(state_dict):
        others = [k for k in state_dict if not k.startswith(DDP_PREFIX)]
        raise ValueError(
            f"some keys have the {DDP_PREFIX!r} prefix and some not ({_listing(others)}): pass one model's state_dict"
        )
    return {k[len(DDP_PREFIX) :]: v for k, v in state_dict.items()}


def is_full_layout(state_dict: Mapping[str, Any]) -> bool:
    """Returns whether a (prefix-free) state_dict is a whole VICRegL model, not a backbone."""
    return any(k.startswith("backbone.") for k in state_dict)


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> tuple[str, ...]:
    """Loads the release's weights into model in place; returns the parts loaded.

    model: a VICRegLModel or a backbone. state_dict: numpy (or array-like) values of a
    backbone file or of a full checkpoint's "model" entry, with or without the
    ``module.`` prefix. Into a VICRegLModel a full state_dict loads every part (all must
    match) and a backbone file loads the backbone only (the heads keep their values;
    the return value says so). Into a backbone, a full state_dict gives its backbone.
    Any missing or unexpected name or wrong shape raises ValueError listing them;
    nothing is loaded then.
    """
    given = strip_ddp_prefix(state_dict)
    stacked_flat = _flat_weights(model)
    flat, origins = _unstack(stacked_flat)
    target_backbone, target_full = _split_full(flat)
    given_full = is_full_layout(given)
    if target_full and given_full:
        entries, parts = _layout(flat, full=True), None
    elif target_full:
        entries = [
            dataclasses.replace(e, path=("backbone", *e.path) if e.path else None)
            for e in _layout(target_backbone, full=False)
        ]
        parts = ("backbone",)
    else:
        if given_full:
            given = {k[len("backbone.") :]: v for k, v in given.items() if k.startswith("backbone.")}
        entries, parts = _layout(flat, full=False), ("backbone",)
    expected = {e.name: _torch_shape(flat[e.path].shape, e.kind) if e.path else () for e in entries}
    given_shapes = {k: tuple(np.shape(v)) for k, v in given.items()}
    missing, unexpected, wrong = _compare(given_shapes, expected)
    if missing or unexpected or wrong:
        arch = getattr(model, "arch", None)
        backbone_given = {
            k[len("backbone.") :] if given_full and k.startswith("backbone.") else k: s
            for k, s in given_shapes.items()
            if not given_full or k.startswith("backbone.")
        }
        hint = _architecture_hint(backbone_given, arch)
        if given_full and target_full:
            try:
                inferred = infer_model_kwargs(given)
                hint += "; the file's model is " + ", ".join(f"{k}={v!r}" for k, v in inferred.items())
            except ValueError:
                pass
        raise _mismatch_error("the PyTorch state_dict and the Flax model", missing, unexpected, wrong, hint)
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    tree = nnx.to_pure_dict(state)
    stacks = {}  # stacked path -> its blocks, all of which the entries fill

    def assign(path, value):
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = jnp.asarray(value)

    for e in entries:
        if e.path is None:
            continue
        value = _from_torch(np.asarray(given[e.name], dtype=np.float32), e.kind)
        if e.path in origins:
            path, j = origins[e.path]
            stacks.setdefault(path, [None] * stacked_flat[path].shape[0])[j] = value
        else:
            assign(e.path, value)
    for path, blocks in stacks.items():
        assign(path, np.stack(blocks))
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(model, state)
    if parts is None:
        parts = tuple(p for p in PARTS if any(path[0] == p for path in flat))
    return parts


def _mlp_spec(state_dict: Mapping[str, Any], prefix: str) -> str | None:
    """Returns the spec string of the release's MLP under prefix, or None if absent."""
    widths, i = [], 0
    while f"{prefix}.{i}.weight" in state_dict:
        widths.append(str(np.shape(state_dict[f"{prefix}.{i}.weight"])[0]))
        i += 3
    return "-".join(widths) if widths else None


def infer_model_kwargs(state_dict: Mapping[str, Any]) -> dict:
    """Returns the VICRegLModel kwargs (arch, mlp, maps_mlp, alpha, num_classes) of a
    full checkpoint's model state_dict; alpha is only known to be 0, 1 or in between
    (0.75 is returned for the latter: the release's default)."""
    sd = strip_ddp_prefix(state_dict)
    if not is_full_layout(sd):
        raise ValueError(
            "this is a backbone state_dict: its heads cannot be inferred; "
            "pass mlp, maps_mlp, alpha and num_classes yourself"
        )
    backbone = {k[len("backbone.") :]: tuple(np.shape(v)) for k, v in sd.items() if k.startswith("backbone.")}
    mlp, maps_mlp = _mlp_spec(sd, "projector"), _mlp_spec(sd, "maps_projector")
    if "classifier.weight" not in sd:
        raise ValueError("no classifier.weight: not a full VICRegL checkpoint")
    kwargs = {
        "arch": guess_architecture(backbone),
        "mlp": mlp or "8192-8192-8192",
        "maps_mlp": maps_mlp or "512-512-512",
        "alpha": 0.75 if (mlp and maps_mlp) else (1.0 if mlp else 0.0),
        "num_classes": int(np.shape(sd["classifier.weight"])[0]),
    }
    if any(k.endswith(".gamma") for k in backbone):
        kwargs["layer_scale_init"] = 1e-6  # any value > 0: it is overwritten by the load
    return kwargs
