"""Compile time, memory and collectives of the pre-training step, before and after, on CPU.

    python benchmarks/efficiency_bench.py                       # every part (about 20 min on 2 cores)
    python benchmarks/efficiency_bench.py --parts compile,memory --baseline REV

"before" is the package at git revision --baseline (extracted with git archive), "after" this
checkout; each measurement runs in a fresh process (so one's compilation cache or memory does
not help the other), both in the same run. Parts:

  compile      lowering + compilation of the configs' train steps on 1 CPU device, float32
               (batch 8): the blocks of a stage traced and compiled once under a scan (as
               compiled for GPU / TPU: config.model.unroll_blocks=False; on CPU the stacks are
               unrolled by default, see vicregl_jax/models/stack.py).
  memory       XLA's buffer assignment (common.compiled_peak_bytes) of the ConvNeXt-S step on
               1 CPU device, bfloat16 compute, per sample, for each config.model.remat policy
               (stacks as loops, as on GPU / TPU).
  collectives  the bytes the criterion's collectives move per step (forward + backward) on 8
               CPU devices at the ConvNeXt-S recipe's shapes (2 x 7x7 + 6 x 3x3 maps, local
               dim 512, expander 8192), global batch 512; and the whole ConvNeXt-S step's
               collectives at global batch 64 (all from the compiled programs' HLO,
               common.collectives).
  time         step time of the configs on 1 CPU device, float32, batch 2 (median of 2), as a
               CPU runs them (stacks unrolled).

XLA:CPU is not an accelerator: the compile and memory figures move in the same direction on
GPU / TPU, the ratios not necessarily by the same amount (benchmarks/gpu.sh measures those).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, collective_totals, collectives, compiled_peak_bytes, print_table

CONFIGS = {
    "r50": "configs/r50.py",
    "convnext_s": "configs/convnext.py:size=s",
    "convnext_xl": "configs/convnext.py:size=xl",
}
PARTS = ("compile", "memory", "collectives", "time")
REMAT = ("none", "block", "dots")


# --------------------------------------------------------------------------------------------
# Probes: one measurement in this process, with whichever vicregl_jax is on the path
# --------------------------------------------------------------------------------------------


def _step_parts(
    config_name: str,
    batch: int,
    dtype: str,
    remat: str | None = None,
    *,
    abstract: bool = True,
    unroll: bool | None = False,
):
    """Returns (jitted step, state, batch, config) of a config's train step on all devices.

    unroll: config.model.unroll_blocks where the revision has it; False (the default here) is
    the program of an accelerator, one loop per stack of blocks (None: what this CPU runs).

    abstract: the state and batch as ShapeDtypeStructs with their shardings (what lowering and
    compiling need; a replicated ConvNeXt-S state and its optimiser would take 2.3 GB per
    virtual device of host memory).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from train_bench import synthetic_batch

    from vicregl_jax import build, sharding, train

    try:  # this revision: config files are read by config_files
        from vicregl_jax.config_files import load as load_config
    except ImportError:  # a baseline revision
        from vicregl_jax.config import load as load_config

    try:  # this revision: the model of a config's sections, the train state beside its checkpoints
        from vicregl_jax.checkpoint import TrainState
        from vicregl_jax.model_config import abstract_model, create_model, split_model

        def model_of(rngs=None):
            return (
                create_model(config.model, config.loss.alpha, rngs=rngs)
                if rngs is not None
                else abstract_model(config.model, config.loss.alpha, config.seed)
            )
    except ImportError:  # a baseline revision, before state.py was split
        from vicregl_jax.state import TrainState, abstract_model, create_model, split_model

        def model_of(rngs=None):
            return create_model(config, rngs=rngs) if rngs is not None else abstract_model(config)

    root = os.environ.get("VICREGL_BENCH_PACKAGE") or ROOT
    config = load_config(os.path.join(root, CONFIGS[config_name]))
    if config.data.dataset is None:
        config.data.dataset = "folder:unused"  # size=xl names no dataset: the step never reads one
    mesh = sharding.make_mesh()
    config.batch_size = batch
    config.model.dtype = dtype
    config.total_steps = 1000
    if remat is not None:
        config.model.remat = remat  # absent before: the probe of the baseline passes None
    if "unroll_blocks" in config.model:
        config.model.unroll_blocks = unroll
    schedule, tx = build.make_optimizer(config, steps_per_epoch=100, total_steps=1000)
    if abstract:  # build.init_train_state without allocating the state (same steps)

        def init():
            model = model_of(nnx.Rngs(config.seed))
            _, params, batch_stats, rest = split_model(model)
            return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params)), rest

        graphdef = split_model(model_of())[0]
        shapes, _ = jax.eval_shape(init)
        shardings = sharding.param_shardings(shapes, mesh, config.mesh.param_sharding, config.mesh.rules)
        streams = jax.jit(lambda: init()[1])()  # the random streams only: XLA drops the rest
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    else:
        graphdef, streams, state, shardings = build.init_train_state(config, tx, mesh)
    step = train.jit_train_step(
        train.make_train_step(graphdef, streams, tx, schedule, build.loss_config(config)), shardings, mesh
    )
    data = synthetic_batch(config, batch)
    if abstract:
        batch_sharding = sharding.batch_sharding(mesh)
        data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), data)
    else:
        data = jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh)), data)
    return step, state, data, config


def probe_compile(config_name: str, batch: int, dtype: str, remat: str | None) -> dict:
    step, state, data, _ = _step_parts(config_name, batch, dtype, remat)
    start = time.perf_counter()
    lowered = step.lower(state, data)
    lowered_s = time.perf_counter() - start
    compiled = lowered.compile()
    total = time.perf_counter() - start
    return {
        "lower_s": lowered_s,
        "compile_s": total,
        "peak_bytes": compiled_peak_bytes(compiled),
        "hlo_ops": sum(1 for line in compiled.as_text().splitlines() if " = " in line),
    }


def probe_time(config_name: str, batch: int, repeats: int) -> dict:
    import jax
    from common import median_seconds

    step, state, data, _ = _step_parts(config_name, batch, "float32", abstract=False, unroll=None)
    compiled = step.lower(state, data).compile()
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready(metrics)

    return {"step_s": median_seconds(one, repeats)}


def probe_criterion_collectives(batch: int) -> dict:
    """Collectives of the criterion's forward + backward alone at the ConvNeXt-S shapes."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from loss_bench import loss_inputs

    from vicregl_jax import losses, sharding

    mesh = sharding.make_mesh()
    emb, maps, grids = loss_inputs(batch, ((2, 7), (6, 3)))
    emb, maps, grids = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (emb, maps, grids))
    cfg = losses.LossConfig()
    context = getattr(sharding, "step_context", None)

    def loss(emb, maps, grids):
        if context is None:
            return losses.vicregl_loss(emb, maps, grids, cfg)[0]
        with context(mesh):
            return losses.vicregl_loss(emb, maps, grids, cfg)[0]

    batch_sharding = NamedSharding(mesh, P("data"))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=batch_sharding)
    text = fn.lower(emb, maps, grids).compile().as_text()
    return {"totals": _totals(collectives(text))}


def probe_step_collectives(config_name: str, batch: int) -> dict:
    step, state, data, _ = _step_parts(config_name, batch, "float32")
    items = collectives(step.lower(state, data).compile().as_text())
    return {"totals": _totals(items), "criterion": _totals(items, scope="criterion")}


def _totals(items, scope: str | None = None) -> dict:
    out = {}
    for (where, kind), (n, operand, moved) in collective_totals(items, ("criterion",)).items():
        if scope is None or where == scope:
            n0, o0, m0 = out.get(kind, (0, 0.0, 0.0))
            out[kind] = (n0 + n, o0 + operand, m0 + moved)
    return out


def probe(spec: dict) -> dict:
    """Runs one measurement described by spec (a dict of the driver's) and returns its figures."""
    part = spec["part"]
    if part == "compile":
        return probe_compile(spec["config"], spec["batch"], spec["dtype"], spec.get("remat"))
    if part == "time":
        return probe_time(spec["config"], spec["batch"], spec["repeats"])
    if part == "criterion_collectives":
        return probe_criterion_collectives(spec["batch"])
    if part == "step_collectives":
        return probe_step_collectives(spec["config"], spec["batch"])
    raise ValueError(f"unknown part {part!r}")


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def run_probe(spec: dict, package: str, devices: int, timeout: float) -> dict | None:
    """Returns the figures of spec measured in a fresh process on package, or None on failure."""
    env = dict(
        os.environ,
        VICREGL_BENCH_PACKAGE=package,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=package + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # measure compilation, not the cache
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--probe", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        print(f"  {spec} on {package}: timed out after {timeout:.0f} s", flush=True)
        return None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"  {spec} on {package} failed:\n{out.stderr[-3000:]}", flush=True)
    return None


def extract(revision: str, into: str) -> str:
    """Returns a directory holding vicregl_jax/ and configs/ of the git revision."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", revision, "vicregl_jax", "configs"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def ratio(before, after, fmt="{:.2f}x") -> str:
    return "-" if before is None or after is None or not after else fmt.format(before / after)


def mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--configs", default="convnext_s,r50")
    parser.add_argument(
        "--baseline",
        default="18949c5",
        help="git revision measured as 'before' (the last before scan, remat and the explicit collectives)",
    )
    parser.add_argument("--memory-batch", type=int, default=32)
    parser.add_argument("--collectives-batch", type=int, default=512)
    parser.add_argument("--step-collectives-batch", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per measurement")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print("RESULT " + json.dumps(probe(json.loads(args.probe))), flush=True)
        return
    parts = args.parts.split(",")
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        before_root = extract(args.baseline, tmp)
        roots = {"before": before_root, "after": ROOT}
        print(
            f"before = {args.baseline}, after = this checkout; load average {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} cores\n",
            flush=True,
        )

        if "compile" in parts:
            rows = []
            for name in configs:
                got = {
                    k: run_probe(
                        {"part": "compile", "config": name, "batch": 8, "dtype": "float32"}, root, 1, args.timeout
                    )
                    for k, root in roots.items()
                }
                b, a = got["before"] or {}, got["after"] or {}
                rows.append(
                    {
                        "config": CONFIGS[name],
                        "compile before": f"{b.get('compile_s', float('nan')):.1f} s",
                        "compile after": f"{a.get('compile_s', float('nan')):.1f} s",
                        "before / after": ratio(b.get("compile_s"), a.get("compile_s")),
                        "HLO instructions before -> after": f"{b.get('hlo_ops', '-')} -> {a.get('hlo_ops', '-')}",
                    }
                )
                print(rows[-1], flush=True)
            print("\nCompile time of the train step (1 CPU device, float32, batch 8):\n")
            print_table(rows)

        if "memory" in parts:
            rows = []
            batch = args.memory_batch
            spec = {"part": "compile", "config": "convnext_s", "batch": batch, "dtype": "bfloat16"}
            before = run_probe(spec, roots["before"], 1, args.timeout)
            base = before and before["peak_bytes"]
            rows.append(
                {
                    "code": f"before ({args.baseline})",
                    "remat": "none",
                    "peak": mib(base),
                    "MiB / sample": mib(base and base / batch),
                    "vs before": "1.00x",
                }
            )
            print(rows[-1], flush=True)
            for remat in REMAT:
                after = run_probe(dict(spec, remat=remat), roots["after"], 1, args.timeout)
                peak = after and after["peak_bytes"]
                rows.append(
                    {
                        "code": "after",
                        "remat": remat,
                        "peak": mib(peak),
                        "MiB / sample": mib(peak and peak / batch),
                        "vs before": ratio(peak, base, "{:.2f}x"),
                    }
                )
                print(rows[-1], flush=True)
            print(
                f"\nPeak memory of the ConvNeXt-S step (XLA:CPU buffer assignment, 1 device, batch {batch}, "
                "bfloat16 compute), by config.model.remat:\n"
            )
            print_table(rows)

        if "collectives" in parts:
            rows = []
            spec = {"part": "criterion_collectives", "batch": args.collectives_batch}
            got = {k: run_probe(spec, root, 8, args.timeout) for k, root in roots.items()}
            rows += _collective_rows("criterion, forward + backward", args.collectives_batch, got)
            spec = {"part": "step_collectives", "config": "convnext_s", "batch": args.step_collectives_batch}
            got = {k: run_probe(spec, root, 8, args.timeout) for k, root in roots.items()}
            rows += _collective_rows("ConvNeXt-S train step", args.step_collectives_batch, got)
            print(
                "\nCollectives per step on 8 CPU devices (from the compiled HLO; MiB per device: operands, and "
                "sent by ring algorithms):\n"
            )
            print_table(rows)

        if "time" in parts:
            rows = []
            for name in configs:
                got = {
                    k: run_probe({"part": "time", "config": name, "batch": 2, "repeats": 2}, root, 1, args.timeout)
                    for k, root in roots.items()
                }
                b, a = (got[k] and got[k]["step_s"] for k in ("before", "after"))
                rows.append(
                    {
                        "config": CONFIGS[name],
                        "step before": "-" if b is None else f"{b:.1f} s",
                        "step after": "-" if a is None else f"{a:.1f} s",
                        "before / after": ratio(b, a),
                    }
                )
                print(rows[-1], flush=True)
            print("\nStep time on 1 CPU device (float32, batch 2, median of 2):\n")
            print_table(rows)


def _sent_ratio(before, after) -> str:
    """Returns before / after, or what happened when either side moves less than 1 MiB."""
    if before is None or after is None:
        return "-"
    if after < 2**20:
        return "none left" if before >= 2**20 else "-"
    if before < 2**20:
        return "new"
    return f"{before / after:.2f}x"


def _collective_rows(what: str, batch: int, got: dict) -> list[dict]:
    rows = []
    kinds = sorted({k for r in got.values() if r for k in r["totals"]})
    for kind in kinds + ["all"]:
        cells = {}
        for side in ("before", "after"):
            totals = got[side]["totals"] if got[side] else None
            if totals is None:
                cells[side] = (None, None)
            elif kind == "all":
                cells[side] = (sum(v[1] for v in totals.values()), sum(v[2] for v in totals.values()))
            else:
                cells[side] = tuple(totals.get(kind, (0, 0.0, 0.0))[1:])
        rows.append(
            {
                "program": f"{what}, batch {batch}",
                "collective": kind,
                "operand MiB before -> after": f"{mib(cells['before'][0])} -> {mib(cells['after'][0])}",
                "sent MiB before -> after": f"{mib(cells['before'][1])} -> {mib(cells['after'][1])}",
                "sent: before / after": _sent_ratio(cells["before"][1], cells["after"][1]),
            }
        )
    return rows


if __name__ == "__main__":
    main()
