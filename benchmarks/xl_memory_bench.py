"""Does ConvNeXt-XL pre-train at the release's batch on a v4-32 slice? The compiled memory of
its sharded train step, per device.

    python benchmarks/xl_memory_bench.py                  # 32 devices, remat block / dots / none
    python benchmarks/xl_memory_bench.py --devices 16 --remat block

Ahead-of-time compilation for a TPU topology (jax.experimental.topologies) needs libtpu, which
a machine without TPUs does not have; this script compiles configs/convnext.py:size=xl (FSDP
parameters, global batch 576, 2 x 224 + 6 x 96 crops, bfloat16 compute) for --devices
virtual CPU devices instead, in a fresh process, and reads XLA's buffer assignment of the
per-device program (common.compiled_peak_bytes). XLA:CPU's buffers are not a TPU's: the
factor between them is measured, not assumed: the ConvNeXt-S step of the revision --baseline
at batch 128, bfloat16, is compiled the same way on 1 CPU device, and the H200 run of that
revision peaked at --measured-gib (README, Speed) on the device; their ratio scales the CPU
figures (an estimate; a TPU compiles its own program, with its own fusion and layouts).

A v4-32 slice has 16 chips of 32 GiB (32 TensorCores; JAX sees one device per chip, as
megacore): run with --devices 16 for that reading, 32 for 32 devices of 32 GiB.
"""

from __future__ import annotations

import argparse
import tempfile

from common import ROOT, print_table
from efficiency_bench import extract, run_probe

HBM_GIB = 32.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=32)
    parser.add_argument("--batch", type=int, default=576, help="global batch (configs/convnext.py's)")
    parser.add_argument("--remat", default="block,dots,none")
    parser.add_argument("--baseline", default="189940b", help="the revision of the H200 measurement")
    parser.add_argument(
        "--measured-gib",
        type=float,
        default=58.16,
        help="the device peak of the baseline's ConvNeXt-S step at batch 128 on the H200",
    )
    parser.add_argument("--no-calibration", dest="calibrate", action="store_false")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    factor = None
    if args.calibrate:
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"part": "compile", "config": "convnext_s", "batch": 128, "dtype": "bfloat16"}
            got = run_probe(spec, extract(args.baseline, tmp), 1, args.timeout)
        if got:
            factor = args.measured_gib * 2**30 / got["peak_bytes"]
            print(
                f"calibration: ConvNeXt-S step of {args.baseline}, batch 128, bfloat16: XLA:CPU "
                f"{got['peak_bytes'] / 2**30:.2f} GiB, H200 {args.measured_gib:.2f} GiB: factor {factor:.2f}",
                flush=True,
            )
    rows = []
    for remat in args.remat.split(","):
        spec = {"part": "compile", "config": "convnext_xl", "batch": args.batch, "dtype": "bfloat16", "remat": remat}
        got = run_probe(spec, ROOT, args.devices, args.timeout)
        cpu = got and got["peak_bytes"] / 2**30
        estimate = cpu and factor and cpu * factor
        rows.append(
            {
                "remat": remat,
                "devices": args.devices,
                "batch per device": args.batch // args.devices,
                "XLA:CPU per device": "-" if cpu is None else f"{cpu:.1f} GiB",
                "x factor": "-" if estimate is None else f"{estimate:.1f} GiB",
                f"fits {HBM_GIB:.0f} GiB": "-" if cpu is None else ("yes" if (estimate or cpu) < HBM_GIB else "no"),
                "compile": "-" if got is None else f"{got['compile_s']:.0f} s",
            }
        )
        print(rows[-1], flush=True)
    print(
        f"\nConvNeXt-XL train step, global batch {args.batch}, FSDP over {args.devices} devices, bfloat16 "
        f"(factor {'n/a' if factor is None else f'{factor:.2f}'}):\n"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
