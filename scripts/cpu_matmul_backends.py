"""Which XLA CPU settings make bfloat16 matmuls fast on this CPU, next to PyTorch.

Usage:
  python scripts/cpu_matmul_backends.py                     # n = 2048, 7 repeats, 3 passes
  python scripts/cpu_matmul_backends.py --n 4096 --out benchmarks/cpu_matmul_backends.json

For every setting in `SETTINGS` (XLA_FLAGS of the installed jaxlib's CPU backend: oneDNN,
XNNPACK, YNNPACK, fast math, the instruction-set cap) it starts a fresh process (XLA reads its
flags once, and aborts the process on a flag it does not know) that times an n x n x n matmul
in float32, in bfloat16 (bfloat16 result, as the model's projections) and in bfloat16 with a
float32 result (``preferred_element_type``, as the model's logits): the median of ``--repeats``
calls after a warm-up, in GFLOP/s; ``--passes`` passes over all settings, one after another,
report each setting's median pass (so that load from other processes does not fall on one
setting alone). Each result is checked against a float64 product of the same
inputs, and the optimized HLO is searched for library calls (oneDNN, XNNPACK/YNNPACK), so a
setting that changes nothing says so. A last process times ``torch.matmul`` in float32 and
bfloat16 (PyTorch's CPU bfloat16 matmul goes through oneDNN, which uses AMX where the CPU has
it). It prints a table with the CPU model, its AMX/AVX-512 bfloat16 flags and the load average,
and writes everything as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

SETTINGS: dict[str, str] = {
    "default": "",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    "xnnpack_off": "--xla_cpu_use_xnnpack=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_dot_fusion": (
        "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"
    ),
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    "onednn_custom_call_dot": (
        "--xla_cpu_experimental_onednn_custom_call=true "
        "--xla_cpu_experimental_onednn_fusion_type=dot"
    ),
    "xnn_dot_fusion": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xnn_dot_fusion_ynn_off": (
        "--xla_cpu_experimental_xnn_fusion_type=dot --xla_cpu_experimental_ynn_fusion_type="
    ),
    "xnn_graph_greedy": (
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"
    ),
    "ynn_dot_fusion": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "max_isa_amx": "--xla_cpu_max_isa=AMX",
    "no_excess_precision": "--xla_allow_excess_precision=false",
    "thunk_runtime_off": "--xla_cpu_use_thunk_runtime=false",
    "mkl_dnn_old_name": "--xla_cpu_use_mkl_dnn=true",
}
"""Setting name -> XLA_FLAGS. Flags of one setting only; each runs in its own process."""
VARIANTS = ("float32", "bfloat16", "bfloat16_f32_out")
_LIBRARY_FUSION = re.compile(r'"kind":"__(\w+?)_fusion"')
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_RESULT_DTYPE = re.compile(r"= (\w+)\[")


def _library_calls(hlo: str) -> list[str]:
    """Library fusions (oneDNN, XNNPACK, YNNPACK) and custom calls in optimized HLO."""
    return sorted(set(_LIBRARY_FUSION.findall(hlo)) | set(_CUSTOM_CALL.findall(hlo)))


def _matmul_dtypes(hlo: str) -> list[str]:
    """Result dtypes of the dot instructions and library fusions: ``f32`` for a bfloat16 matmul
    means XLA converted its inputs to float32 and ran a float32 matmul."""
    dtypes = set()
    for line in hlo.splitlines():
        if " dot(" in line or "kind=kCustom" in line or "custom-call(" in line:
            match = _RESULT_DTYPE.search(line)
            if match:
                dtypes.add(match.group(1))
    return sorted(dtypes)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return a, b


def _bf16_rounded(x):
    """float32 values rounded to bfloat16 and back (round to nearest even), in numpy."""
    import numpy as np

    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32)


def _relative_error(out, reference) -> float:
    import numpy as np

    out = np.asarray(out, np.float64)
    return float(np.max(np.abs(out - reference)) / np.max(np.abs(reference)))


def xla_worker(n: int, repeats: int) -> dict:
    """Times the three matmul variants in this process (under its XLA_FLAGS)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a32, b32 = _inputs(n)
    a16, b16 = _bf16_rounded(a32), _bf16_rounded(b32)
    reference = {
        "float32": a32.astype(np.float64) @ b32.astype(np.float64),
        "bfloat16": a16.astype(np.float64) @ b16.astype(np.float64),
    }
    flops = 2.0 * n**3
    out = {"jax": jax.__version__}
    for variant in VARIANTS:
        if variant == "float32":
            x, y = jnp.asarray(a32), jnp.asarray(b32)
            fn = jax.jit(jnp.matmul)
        else:
            x, y = jnp.asarray(a32, jnp.bfloat16), jnp.asarray(b32, jnp.bfloat16)
            preferred = jnp.float32 if variant == "bfloat16_f32_out" else None
            fn = jax.jit(lambda p, q, t=preferred: jnp.matmul(p, q, preferred_element_type=t))
        compiled = fn.lower(x, y).compile()
        hlo = compiled.as_text()
        seconds = _time(lambda c=compiled, x=x, y=y: c(x, y).block_until_ready(), repeats)
        result = compiled(x, y)
        ref = reference["float32" if variant == "float32" else "bfloat16"]
        out[variant] = {
            "seconds": seconds,
            "gflops": flops / seconds / 1e9,
            "max_relative_error": _relative_error(result, ref),
            "library_calls": _library_calls(hlo),
            "matmul_dtypes": _matmul_dtypes(hlo),
        }
    return out


def torch_worker(n: int, repeats: int) -> dict:
    """Times torch.matmul in float32 and bfloat16 in this process."""
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a32, b32 = _inputs(n)
    a16, b16 = _bf16_rounded(a32), _bf16_rounded(b32)
    flops = 2.0 * n**3
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for variant, dtype, ref in (
        ("float32", torch.float32, a32.astype(np.float64) @ b32.astype(np.float64)),
        ("bfloat16", torch.bfloat16, a16.astype(np.float64) @ b16.astype(np.float64)),
    ):
        x = torch.from_numpy(a32).to(dtype)
        y = torch.from_numpy(b32).to(dtype)
        with torch.no_grad():
            seconds = _time(lambda x=x, y=y: torch.matmul(x, y), repeats)
            result = torch.matmul(x, y).float().numpy()
        out[variant] = {
            "seconds": seconds,
            "gflops": flops / seconds / 1e9,
            "max_relative_error": _relative_error(result, ref),
        }
    return out


def _run_worker(kind: str, flags: str | None, n: int, repeats: int) -> dict:
    env = dict(os.environ)
    if flags is not None:
        env["XLA_FLAGS"] = flags
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--n", str(n)]
    cmd += ["--repeats", str(repeats)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        # XLA's fatal log line reads "F<date> <time> <thread> <file>:<line>] <message>".
        message = lines[-1].split("] ", 1)[-1] if lines else f"exit code {result.returncode}"
        return {"error": message[:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_facts() -> dict:
    """The CPU model and its bfloat16-related instruction-set flags (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f"))
    return {"model": model, "cores": os.cpu_count(), "bf16_flags": wanted}


def _median_row(passes: list[dict]) -> dict:
    """One setting's result: the median GFLOP/s over the passes, with each pass's value."""
    ok = [p for p in passes if "error" not in p]
    if not ok:
        return passes[0]
    row = {k: v for k, v in ok[0].items() if not isinstance(v, dict)}
    for variant in (v for v in ok[0] if isinstance(ok[0][v], dict)):
        entry = dict(ok[0][variant])
        entry["gflops_per_pass"] = [round(p[variant]["gflops"], 1) for p in ok]
        entry["gflops"] = statistics.median(entry["gflops_per_pass"])
        entry["seconds"] = statistics.median(p[variant]["seconds"] for p in ok)
        entry["max_relative_error"] = max(p[variant]["max_relative_error"] for p in ok)
        row[variant] = entry
    return row


def _cell(row: dict, variant: str) -> str:
    entry = row.get(variant)
    if entry is None:
        return "-"
    return f"{entry['gflops']:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048, help="matrix size n (n x n x n matmul)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant")
    parser.add_argument("--passes", type=int, default=3, help="passes over all settings")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch row")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", choices=("xla", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "xla":
        print(json.dumps(xla_worker(args.n, args.repeats)))
        return 0
    if args.worker == "torch":
        print(json.dumps(torch_worker(args.n, args.repeats)))
        return 0

    results = {
        "cpu": cpu_facts(),
        "n": args.n,
        "repeats": args.repeats,
        "load_1min_before": os.getloadavg()[0],
        "xla": {},
    }
    # Every setting once per pass, passes in a row: a burst of load from other processes then
    # slows every setting a little instead of one setting a lot. Per setting and variant the
    # median over the passes is reported.
    runs: dict[str, list[dict]] = {}
    jobs = [("xla", name, SETTINGS[name]) for name in args.settings]
    if not args.no_torch:
        jobs.append(("torch", "torch", None))
    for _ in range(args.passes):
        for kind, name, flags in jobs:
            runs.setdefault(name, []).append(_run_worker(kind, flags, args.n, args.repeats))
    for kind, name, flags in jobs:
        row = _median_row(runs[name])
        if kind == "xla":
            row["xla_flags"] = flags
            results["xla"][name] = row
        else:
            results["torch"] = row
    results["load_1min_after"] = os.getloadavg()[0]

    cpu = results["cpu"]
    print(
        f"{cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['bf16_flags']) or 'none'}; "
        f"{args.n}^3 matmul, medians of {args.repeats} calls and {args.passes} passes; 1-min load "
        f"{results['load_1min_before']:.2f} before, {results['load_1min_after']:.2f} after"
    )
    print(
        f"{'setting':<24} {'f32 GFLOP/s':>12} {'bf16':>8} {'bf16->f32':>10}  "
        "bf16 matmul runs in / library calls"
    )
    for name, row in results["xla"].items():
        if "error" in row:
            print(f"{name:<24} {'rejected':>12} {'':>8} {'':>10}  {row['error'][:70]}")
            continue
        calls = sorted({c for v in VARIANTS for c in row[v]["library_calls"]})
        bad = [v for v in VARIANTS if row[v]["max_relative_error"] > 1e-2]
        note = (
            f"{'/'.join(row['bfloat16']['matmul_dtypes'])}; {', '.join(calls) or 'no library'}"
            + (f"; WRONG RESULT {bad}" if bad else "")
        )
        print(
            f"{name:<24} {_cell(row, 'float32'):>12} {_cell(row, 'bfloat16'):>8} "
            f"{_cell(row, 'bfloat16_f32_out'):>10}  {note}"
        )
    if "torch" in results:
        row = results["torch"]
        if "error" in row:
            print(f"{'torch':<24} {'failed':>12}  {row['error'][:70]}")
        else:
            print(
                f"{'torch ' + row['torch']:<24} {_cell(row, 'float32'):>12} "
                f"{_cell(row, 'bfloat16'):>8} {'-':>10}  {row['threads']} threads"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
