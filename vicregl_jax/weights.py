"""The release's pre-trained weights by name, and one `load` for every source of weights.

    model, config = load("convnext_small_alpha0.75")           # the backbone file
    model, config = load("resnet50_alpha0.9_fullckpt")         # backbone + expander + local projector
    model, config = load("path/to/file.pth")  /  load("runs/demo")   # a release file, a workdir

A name is the stem of one of the release's files (`RELEASES`; the torch.hub spellings such
as `resnet50_alpha0p9` work too): NAME is the backbone file, NAME_fullckpt the full
checkpoint with the heads. The first use downloads the file into the cache folder
($VICREGL_JAX_CACHE, default ~/.cache/vicregl_jax) under files/, with a progress bar and
resumption (vicregl_jax.download: size checked, sha256 recorded then checked at every use),
loads it strictly into the Flax model and writes the result once under converted/NAME: a
workdir for a full checkpoint (usable as --weights and init_weights like any other), the
backbone's weights alone for a backbone file. Later uses read the converted weights (Orbax,
checksummed) after checking the file's sha256, with no network request.

`--weights=release:NAME` and `--config.model.init_weights=release:NAME` name the same files
(`resolve`). Set $VICREGL_JAX_RELEASE_URL to fetch from a mirror of the release's folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import ml_collections
from flax import nnx

from vicregl_jax import checkpoint, download, layout, model_config, models, torch_io
from vicregl_jax import config as config_lib
from vicregl_jax import release as release_lib
from vicregl_jax import workdir as workdir_lib

PREFIX = "release:"  # how a release name is told apart from a path on the command line
RELEASE_URL = "https://dl.fbaipublicfiles.com/vicregl"  # the release's folder
URL_ENV = "VICREGL_JAX_RELEASE_URL"  # a mirror of that folder (or a test server)
CACHE_ENV = "VICREGL_JAX_CACHE"
FULL_SUFFIX = "_fullckpt"
MARKER = "release.json"  # written last into a converted folder: present means complete


@dataclasses.dataclass(frozen=True)
class Release:
    """One published model: its name, backbone, alpha, and its two files' addresses."""

    name: str
    arch: str
    alpha: float
    backbone_url: str
    full_url: str
    pretrained_on: str = "ImageNet-1k"


RELEASES = {
    r.name: r
    for r in (
        Release(
            "resnet50_alpha0.9",
            "resnet50",
            0.9,
            "https://dl.fbaipublicfiles.com/vicregl/resnet50_alpha0.9.pth",
            "https://dl.fbaipublicfiles.com/vicregl/resnet50_alpha0.9_fullckpt.pth",
        ),
        Release(
            "resnet50_alpha0.75",
            "resnet50",
            0.75,
            "https://dl.fbaipublicfiles.com/vicregl/resnet50_alpha0.75.pth",
            "https://dl.fbaipublicfiles.com/vicregl/resnet50_alpha0.75_fullckpt.pth",
        ),
        Release(
            "convnext_small_alpha0.9",
            "convnext_small",
            0.9,
            "https://dl.fbaipublicfiles.com/vicregl/convnext_small_alpha0.9.pth",
            "https://dl.fbaipublicfiles.com/vicregl/convnext_small_alpha0.9_fullckpt.pth",
        ),
        Release(
            "convnext_small_alpha0.75",
            "convnext_small",
            0.75,
            "https://dl.fbaipublicfiles.com/vicregl/convnext_small_alpha0.75.pth",
            "https://dl.fbaipublicfiles.com/vicregl/convnext_small_alpha0.75_fullckpt.pth",
        ),
        Release(
            "convnext_base_alpha0.9",
            "convnext_base",
            0.9,
            "https://dl.fbaipublicfiles.com/vicregl/convnext_base_alpha0.9.pth",
            "https://dl.fbaipublicfiles.com/vicregl/convnext_base_alpha0.9_fullckpt.pth",
        ),
        Release(
            "convnext_base_alpha0.75",
            "convnext_base",
            0.75,
            "https://dl.fbaipublicfiles.com/vicregl/convnext_base_alpha0.75.pth",
            "https://dl.fbaipublicfiles.com/vicregl/convnext_base_alpha0.75_fullckpt.pth",
        ),
        Release(
            "convnext_xlarge_alpha0.75",
            "convnext_xlarge",
            0.75,
            "https://dl.fbaipublicfiles.com/vicregl/convnext_xlarge_alpha0.75.pth",
            "https://dl.fbaipublicfiles.com/vicregl/convnext_xlarge_alpha0.75_fullckpt.pth",
            pretrained_on="ImageNet-22k",
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class ReleaseFile:
    """One of the release's files: the model it belongs to, and whether it is the full checkpoint."""

    release: Release
    full: bool

    @property
    def stem(self) -> str:
        """Returns the file's name without .pth: the name it is loaded by."""
        return self.release.name + (FULL_SUFFIX if self.full else "")

    def url(self, base_url: str | None = None) -> str:
        """Returns the file's address: the release's, or under base_url ($VICREGL_JAX_RELEASE_URL)."""
        url = self.release.full_url if self.full else self.release.backbone_url
        base = base_url or os.environ.get(URL_ENV)
        return f"{base.rstrip('/')}/{url.rsplit('/', 1)[1]}" if base else url


def release_file(name: str) -> ReleaseFile | None:
    """Returns the release file a name means ("release:" prefix optional, torch.hub's
    "0p9" spelling accepted), or None when it names none."""
    stem = name.removeprefix(PREFIX)
    full = stem.endswith(FULL_SUFFIX)
    stem = stem[: -len(FULL_SUFFIX)] if full else stem
    for release in RELEASES.values():
        if stem in (release.name, release.name.replace(".", "p")):
            return ReleaseFile(release, full)
    return None


def _named(name: str) -> ReleaseFile:
    found = release_file(name)
    if found is None:
        listed = ", ".join(RELEASES)
        raise ValueError(
            f"{name!r} names no published VICRegL weights: use one of {listed} "
            f"(add {FULL_SUFFIX} for the full checkpoint with the heads)."
        )
    return found


def cache_dir(cache: str | None = None) -> str:
    """Returns the cache folder: cache, else $VICREGL_JAX_CACHE, else ~/.cache/vicregl_jax."""
    return os.path.abspath(os.path.expanduser(cache or os.environ.get(CACHE_ENV) or "~/.cache/vicregl_jax"))


def _with_cache_hint(error: download.DownloadError) -> download.DownloadError:
    text = str(error).replace("choose another cache folder", f"set ${CACHE_ENV} to another folder")
    return download.DownloadError(text)


def fetch_file(name: str, *, cache: str | None = None, base_url: str | None = None, progress: bool = True) -> str:
    """Returns the path of a release file in the cache, downloaded on first use and checked
    (size, sha256) at every use."""
    item = _named(name)
    path = os.path.join(cache_dir(cache), "files", item.stem + ".pth")
    try:
        return download.fetch(item.url(base_url), path, progress=progress)
    except download.DownloadError as error:
        raise _with_cache_hint(error) from None


# --------------------------------------------------------------------------------------------
# Conversion, once, into the cache
# --------------------------------------------------------------------------------------------


def release_config(
    arch: str, state_dict, *, alpha: float | None = None, dtype: str = "auto"
) -> ml_collections.ConfigDict:
    """Returns the config of a model holding a release state_dict (heads read off a full
    checkpoint; layer scale when the file has it)."""
    config = release_lib.converted_config(state_dict, arch, **{"loss.alpha": alpha, "model.dtype": dtype})
    if any(k.endswith(".gamma") for k in state_dict) and config.model.layer_scale_init is None:
        config.model.layer_scale_init = 1e-6  # any value > 0 builds the parameter; the load sets it
    return config


def _save_backbone(backbone, config, folder: str) -> None:
    checkpointer = checkpoint.Checkpointer(folder, model_config.model_meta(config), async_save=False)
    checkpointer.save_model(0, nnx.state(backbone, nnx.Param), nnx.state(backbone, nnx.BatchStat))
    checkpointer.close()


def _file_digests(folder: str) -> dict[str, str]:
    """Returns {path relative to folder: sha256} of every file under folder but the marker."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.relpath(path, folder) != MARKER:
                found[os.path.relpath(path, folder)] = download.sha256_of(path)
    return found


def _convert(item: ReleaseFile, path: str, folder: str, sha256: str) -> None:
    """Writes the converted weights of a release file into folder (replacing a partial one),
    with a marker holding the sha256 of the source and of every file written."""
    state_dict = torch_io.read_torch_weights(path)
    config = release_config(item.release.arch, state_dict, alpha=item.release.alpha)
    temporary = folder + ".converting"
    shutil.rmtree(temporary, ignore_errors=True)
    if item.full:
        model, parts = release_lib.model_from_release(state_dict, config)
        release_lib.write_workdir(model, config, temporary)
    else:
        backbone, parts = _backbone_of(state_dict, config), ("backbone",)
        _save_backbone(backbone, config, temporary)
    marker = {
        "name": item.stem,
        "arch": item.release.arch,
        "alpha": item.release.alpha,
        "parts": list(parts),
        "layer_scale_init": config.model.layer_scale_init,
        "sha256": sha256,
        "files": _file_digests(temporary),
    }
    with open(os.path.join(temporary, MARKER), "w") as f:
        json.dump(marker, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


def _abstract_backbone(config):
    """Returns config's backbone built with nnx.eval_shape (shapes only, no heads)."""
    kwargs = {"layer_scale_init": config.model.layer_scale_init} if config.model.layer_scale_init else {}
    return nnx.eval_shape(
        lambda: models.create_backbone(
            config.model.arch,
            rngs=nnx.Rngs(config.seed),
            dtype=model_config.compute_dtype(config.model.dtype),
            **kwargs,
        )
    )


def _backbone_of(state_dict, config):
    """Returns config's backbone holding a backbone state_dict (strict), in eval mode."""
    backbone = _abstract_backbone(config)
    layout.load_torch_state_dict(backbone, state_dict)
    model_config.seed_random_streams(backbone, jax.random.key(config.seed))
    backbone.eval()
    return backbone


def converted(name: str, *, cache: str | None = None, base_url: str | None = None, progress: bool = True) -> str:
    """Returns the folder of a release file's converted weights (a workdir for a full
    checkpoint), converting it on first use, or again when its files do not match their
    recorded sha256; the release file's sha256 is checked every time."""
    item = _named(name)
    path = fetch_file(name, cache=cache, base_url=base_url, progress=progress)
    sha256 = download.read_record(path)["sha256"]
    folder = os.path.join(cache_dir(cache), "converted", item.stem)
    marker = _read_marker(folder)
    if marker is None or marker["sha256"] != sha256 or _damaged(folder, marker):
        try:
            _convert(item, path, folder, sha256)
        except OSError as error:
            raise download.DownloadError(
                f"cannot write the converted weights of {path} to {folder} ({error.strerror or error}): make the "
                f"cache folder writable or set ${CACHE_ENV} to another folder."
            ) from None
    return folder


def _damaged(folder: str, marker: dict) -> str | None:
    """Returns the first file of a converted folder that differs from its recorded sha256, or None."""
    if not isinstance(marker.get("files"), dict):
        return MARKER  # written by an older version: convert again
    for name, digest in marker["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or download.sha256_of(path) != digest:
            return name
    return None


def _read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def resolve(source: str | None, *, as_file: bool = False, progress: bool = True) -> str | None:
    """Returns a local path for a --weights / init_weights value: "release:NAME" becomes its
    converted folder (as_file: the verified .pth), anything else is returned as given."""
    if not source or not str(source).startswith(PREFIX):
        return source
    if as_file:
        return fetch_file(source, progress=progress)
    return converted(source, progress=progress)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _restore_converted(folder: str, marker: dict, dtype: str):
    """Returns (backbone or VICRegLModel in eval mode, config) of a converted folder, its files
    checked against their sha256 (which stands for the checksums of a workdir's restore)."""
    damaged = _damaged(folder, marker)
    if damaged:
        raise ValueError(
            f"{os.path.join(folder, damaged)} does not match the sha256 recorded when {folder} was "
            f"converted: delete {folder} and load the release file again."
        )
    if marker["parts"] == ["backbone"]:
        config = config_lib.default_config()
        config.model.arch, config.loss.alpha = marker["arch"], marker["alpha"]
        config.model.layer_scale_init = marker.get("layer_scale_init")
    else:
        config = workdir_lib.load_config(folder)
    config.model.dtype = dtype
    model = (
        _abstract_backbone(config)
        if marker["parts"] == ["backbone"]
        else model_config.abstract_model(config.model, config.loss.alpha, config.seed)
    )
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def on(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    checkpointer = checkpoint.Checkpointer(folder, model_config.model_meta(config), read_only=True)
    try:
        _, params, batch_stats, _ = checkpointer.restore_model(
            jax.tree.map(on, params), jax.tree.map(on, batch_stats), 0, verify=False
        )
    finally:
        checkpointer.close()
    model = nnx.merge(graphdef, params, batch_stats, rest)
    model_config.seed_random_streams(model, jax.random.key(config.seed))
    model.eval()
    return model, config


def _load_file(path: str, arch: str | None, dtype: str):
    """Returns (model or backbone, config) of a release .pth / .safetensors file."""
    state_dict = torch_io.read_torch_weights(path)
    stripped = layout.strip_ddp_prefix(state_dict)
    full = layout.is_full_layout(stripped)
    backbone_shapes = {
        k[len("backbone.") :] if full else k: v.shape
        for k, v in stripped.items()
        if not full or k.startswith("backbone.")
    }
    arch = arch or layout.guess_architecture(backbone_shapes)
    if arch is None:
        raise ValueError(f"{path}: its backbone is none of the known architectures: pass arch=NAME.")
    config = release_config(arch, state_dict, dtype=dtype)
    if full:
        return release_lib.model_from_release(state_dict, config)[0], config
    return _backbone_of(state_dict, config), config


def load(
    source: str,
    *,
    arch: str | None = None,
    dtype: str = "auto",
    cache: str | None = None,
    base_url: str | None = None,
    progress: bool = True,
):
    """Returns (model, config) in eval mode: a VICRegLModel (backbone and heads) for a full
    checkpoint or a workdir, the backbone alone for a backbone file.

    source: a release name ("convnext_small_alpha0.75", "..._fullckpt", "release:..."), a
    release .pth / .pt / .safetensors file (arch guessed from its shapes unless given), a
    workdir (pre-training, or converted), or a folder converted from a release backbone file.
    dtype: the compute dtype ("auto": bfloat16 on GPU / TPU, float32 on CPU).
    """
    source = str(source)
    if not os.path.exists(source) and release_file(source) is not None:
        source = converted(source, cache=cache, base_url=base_url, progress=progress)
    elif not os.path.exists(source):
        raise FileNotFoundError(
            f"{source!r} is neither a file, a folder, nor a released model ({', '.join(RELEASES)})."
        )
    if release_lib.is_release_file(source):
        return _load_file(source, arch, dtype)
    marker = _read_marker(source)
    if marker is not None:
        return _restore_converted(source, marker, dtype)
    model, config, _ = release_lib.load_workdir_model(source)
    if model_config.compute_dtype(dtype) != model_config.compute_dtype(config.model.dtype):
        config.model.dtype = dtype  # the same weights computing in another dtype
        fresh = model_config.abstract_model(config.model, config.loss.alpha, config.seed)
        nnx.update(fresh, nnx.state(model))
        fresh.eval()
        model = fresh
    return model, config


def load_backbone(source: str, config=None):
    """Returns (backbone in eval mode, its config, description) of a release name, for the
    evaluations (--weights=release:NAME); with several processes each reads the verified file
    itself (converting would be a collective Orbax save into every host's own cache)."""
    item = _named(source)
    dtype = config.model.dtype if config is not None else "auto"
    if jax.process_count() > 1:
        model, saved = _load_file(fetch_file(source), item.release.arch, dtype)
    else:
        model, saved = load(source, dtype=dtype)
    return getattr(model, "backbone", model), saved, f"{item.release.arch} from the release's {item.stem}.pth"
