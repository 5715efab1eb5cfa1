"""PyTorch reference networks with the release's parameter names, for parity tests.

Written for these tests from the architecture descriptions (torchvision-style ResNet v1.5
names, the release's ConvNeXt names and its MLP heads); they are
the yardstick the Flax models and the weight conversion are checked against.
Each backbone's forward returns (maps (B, h*w, C), pooled (B, C)) from NCHW images.

`torch_vicregl_loss` is the criterion in PyTorch (written from the paper's definition and
checked against references/loss.py) and `TorchLARS` the release's LARS: with them,
benchmarks/torch_step_bench.py times the release's whole training step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------- ResNet


class TorchBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch, planes, stride, dilation=1):
        super().__init__()
        # Dilated variant as mmsegmentation builds it: the first 3x3 conv only.
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _torch_downsample(in_ch, planes, stride)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + shortcut)


class TorchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch, planes, stride, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _torch_downsample(in_ch, planes * 4, stride)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + shortcut)


def _torch_downsample(in_ch, out_ch, stride):
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class TorchResNet(nn.Module):
    """strides / dilations: per stage, as mmsegmentation's ResNet takes them (e.g. (1, 2, 1, 1)
    and (1, 1, 2, 4) for output stride 8); with contract_dilation the first block of a
    dilated stage uses half the stage's dilation."""

    def __init__(
        self, block, stage_sizes, width=64, strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), contract_dilation=True
    ):
        super().__init__()
        block_cls = {"basic": TorchBasicBlock, "bottleneck": TorchBottleneck}[block]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = width
        for i, n in enumerate(stage_sizes):
            dilation = dilations[i]
            first = dilation // 2 if contract_dilation and dilation > 1 else dilation
            blocks = []
            for b in range(n):
                blocks.append(
                    block_cls(in_ch, width * 2**i, strides[i] if b == 0 else 1, first if b == 0 else dilation)
                )
                in_ch = width * 2**i * block_cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

    def forward_stages(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs

    def forward(self, x):
        x = self.forward_stages(x)[-1]
        maps = x.flatten(2).transpose(1, 2)
        return maps, x.mean(dim=(2, 3))


# -------------------------------------------------------------------------- ConvNeXt


class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class TorchConvNeXtBlock(nn.Module):
    def __init__(self, dim, drop_path=0.0, layer_scale=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale > 0 else None
        self.drop_path = drop_path

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(F.gelu(self.pwconv1(y)))  # exact GELU
        if self.gamma is not None:
            y = self.gamma * y
        y = y.permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:
            keep = torch.rand(y.shape[0], 1, 1, 1, device=y.device) >= self.drop_path
            y = y * keep / (1 - self.drop_path)
        return x + y


class TorchConvNeXt(nn.Module):
    def __init__(self, depths, dims, drop_path_rate=0.0, layer_scale=0.0):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), ChannelsFirstLayerNorm(dims[0]))]
            + [nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)) for i in range(3)]
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        k = 0
        for depth, dim in zip(depths, dims):
            self.stages.append(
                nn.Sequential(*[TorchConvNeXtBlock(dim, rates[k + j], layer_scale) for j in range(depth)])
            )
            k += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)

    def forward_stages(self, x):
        outputs = []
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
            outputs.append(x)
        return outputs

    def forward(self, x):
        x = self.forward_stages(x)[-1]
        maps = self.norm(x.flatten(2).transpose(1, 2))
        return maps, maps.mean(dim=1)


# ------------------------------------------------------------------------------ heads


def torch_mlp(in_features, spec, norm):
    dims = [in_features] + [int(d) for d in spec.split("-")]
    layers = []
    for i in range(len(dims) - 2):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        layers.append(nn.BatchNorm1d(dims[i + 1]) if norm == "batch" else nn.LayerNorm(dims[i + 1]))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class TorchVICRegL(nn.Module):
    """backbone, projector (expander), maps_projector (local projector), classifier."""

    def __init__(self, backbone, dim, norm, mlp, maps_mlp, alpha, num_classes):
        super().__init__()
        self.backbone = backbone
        if alpha < 1.0:
            self.maps_projector = torch_mlp(dim, maps_mlp, norm)
        if alpha > 0.0:
            self.projector = torch_mlp(dim, mlp, norm)
        self.classifier = nn.Linear(dim, num_classes)
        self.alpha = alpha

    def forward(self, views):
        out = {"representations": [], "embeddings": [], "local_embeddings": [], "maps": []}
        for x in views:  # one forward pass (and BatchNorm statistics) per view
            maps, pooled = self.backbone(x)
            out["maps"].append(maps)
            out["representations"].append(pooled)
            if self.alpha > 0.0:
                out["embeddings"].append(self.projector(pooled))
            if self.alpha < 1.0:
                b, n, c = maps.shape
                out["local_embeddings"].append(self.maps_projector(maps.reshape(b * n, c)).reshape(b, n, -1))
        out["logits"] = self.classifier(out["representations"][0].detach())
        return out


class DataParallelLike(nn.Module):
    """Holds a model as `.module`, so its state_dict has DistributedDataParallel's names."""

    def __init__(self, module):
        super().__init__()
        self.module = module


# --------------------------------------------------------------------------- registry

TORCH_BACKBONES = {
    "resnet18": lambda: TorchResNet("basic", (2, 2, 2, 2)),
    "resnet34": lambda: TorchResNet("basic", (3, 4, 6, 3)),
    "resnet50": lambda: TorchResNet("bottleneck", (3, 4, 6, 3)),
    "resnet101": lambda: TorchResNet("bottleneck", (3, 4, 23, 3)),
    "resnet152": lambda: TorchResNet("bottleneck", (3, 8, 36, 3)),
    "resnet50x2": lambda: TorchResNet("bottleneck", (3, 4, 6, 3), 128),
    "resnet50x4": lambda: TorchResNet("bottleneck", (3, 4, 6, 3), 256),
    "resnet50x5": lambda: TorchResNet("bottleneck", (3, 4, 6, 3), 320),
    "resnet200x2": lambda: TorchResNet("bottleneck", (3, 24, 36, 3), 128),
    "resnet_test": lambda: TorchResNet("basic", (1, 1, 1, 1), 8),
    "convnext_tiny": lambda: TorchConvNeXt((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": lambda: TorchConvNeXt((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": lambda: TorchConvNeXt((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": lambda: TorchConvNeXt((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": lambda: TorchConvNeXt((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "convnext_test": lambda: TorchConvNeXt((1, 1, 1, 1), (8, 16, 32, 64)),
}


# ------------------------------------------------------------------- random weights


def nchw(x) -> torch.Tensor:
    """Returns a NHWC numpy batch as the NCHW torch tensor the reference modules take."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def numpy_state(module: nn.Module) -> dict:
    """Returns the module's state_dict as numpy arrays (what layout.load_torch_state_dict reads)."""
    return {k: v.numpy() for k, v in module.state_dict().items()}


def randomize_torch_(model: nn.Module, seed: int, *, small_layernorm_inputs: bool = True) -> None:
    """Fills model's parameters and buffers with random values, in place.

    Values keep activations of order 1 whatever the depth: kernels ~ N(0, 1/fan_in);
    BatchNorm running variances log-uniform in [1e-5, 1] with scales proportional to
    sqrt(var + 1e-5), so the eps matters in some channels; with small_layernorm_inputs
    the layers feeding a LayerNorm (ConvNeXt's stem conv and depthwise convs, the heads'
    hidden Linear layers) are scaled by 1e-3, so that the LayerNorm eps matters too.
    """
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    layernorm_inputs = _layernorm_inputs(model) if small_layernorm_inputs else set()
    new = {}
    for name, value in sd.items():
        prefix, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        shape = value.shape
        if leaf == "num_batches_tracked":
            new[name] = value
            continue
        if leaf == "running_var":
            new[name] = 10 ** (-5 * torch.rand(shape, generator=g))
        elif leaf == "running_mean":
            new[name] = 0.1 * torch.randn(shape, generator=g)
        elif leaf == "weight" and len(shape) >= 2:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            new[name] = torch.randn(shape, generator=g) / fan_in**0.5
        elif leaf in ("weight", "gamma"):
            new[name] = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "bias":
            new[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            raise AssertionError(f"unexpected tensor {name}")
        if prefix in layernorm_inputs and leaf in ("weight", "bias"):
            new[name] = new[name] * 1e-3
    for name in sd:  # BatchNorm: output scale of order 1 whatever the running variance
        if name.endswith("running_var"):
            prefix = name[: -len("running_var")]
            new[prefix + "weight"] = new[prefix + "weight"] * (new[name] + 1e-5).sqrt()
    model.load_state_dict(new, strict=True)


def _layernorm_inputs(model: nn.Module) -> set[str]:
    """Returns the names of the modules whose output goes straight into a LayerNorm."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, TorchConvNeXtBlock):
            names.add(f"{name}.dwconv")
        elif isinstance(module, TorchConvNeXt):
            names.add(f"{name}.downsample_layers.0.0".lstrip("."))
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (a, _), (_, nxt) in zip(children, children[1:]):
                if isinstance(nxt, nn.LayerNorm):
                    names.add(f"{name}.{a}")
    return names


# ------------------------------------------------------------------------ criterion


def _at_least_f32(x):
    return x if x.dtype == torch.float64 else x.float()


def _torch_var_cov(x):
    """(var term, cov term) of x (B, K, D): the means over k of the per-k terms."""
    b, _, d = x.shape
    xc = x - x.mean(dim=0)
    var = xc.square().sum(dim=0) / (b - 1)
    var_term = F.relu(1.0 - torch.sqrt(var + 1e-4)).mean()
    if b < d:  # the same sum of squares from the smaller Gram matrix
        total = torch.einsum("bkd,ckd->kbc", xc, xc).div(b - 1).square().sum(dim=(1, 2))
    else:
        total = torch.einsum("bkd,bke->kde", xc, xc).div(b - 1).square().sum(dim=(1, 2))
    cov_term = ((total - var.square().sum(dim=1)) / d).mean()
    return var_term, cov_term


def _torch_vicreg(x, y, coeffs):
    inv_c, var_c, cov_c = coeffs
    (vx, cx), (vy, cy) = _torch_var_cov(x), _torch_var_cov(y)
    return inv_c * F.mse_loss(x, y), var_c * (vx + vy) / 2, cov_c * (cx + cy) / 2


def _torch_matches(src_keys, dst_keys, src, dst, k):
    """Kept vectors of src (B, K, D) and their nearest (by keys) vectors of dst."""
    with torch.no_grad():
        nearest_dist, nearest = torch.cdist(_at_least_f32(src_keys), _at_least_f32(dst_keys)).min(dim=2)
        kept = (
            torch.arange(src.shape[1], device=src.device).expand(src.shape[0], -1)
            if k == src.shape[1]
            else torch.topk(-nearest_dist, k, dim=1).indices.sort(dim=1).values
        )
        partner = torch.gather(nearest, 1, kept)
    take = lambda m, idx: torch.gather(m, 1, idx[..., None].expand(-1, -1, m.shape[-1]))  # noqa: E731
    return take(src, kept), take(dst, partner)


def torch_vicregl_loss(
    embeddings,
    local_embeddings,
    grids,
    *,
    alpha=0.75,
    num_matches=(20, 4),
    l2_all_matches=True,
    coeffs=(25.0, 25.0, 1.0),
):
    """Returns (total, terms) of the VICRegL criterion over per-view lists: embeddings (B, D),
    local_embeddings (B, N, D), grids (B, N, 2); float32 statistics whatever the inputs."""
    terms, total = {}, 0.0
    pairs = [(i, j) for i in range(2) for j in range(len(grids or embeddings)) if j != i]
    if alpha > 0:
        z = [_at_least_f32(e) for e in embeddings]
        inv = coeffs[0] * sum(F.mse_loss(z[i], z[j]) for i, j in pairs) / len(pairs)
        stats = [_torch_var_cov(e[:, None]) for e in z]
        var = coeffs[1] * sum(v for v, _ in stats) / len(z)
        cov = coeffs[2] * sum(c for _, c in stats) / len(z)
        terms.update(global_inv=inv, global_var=var, global_cov=cov)
        total = total + alpha * (inv + var + cov)
    if alpha < 1:
        maps = [_at_least_f32(m) for m in local_embeddings]
        inv = var = cov = 0.0
        for i, j in pairs:
            n_i, n_j = maps[i].shape[1], maps[j].shape[1]
            l2 = (n_i, n_j) if l2_all_matches else num_matches
            directions = [
                _torch_matches(maps[i], maps[j], maps[i], maps[j], l2[0]),
                _torch_matches(maps[j], maps[i], maps[j], maps[i], l2[1]),
                _torch_matches(grids[i], grids[j], maps[i], maps[j], num_matches[0]),
                _torch_matches(grids[j], grids[i], maps[j], maps[i], num_matches[1]),
            ]
            for x, y in directions:
                t = _torch_vicreg(x, y, coeffs)
                inv, var, cov = inv + t[0] / 2, var + t[1] / 2, cov + t[2] / 2
        inv, var, cov = inv / len(pairs), var / len(pairs), cov / len(pairs)
        terms.update(local_inv=inv, local_var=var, local_cov=cov)
        total = total + (1 - alpha) * (inv + var + cov)
    terms["vicreg"] = total
    return total, terms


class TorchLARS(torch.optim.Optimizer):
    """LARS as the release runs it: weight decay and the trust ratio on 2+ dim parameters
    only, then momentum of the update, then the learning rate."""

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
