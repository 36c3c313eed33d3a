"""`maxmodel compile --topology v5p-256 [--slices N] [CONFIG.yaml] [key=value ...] [--json]`

Compiles the real sharded train step for a TPU slice on this CPU host and prints the memory each chip needs
against its HBM. Exits 1 when the layout does not fit (2 for bad usage), so scripts can gate a pod launch.
"""
from __future__ import annotations

import argparse
import os
import sys

from maxmodel import jsonio
from maxmodel.config import load_config_args
from maxmodel.planner.config_memory import TOLERANCE, estimate

GIB = 1024 ** 3


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", required=True, help="TPU type, e.g. v5p-8, v5e-16, v6e-256, v4-32")
    parser.add_argument("--slices", type=int, default=1, help="number of slices (multi-slice over DCN)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("args", nargs="*", help="an optional CONFIG.yaml, then key.sub=value overrides")
    ns = parser.parse_args(argv)
    cfg = load_config_args(ns.args)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU, but never try to open one here

    from .aot import DoesNotFit, compile_for_topology
    try:
        report = compile_for_topology(cfg, ns.topology, ns.slices)
    except DoesNotFit as e:
        if ns.json and e.used_bytes:
            print(jsonio.dumps({"fits": False, "error": str(e), "mesh": e.mesh, "needed_bytes": e.used_bytes,
                                "hbm_bytes_per_device": e.hbm_bytes, "estimate": estimate(cfg, e.used_bytes, e.mesh)}))
        print(f"maxmodel compile: does not fit: {e}", file=sys.stderr)
        if e.used_bytes and not ns.json:
            print(_estimate_line(estimate(cfg, e.used_bytes, e.mesh)), file=sys.stderr)
        return 1
    planned = estimate(cfg, report.needed_bytes, report.mesh)
    if ns.json:
        print(jsonio.dumps({**report.as_dict(), "estimate": planned}))
    else:
        mesh = " × ".join(f"{k}={v}" for k, v in report.mesh.items() if v > 1) or "1 device"
        print(f"{report.topology} × {report.slices} slice(s): {report.devices} {report.device_kind} devices, mesh {mesh}")
        for name, value in (("arguments", report.argument_bytes), ("outputs", report.output_bytes),
                            ("donated (aliased)", -report.alias_bytes), ("temporaries", report.temp_bytes),
                            ("code", report.code_bytes)):
            print(f"  {name:<18} {value / GIB:10.3f} GiB")
        if report.host_temp_bytes:
            print(f"  {'host (offloaded)':<18} {report.host_temp_bytes / GIB:10.3f} GiB, not counted against HBM")
        print(f"  {'needed per chip':<18} {report.needed_bytes / GIB:10.3f} GiB of "
              f"{report.hbm_bytes_per_device / GIB:.1f} GiB HBM -> {'fits' if report.fits else 'DOES NOT FIT'}")
        print(_estimate_line(planned))
    if not report.fits:
        print(f"maxmodel compile: needs {report.needed_bytes / GIB:.2f} GiB per chip, "
              f"{report.hbm_bytes_per_device / GIB:.1f} GiB available", file=sys.stderr)
        return 1
    return 0


def _estimate_line(e: dict) -> str:
    verdict = "within" if e["within_tolerance"] else "OUTSIDE"
    return (f"  {'planner estimate':<18} {e['estimate_bytes'] / GIB:10.3f} GiB = {e['ratio']:.2f} × compiled "
            f"({verdict} the planner's ±{TOLERANCE:.0%})")
