"""Milliseconds per training iteration on the paper's Gaussian-mixture configuration.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_gmm.py [--dim 50] [--num-walkers 10000]
        [--num-data 10000] [--float32] [--repeats 3] [--json results/bench_gmm.json]

Each method is timed as (time of fit with N2 iterations - time with N1 iterations) /
(N2 - N1) (defaults 1020 and 20), which removes compilation and set-up (compiled code
comes from a persistent cache after the first call); methods alternate within each
repeat so that both see the same machine load, and the median over repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--num-walkers", type=int, default=10_000)
    parser.add_argument("--num-data", type=int, default=10_000)
    parser.add_argument("--float32", action="store_true")
    parser.add_argument("--methods", default="jarzynski,pcd")
    parser.add_argument("--short", type=int, default=20, help="N1 iterations")
    parser.add_argument("--long", type=int, default=1020, help="N2 iterations")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()

    jax.config.update("jax_enable_x64", not args.float32)
    # fit builds a fresh jitted loop per call: a persistent compilation cache turns the
    # repeated compilations into cache loads, so their noise stays out of the difference
    import tempfile

    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="bench_gmm_cache_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from numpyro_ebm import fit
    from numpyro_ebm.experiments import gmm

    config = gmm.GMMConfig(
        dim=args.dim, num_walkers=args.num_walkers, num_data=args.num_data,
        float64=not args.float32,
    )
    key = jax.random.key(0)
    data = gmm.sample_mixture(key, gmm.teacher_params(config), config.num_data)
    params0 = gmm.initial_params(key, config)
    walkers0 = gmm.sample_mixture(key, params0, config.num_walkers)
    methods = args.methods.split(",")

    def timed(method: str, iterations: int) -> float:
        t0 = time.perf_counter()
        result = fit(
            gmm.mixture_potential, params0, data, optimizer=gmm.optimizer(config),
            kernel=method, num_walkers=config.num_walkers, step_size=config.step_size,
            num_iterations=iterations, rng_key=key, init_particles=walkers0,
            chunk_size=iterations,
        )
        jax.block_until_ready(result.params)
        return time.perf_counter() - t0

    per_iter: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            short = timed(m, args.short)
            long = timed(m, args.long)
            per_iter[m].append(1e3 * (long - short) / (args.long - args.short))

    dtype = "float32" if args.float32 else "float64"
    print(
        f"GMM d={args.dim}, {args.num_walkers} walkers, {args.num_data} data, {dtype}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].device_kind}"
    )
    print(f"{'method':<10} {'ms/iter (median)':>17} {'all repeats':>30}")
    medians = {m: statistics.median(v) for m, v in per_iter.items()}
    for m in methods:
        print(f"{m:<10} {medians[m]:>17.2f} {str([round(v, 2) for v in per_iter[m]]):>30}")
    if "jarzynski" in medians and "pcd" in medians:
        print(f"jarzynski / pcd = {medians['jarzynski'] / medians['pcd']:.3f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "config": vars(args),
                    "machine": {
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                        "device": jax.devices()[0].device_kind,
                        "jax": jax.__version__,
                    },
                    "ms_per_iteration": per_iter,
                    "median_ms_per_iteration": medians,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
