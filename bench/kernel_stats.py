"""Offline evidence for the Triton Cut^nMix kernel: compile every variant for a GPU that is not
there (Triton's `GPUTarget`) and read the machine code (docs/performance.md#the-kernel-offline).

    python -m bench.kernel_stats                 # table: sm_90a and sm_80, P=3, 32x32
    python -m bench.kernel_stats --json          # list of {variant, arch, registers, ...}
    python -m bench.kernel_stats --arch 90 --peers 5

Per variant (mode family box/blend/none x output dtype x layout peers/grouped): registers per
thread, spills (local-memory bytes), Triton's shared memory, SASS instructions per output element
(static count x threads / outputs per program: the kernel is straight-line code, so it is what
each thread issues, an upper bound where a branch skips work) and the global load/store widths
read from the SASS (cuobjdump/ptxas bundled with Triton). Pointer arguments are compiled as
16-byte aligned, as Triton specialises them at run time for torch tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from pipeline import backends

ARCHS = {90: "sm_90a", 80: "sm_80"}
DTYPES = ("bf16", "fp16", "fp32")  # Triton signature names of the output dtypes
FAMILIES = {"box": {"BOX": True, "BLEND": False}, "blend": {"BOX": False, "BLEND": True}, "none": {"BOX": False, "BLEND": False}}
LAYOUTS = ("peers", "grouped")
# runtime (non-constexpr) arguments of pipeline.ops.triton_impl._cutnmix_kernel, in order
ARG_TYPES = {
    "img_ptr": "*u8",
    "out_ptr": None,  # the output dtype
    "oy_ptr": "*i64",
    "ox_ptr": "*i64",
    "flip_ptr": "*i1",
    "perm_ptr": "*i64",
    "bh_ptr": "*i64",
    "bw_ptr": "*i64",
    "by_ptr": "*i64",
    "bx_ptr": "*i64",
    "lam_ptr": "*fp32",
    "B": "i32",
    "pad": "i32",
    "mean0": "fp32",
    "mean1": "fp32",
    "mean2": "fp32",
    "inv0": "fp32",
    "inv1": "fp32",
    "inv2": "fp32",
}
# SASS memory instruction suffix -> bytes per thread
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)[^;]*;")


def tool(name: str) -> str:
    """Path of a binary bundled with Triton's NVIDIA backend (ptxas, cuobjdump, nvdisasm)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def available() -> bool:
    """Triton with compile-for-target and its bundled cuobjdump are present."""
    if not backends.available("triton"):
        return False
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    return Path(tool("cuobjdump")).exists()


def compile_kernel(fn, arg_types: dict, constexprs: dict, arch: int, num_warps: int, **options):
    """triton.compile of `fn` for `arch` (90 -> sm_90a, 80 -> sm_80) without a device;
    pointer arguments 16-byte aligned. Returns the CompiledKernel (asm: ptx, cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    signature = {n: arg_types.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in arg_types.items() if t.startswith("*")}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, **options))


def sass_stats(cubin: bytes) -> dict:
    """Registers, local (spill) bytes, SASS instruction count and global access widths of a cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    ops = [m.group(1) for m in _INSTR.finditer(sass)]
    ops = [o for o in ops if not o.startswith("NOP")]
    loads, stores = Counter(), Counter()
    for o in ops:
        parts = o.split(".")
        if parts[0] in ("LDG", "STG"):
            width = next((_WIDTH[p] for p in parts[1:] if p in _WIDTH), 4)
            (loads if parts[0] == "LDG" else stores)[width] += 1
    return {"registers": regs, "spills": local, "instructions": len(ops), "loads": dict(loads), "stores": dict(stores)}


def kernel_variants(peers: int = 3, height: int = 32, width: int = 32):
    """(name, fn, arg_types, constexprs, num_warps, outputs per program, compile options) of every
    variant, as `pipeline.ops.triton_impl.triton_cutnmix_views` launches it."""
    import triton

    from pipeline.ops.triton_impl import _cutnmix_kernel, compile_options, launch_config

    cfg = launch_config(height, width)
    warps = cfg.pop("num_warps")
    for family, flags in FAMILIES.items():
        for dt in DTYPES:
            for layout in LAYOUTS:
                const = dict(P=peers, PG=triton.next_power_of_2(peers), H=height, W=width,
                             GROUPED=layout == "grouped", **flags, **cfg)
                types = dict(ARG_TYPES, out_ptr="*" + dt)
                yield (f"{family}-{dt}-{layout}", _cutnmix_kernel, types, const, warps, peers * height * width * 3,
                       compile_options(flags["BOX"]))


def measure(name, fn, arg_types, constexprs, num_warps, outputs, options, arch) -> dict:
    k = compile_kernel(fn, arg_types, constexprs, arch, num_warps, enable_fp_fusion=False, **options)
    s = sass_stats(k.asm["cubin"])
    return {
        "variant": name,
        "arch": ARCHS[arch],
        "registers": s["registers"],
        "spills": s["spills"],
        "shared_bytes": int(k.metadata.shared),
        "instructions_per_output_element": round(s["instructions"] * num_warps * 32 / outputs, 2),
        "store_bytes": max(s["stores"], default=0),
        "sass_instructions": s["instructions"],
        "threads": num_warps * 32,
        "loads": {f"{w}B": n for w, n in sorted(s["loads"].items())},
        "stores": {f"{w}B": n for w, n in sorted(s["stores"].items())},
    }


def collect(archs=(90, 80), peers: int = 3, height: int = 32, width: int = 32, only: str | None = None) -> list[dict]:
    rows = []
    for arch in archs:
        for v in kernel_variants(peers, height, width):
            if only is None or re.search(only, v[0]):
                rows.append(measure(*v, arch))
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'variant':<22} {'arch':<7} {'regs':>4} {'spill':>5} {'smem':>6} {'instr/out':>9}  loads (width x count)   stores"
    lines = [head, "-" * len(head)]
    for r in rows:
        ld = " ".join(f"{w}x{n}" for w, n in r["loads"].items())
        st = " ".join(f"{w}x{n}" for w, n in r["stores"].items())
        lines.append(
            f"{r['variant']:<22} {r['arch']:<7} {r['registers']:>4} {r['spills']:>5} {r['shared_bytes']:>6} "
            f"{r['instructions_per_output_element']:>9}  {ld:<23} {st}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_stats", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print a JSON list of objects")
    ap.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS), help="90 (sm_90a) and/or 80 (sm_80); default both")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--only", help="regular expression on the variant name, e.g. 'box-bf16'")
    a = ap.parse_args(argv)
    if not available():
        print("error: needs triton with GPUTarget compilation and its bundled cuobjdump")
        return 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 1
    rows = collect(tuple(a.arch or (90, 80)), a.peers, only=a.only)
    print(json.dumps(rows, indent=1) if a.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
