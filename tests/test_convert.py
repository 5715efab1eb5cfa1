"""Weight conversion to and from the release's PyTorch layout, checked against PyTorch."""

import ast
import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import assert_close, torch_no_grad
from tiny import grouped

from references.torch_modules import (
    TORCH_BACKBONES,
    DataParallelLike,
    TorchVICRegL,
    nchw,
    numpy_state,
    randomize_torch_,
)
from vicregl_jax import config as config_lib
from vicregl_jax import convert, layout, release, torch_io
from vicregl_jax.losses import split_views
from vicregl_jax.model_config import create_model
from vicregl_jax.models import ARCHITECTURES, backbone_norm, create_backbone, feature_dim
from vicregl_jax.models.vicregl import VICRegLModel

# Two cores shared with XLA: one torch thread, so that its OpenMP threads do not spin
# against XLA's.
torch.set_num_threads(1)


no_torch_grad = pytest.fixture(autouse=True)(torch_no_grad)

HEADS = dict(mlp="32-32-16", maps_mlp="24-24-8", num_classes=10)


# ------------------------------------------------------------------------- helpers


def random_flax(make, seed: int, *, layer_norm_heads: bool = False):
    """Returns make()'s model with random weights (no JAX init: built abstract, filled).

    Same recipe as randomize_torch_: activations of order 1, BatchNorm eps and
    LayerNorm eps (via small LayerNorm inputs) both matter in the outputs.
    """
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    tree = nnx.to_pure_dict(state)

    def fill(node, path):
        if "var" in node:  # BatchNorm: draw var first, then scale relative to it
            node["var"] = 10 ** (-5 * rng.random(node["var"].shape))
        for key, value in node.items():
            p = path + (key,)
            if isinstance(value, dict):
                fill(value, p)
            elif key == "key":
                node[key] = jax.random.key(seed)
            elif key == "count":
                node[key] = jnp.zeros((), jnp.uint32)
            elif key == "kernel":
                fan_in = int(np.prod(value.shape[:-1]))
                node[key] = rng.standard_normal(value.shape) / np.sqrt(fan_in)
            elif key in ("scale", "gamma"):
                node[key] = 0.5 + rng.random(value.shape)
            elif key in ("bias", "mean"):
                node[key] = 0.1 * rng.standard_normal(value.shape)
            elif key != "var":
                raise AssertionError(p)
        if "var" in node:
            node["scale"] = node["scale"] * np.sqrt(node["var"] + 1e-5)
        small = (
            "dwconv" in path
            or path[-3:] == ("downsample_layers", 0, 0)
            or (
                layer_norm_heads
                and len(path) >= 2
                and path[-2] == "linears"
                and "norms" in tree_at(tree, path[:-2])
                and path[-1] < len(tree_at(tree, path[:-2])["norms"])
            )
        )
        if small:
            for key in ("kernel", "bias"):
                if key in node:
                    node[key] = node[key] * 1e-3

    fill(tree, ())
    tree = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32) if isinstance(v, np.ndarray) else v, tree)
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state)


def tree_at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def to_torch_tensors(state_dict):
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}


@nnx.jit
def flax_forward(model, x):
    return model(x)


def flax_state(model):
    return {k: np.asarray(v) for k, v in layout._flat_weights(model).items()}


# ------------------------------------------------------------------ backbone parity


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "convnext_tiny", "convnext_small"])
def test_backbone_parity_both_ways(arch):
    # Non-square input, so a swapped H/W or a column-major flatten shows.
    x = np.random.default_rng(0).standard_normal((2, 64, 96, 3)).astype(np.float32)
    make = lambda: create_backbone(arch, rngs=nnx.Rngs(0))  # noqa: E731
    reference = TORCH_BACKBONES[arch]().eval()

    # Flax -> PyTorch.
    model = random_flax(make, seed=1)
    model.eval()
    maps, pooled = flax_forward(model, jnp.asarray(x))
    assert maps.shape == (2, 2 * 3, feature_dim(arch)) and maps.dtype == jnp.float32
    state_dict = layout.to_torch_state_dict(model, arch)
    reference.load_state_dict(to_torch_tensors(state_dict), strict=True)
    ref_maps, ref_pooled = reference(nchw(x))
    assert_close(maps, ref_maps)
    assert_close(pooled, ref_pooled)

    # PyTorch -> Flax, into a model holding other weights; then the way back is exact.
    randomize_torch_(reference, seed=2)
    ref_maps, ref_pooled = reference(nchw(x))
    torch_state = numpy_state(reference)
    assert layout.load_torch_state_dict(model, torch_state) == ("backbone",)
    maps, pooled = flax_forward(model, jnp.asarray(x))
    assert_close(maps, ref_maps)
    assert_close(pooled, ref_pooled)
    back = layout.to_torch_state_dict(model, arch)
    assert back.keys() == torch_state.keys()
    for k in torch_state:
        np.testing.assert_array_equal(back[k], torch_state[k], err_msg=k)


def test_flax_round_trip_is_exact():
    model = random_flax(lambda: create_backbone("convnext_test", layer_scale_init=1e-6, rngs=nnx.Rngs(0)), seed=3)
    before = flax_state(model)
    state_dict = layout.to_torch_state_dict(model, "convnext_test")
    assert "stages.0.0.gamma" in state_dict
    other = random_flax(lambda: create_backbone("convnext_test", layer_scale_init=1e-6, rngs=nnx.Rngs(0)), seed=4)
    layout.load_torch_state_dict(other, state_dict)
    after = flax_state(other)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=str(k))


# --------------------------------------------------------------- full model parity


def make_vicregl(arch, alpha=0.75):
    return lambda: VICRegLModel(
        arch=arch,
        alpha=alpha,
        drop_path_rate=(0.0 if backbone_norm(arch) == "layer" else None),
        **HEADS,
        rngs=nnx.Rngs(0),
    )


def torch_vicregl(arch, alpha=0.75):
    return TorchVICRegL(
        TORCH_BACKBONES[arch](),
        feature_dim(arch),
        backbone_norm(arch),
        HEADS["mlp"],
        HEADS["maps_mlp"],
        alpha,
        HEADS["num_classes"],
    )


@nnx.jit
def flax_views_forward(model, views):
    return model(views)


def compare_outputs(out, ref):
    """Compares the model's outputs (one array per crop group) with the reference's (per view)."""
    for key in ("representations", "embeddings", "local_embeddings", "maps"):
        views = split_views(out[key])
        assert len(views) == len(ref[key]), key
        for a, b in zip(views, ref[key]):
            assert a.dtype == jnp.float32
            assert_close(a, b)
    assert_close(out["logits"], ref["logits"])


@pytest.mark.parametrize("arch", ["resnet_test", "convnext_test"])
def test_full_model_parity(arch):
    rng = np.random.default_rng(5)
    views = [rng.standard_normal(s).astype(np.float32) for s in [(4, 64, 64, 3), (4, 64, 64, 3), (4, 32, 32, 3)]]
    layer_norm = backbone_norm(arch) == "layer"
    model = random_flax(make_vicregl(arch), seed=6, layer_norm_heads=layer_norm)
    reference = DataParallelLike(torch_vicregl(arch))

    # Flax -> PyTorch: the full checkpoint's names load strictly into the DDP-wrapped model.
    state_dict = layout.to_torch_state_dict(model, arch, full=True)
    assert all(k.startswith("module.") for k in state_dict)
    assert "module.projector.6.weight" in state_dict and "module.projector.6.bias" not in state_dict
    reference.load_state_dict(to_torch_tensors(state_dict), strict=True)
    model.eval()
    reference.eval()
    compare_outputs(flax_views_forward(model, grouped(views)), reference.module([nchw(v) for v in views]))

    # Train mode: per-view batch statistics, and the running averages they leave behind.
    model.train()
    reference.train()
    compare_outputs(flax_views_forward(model, grouped(views)), reference.module([nchw(v) for v in views]))
    updated = layout.to_torch_state_dict(model, arch, full=True)
    for k, v in reference.state_dict().items():
        if "running" in k:
            assert_close(updated[k], v.numpy(), rtol=1e-5)

    # PyTorch -> Flax, from the checkpoint with and without the DDP prefix.
    randomize_torch_(reference, seed=7)
    reference.eval()
    model.eval()
    ref = reference.module([nchw(v) for v in views])
    for prefixed in (True, False):
        torch_state = numpy_state(reference if prefixed else reference.module)
        parts = layout.load_torch_state_dict(model, torch_state)
        assert parts == ("backbone", "expander", "local_projector", "classifier")
        compare_outputs(flax_views_forward(model, grouped(views)), ref)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_full_model_without_a_branch(alpha):
    model = random_flax(make_vicregl("resnet_test", alpha), seed=8)
    state_dict = layout.to_torch_state_dict(model, "resnet_test", full=True)
    assert any(".maps_projector." in k for k in state_dict) == (alpha < 1)
    assert any(".projector." in k for k in state_dict) == (alpha > 0)
    reference = DataParallelLike(torch_vicregl("resnet_test", alpha))
    reference.load_state_dict(to_torch_tensors(state_dict), strict=True)
    kwargs = layout.infer_model_kwargs(state_dict)
    assert kwargs == {
        "arch": "resnet_test",
        "mlp": HEADS["mlp"] if alpha else "8192-8192-8192",
        "maps_mlp": HEADS["maps_mlp"] if alpha < 1 else "512-512-512",
        "alpha": alpha,
        "num_classes": 10,
    }


# ---------------------------------------------------------- every architecture's layout


def test_every_architecture_converts_shapes():
    for arch in ARCHITECTURES:
        with torch.device("meta"):
            reference = TORCH_BACKBONES[arch]()
        expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        shapes = layout.backbone_torch_shapes(arch)
        assert shapes == expected, arch


# --------------------------------------------------------------------------- errors


def test_other_architecture_is_refused_with_names():
    model = random_flax(lambda: create_backbone("resnet_test", rngs=nnx.Rngs(0)), seed=9)
    before = flax_state(model)
    with torch.device("meta"):
        convnext = TORCH_BACKBONES["convnext_test"]()
    state_dict = {k: np.zeros(v.shape, np.float32) for k, v in convnext.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"(?s)weights of 'convnext_test'.*missing: .*conv1\.weight"
        r".*unexpected: downsample_layers\.0\.0\.bias",
    ):
        layout.load_torch_state_dict(model, state_dict)

    good = layout.to_torch_state_dict(model, "resnet_test")
    bad = dict(good, **{"layer1.0.conv1.weight": np.zeros((8, 8, 1, 1), np.float32)})
    bad["fc.weight"] = np.zeros((10, 64), np.float32)
    del bad["layer4.0.bn2.running_var"]
    with pytest.raises(ValueError) as e:
        layout.load_torch_state_dict(model, bad)
    message = str(e.value)
    assert "missing: layer4.0.bn2.running_var" in message
    assert "unexpected: fc.weight" in message
    assert "layer1.0.conv1.weight (8, 8, 1, 1) vs (8, 8, 3, 3)" in message
    after = flax_state(model)  # nothing was loaded
    assert all(np.array_equal(before[k], after[k]) for k in before)

    mixed = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(good.items())}
    with pytest.raises(ValueError, match="prefix"):
        layout.load_torch_state_dict(model, mixed)

    with pytest.raises(ValueError, match="not 'resnet18'"):
        layout.to_torch_state_dict(model, "resnet18")
    with pytest.raises(ValueError, match="full=True"):
        layout.to_torch_state_dict(model, "resnet_test", full=True)


def test_backbone_file_into_full_model_and_back():
    full = random_flax(make_vicregl("resnet_test"), seed=10)
    backbone = random_flax(lambda: create_backbone("resnet_test", rngs=nnx.Rngs(0)), seed=11)
    heads_before = {k: v for k, v in flax_state(full).items() if k[0] != "backbone"}
    parts = layout.load_torch_state_dict(full, layout.to_torch_state_dict(backbone, "resnet_test"))
    assert parts == ("backbone",)
    state = flax_state(full)
    for k, v in heads_before.items():
        np.testing.assert_array_equal(state[k], v)
    for k, v in flax_state(backbone).items():
        np.testing.assert_array_equal(state[("backbone",) + k], v)
    # A full checkpoint gives its backbone to a backbone model.
    other = random_flax(lambda: create_backbone("resnet_test", rngs=nnx.Rngs(0)), seed=12)
    layout.load_torch_state_dict(other, layout.to_torch_state_dict(full, "resnet_test", full=True))
    for k, v in flax_state(backbone).items():
        np.testing.assert_array_equal(flax_state(other)[k], v)


# ---------------------------------------------------------------------- files and CLI


def converted_workdir_config(**model):
    """Returns the nested config of a workdir holding a model of the given kwargs."""
    config = config_lib.default_config()
    alpha = model.pop("alpha", 0.75)
    config.loss.alpha = alpha
    for key, value in model.items():
        config.model[key] = value
    return config


def test_files_and_cli_round_trip(tmp_path):
    config = converted_workdir_config(arch="convnext_test", dtype="bfloat16", **HEADS)
    model = random_flax(
        lambda: create_model(config.model, config.loss.alpha, rngs=nnx.Rngs(0)), seed=13, layer_norm_heads=True
    )
    release.write_workdir(model, config, str(tmp_path / "flax"))
    restored, saved_config, step = release.load_workdir_model(str(tmp_path / "flax"))
    assert restored.backbone.dtype == jnp.bfloat16 and saved_config.model.mlp == HEADS["mlp"] and step == 0

    convert.main(
        ["to-torch", str(tmp_path / "flax"), str(tmp_path / "full.pth"), "--full", "--safetensors", "--epoch", "3"]
    )
    convert.main(["to-torch", str(tmp_path / "flax"), str(tmp_path / "backbone.pth")])
    checkpoint = torch.load(tmp_path / "full.pth", weights_only=True)
    assert checkpoint["epoch"] == 3 and "module.classifier.weight" in checkpoint["model"]
    backbone_file = torch.load(tmp_path / "backbone.pth", weights_only=True)
    reference = TORCH_BACKBONES["convnext_test"]()
    reference.load_state_dict(backbone_file, strict=True)

    expected = flax_state(model)
    for source in ("full.pth", "full.safetensors"):
        out = tmp_path / source.replace(".", "_")
        convert.main(["from-torch", str(tmp_path / source), str(out), "--arch", "convnext_test", "--dtype", "bfloat16"])
        loaded, loaded_config, _ = release.load_workdir_model(str(out))
        assert loaded_config.model.maps_mlp == HEADS["maps_mlp"] and loaded_config.model.num_classes == 10
        state = flax_state(loaded)
        assert state.keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(state[k], expected[k], err_msg=str(k))

    with pytest.raises(SystemExit, match="weights of 'convnext_test', not 'resnet_test'"):
        convert.main(["from-torch", str(tmp_path / "backbone.pth"), str(tmp_path / "x"), "--arch", "resnet_test"])


def test_release_training_checkpoints_convert_and_code_never_runs(tmp_path, capfd):
    """The release's training checkpoints pickle a function reference in their LARS state:
    they convert (the optimiser entry is ignored); a __reduce__ payload runs nothing."""
    model = random_flax(lambda: create_backbone("resnet_test", rngs=nnx.Rngs(0)), seed=14)
    state_dict = to_torch_tensors(layout.to_torch_state_dict(model, "resnet_test"))
    lars = {"param_groups": [{"params": [0], "lars_adaptation_filter": exclude_bias_and_norm}], "state": {}}
    torch.save({"epoch": 1, "model": state_dict, "optimizer": lars}, tmp_path / "lars.pth")
    with pytest.raises(pickle.UnpicklingError):  # what users met before: torch refuses the whole file
        torch.load(tmp_path / "lars.pth", weights_only=True)
    loaded = torch_io.read_torch_weights(str(tmp_path / "lars.pth"))
    for k, v in state_dict.items():
        np.testing.assert_array_equal(loaded[k], v.numpy())
    convert.main(["from-torch", str(tmp_path / "lars.pth"), str(tmp_path / "converted"), "--arch", "resnet_test"])
    assert (tmp_path / "converted" / "config.json").exists()

    marker = tmp_path / "pwned"
    for payload in (WritesFile(str(marker)), RunsShell(f"touch {marker}")):
        torch.save({"epoch": 1, "model": state_dict, "optimizer": payload}, tmp_path / "evil.pth")
        try:
            torch_io.read_torch_weights(str(tmp_path / "evil.pth"))
        except ValueError as error:
            assert "weights_only" not in str(error) and "refused" in str(error)
        assert not marker.exists()


def exclude_bias_and_norm(p):  # the kind of function the release's LARS state refers to
    return p.ndim == 1


class WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_damaged_weight_files_fail_with_one_line(tmp_path):
    model = random_flax(lambda: create_backbone("resnet_test", rngs=nnx.Rngs(0)), seed=15)
    state_dict = layout.to_torch_state_dict(model, "resnet_test")
    good = tmp_path / "good.pth"
    torch_io.write_torch_weights(state_dict, str(good), safetensors=True)
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    st = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) // 2])
    for name in ("truncated.pth", "empty.pth", "truncated.safetensors"):
        with pytest.raises(ValueError, match=rf"{name}: not a readable .*(truncated|damaged)") as error:
            torch_io.read_torch_weights(str(tmp_path / name))
        assert "weights_only" not in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        torch_io.read_torch_weights(str(tmp_path / "missing.pth"))
    nan = dict(state_dict, **{"conv1.weight": np.full_like(state_dict["conv1.weight"], np.nan)})
    torch_io.write_torch_weights(nan, str(tmp_path / "nan.pth"))
    with pytest.raises(ValueError, match=r"nan.pth: 1 tensors hold NaN or Inf \(e.g. conv1.weight\)"):
        torch_io.read_torch_weights(str(tmp_path / "nan.pth"))


def test_legacy_pickle_format_reads_and_refuses_code(tmp_path):
    """A state_dict saved in torch's older non-zip format loads as torch.load(weights_only=True)
    loads it; one whose pickle would run code stays refused, in one line."""
    state_dict = {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.num_batches_tracked": torch.tensor(7)}
    torch.save(state_dict, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    read = torch_io.read_torch_weights(str(tmp_path / "legacy.pth"))
    np.testing.assert_array_equal(read["conv1.weight"], state_dict["conv1.weight"].numpy())
    assert int(read["bn1.num_batches_tracked"]) == 7
    torch.save({"model": RunsShell("true")}, tmp_path / "evil.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"evil.pth: (refused|not a readable)") as error:
        torch_io.read_torch_weights(str(tmp_path / "evil.pth"))
    assert "\n" not in str(error.value)


def test_torch_is_imported_only_by_file_functions():
    """torch is imported inside the file functions of torch_io.py, nowhere else (but in the
    release's transform chain that the pipeline benchmark and tests measure against)."""
    package = os.path.join(os.path.dirname(os.path.dirname(__file__)), "vicregl_jax")
    allowed = {
        ("torch_io.py", "_load_pth"),
        ("torch_io.py", "read_torch_weights"),
        ("torch_io.py", "write_torch_weights"),
    }
    found = set()
    for root, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(root, name)).read())
            for function in [None] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
                body = tree if function is None else function
                nodes = ast.iter_child_nodes(body) if function is None else ast.walk(body)
                for node in nodes:
                    modules = (
                        [a.name for a in node.names]
                        if isinstance(node, ast.Import)
                        else [node.module or ""]
                        if isinstance(node, ast.ImportFrom)
                        else []
                    )
                    if any(m == "torch" or m.startswith("torch.") for m in modules):
                        found.add((name, function.name if function else "<module>"))
    assert found == allowed


def fake_workdir(path, *items):
    """Returns path made to look like a workdir whose checkpoint 3 holds items (only their folders)."""
    for item in items:
        os.makedirs(path / "checkpoints" / "3" / item)
    (path / "config.json").write_text('{"model": {}}')
    return path


def test_from_torch_never_writes_into_a_run_and_takes_its_lock(tmp_path):
    from vicregl_jax import workdir as workdir_lib

    # A full checkpoint: converting it initialises nothing (no compilation but the checksums').
    config = converted_workdir_config(arch="resnet_test", **HEADS)
    model = random_flax(lambda: create_model(config.model, config.loss.alpha, rngs=nnx.Rngs(0)), seed=3)
    pth = str(tmp_path / "full.pth")
    torch_io.write_torch_weights(layout.to_torch_state_dict(model, "resnet_test", full=True), pth, epoch=1)

    def convert_to(out, *extra):
        convert.main(["from-torch", pth, str(out), "--arch", "resnet_test", *extra])

    # A pre-training workdir is never written, not even with --force: its config and checkpoints stay.
    run = fake_workdir(tmp_path / "run", "meta", "model", "train")
    for extra in ((), ("--force",)):
        with pytest.raises(SystemExit, match=r"^error: OUT_DIR .*run holds a pre-training run .*give another OUT_DIR"):
            convert_to(run, *extra)
    assert (run / "config.json").read_text() == '{"model": {}}' and os.listdir(run / "checkpoints") == ["3"]
    # The lock a training holds keeps the conversion out, before anything is read or written.
    holder = workdir_lib.WorkdirLock(tmp_path / "busy").acquire()
    try:
        with pytest.raises(SystemExit, match=r"busy is in use by another run"):
            convert_to(tmp_path / "busy")
    finally:
        holder.release()
    assert os.listdir(tmp_path / "busy") == []
    # An earlier conversion is replaced only with --force, and moved aside rather than deleted.
    earlier = fake_workdir(tmp_path / "out", "meta", "model")
    with pytest.raises(SystemExit, match=r"out already holds converted weights: .* pass --force"):
        convert_to(earlier)
    convert_to(earlier, "--force")
    assert sorted(os.listdir(earlier / "replaced" / "1")) == ["checkpoints", "config.json"]
    assert os.listdir(earlier / "replaced" / "1" / "checkpoints") == ["3"]
    assert workdir_lib.load_config(earlier).model.arch == "resnet_test"
    assert os.listdir(earlier / "checkpoints") == ["0"] and not os.path.exists(earlier / workdir_lib.LOCK_NAME)


def test_convert_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    cases = [
        (["from-torch", str(tmp_path / "folder"), str(tmp_path / "o"), "--arch", "resnet_test"], r"folder is a folder"),
        (["from-torch", str(tmp_path / "x.pth"), str(tmp_path / "file"), "--arch", "resnet_test"], r"file is a file"),
        (["to-torch", str(tmp_path / "w"), str(tmp_path / "folder")], r"folder is a folder: give the path of the file"),
        (["to-torch", str(tmp_path / "w"), str(tmp_path / "file" / "x.pth")], r"file is a file, not a folder"),
        (["from-torch", "x.pth"], r"^error: the following arguments are required: out_dir, --arch \(see"),
    ]
    for argv, pattern in cases:
        with pytest.raises(SystemExit) as stop:
            convert.main(argv)
        assert re.search(pattern, str(stop.value.code)) and "\n" not in str(stop.value.code), (argv, stop.value.code)
    assert sorted(os.listdir(tmp_path)) == ["file", "folder"] and os.listdir(tmp_path / "folder") == []
