"""The single-GPU figure beside benchmarks/bench_distributed.py's multi-process CPU figures
(issue 17): ms per Jarzynski iteration on the paper's Gaussian mixture (d = 50, 10^4 data,
float64 walkers, float32 noise) at 10^5 and 10^6 walkers, without resampling and with
resampling at every iteration, on one device.

    python benchmarks/gpu_distributed.py --out DIR

prints a table and writes DIR/gpu_distributed.json. About 1-3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--walkers", nargs="+", type=int, default=[100_000, 1_000_000])
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    import jax

    jax.config.update("jax_enable_x64", True)
    import bench_distributed

    # each fit call compiles its loop again: from the persistent cache after the first
    jax.config.update("jax_compilation_cache_dir", bench_distributed.CACHE + "_gpu")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    bench_distributed.ITERATIONS.update({100_000: (5, 45), 1_000_000: (5, 25)})
    rows = []
    for n in args.walkers:
        for mode in ("never", "always", "never", "always"):
            row = bench_distributed.measure(n, mode, args.repeats, None)
            row.update(layout="1 GPU", device=jax.devices()[0].device_kind)
            rows.append(row)
            print(f"{n:>8} {mode:>6} {row['ms_per_iteration']:8.2f} ms/it (resampled "
                  f"{row['resampled_fraction']:.2f}) on {row['device']}", flush=True)
    print(f"{'walkers':>9} {'no resampling':>14} {'resampling every it':>20} {'per resampling':>15}")
    for n in args.walkers:
        med = {m: statistics.median(r["ms_per_iteration"] for r in rows if r["num_walkers"] == n
                                    and r["mode"] == m) for m in ("never", "always")}
        print(f"{n:>9} {med['never']:>11.2f} ms {med['always']:>17.2f} ms {med['always'] - med['never']:>12.2f} ms")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_distributed.json"), "w") as fh:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
