"""Milliseconds per training iteration on the paper's Gaussian-mixture configuration.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_gmm.py [--dim 50] [--num-walkers 10000]
        [--num-data 10000] [--float32] [--noise-dtype float32] [--iterations 100]
        [--repeats 7] [--json results/bench_gmm.json]

Timing method (``benchmarks/timing.py``): ``fit``'s own jitted chunk of ``--iterations``
training iterations is compiled ahead of time (compile time reported on its own), called
once to warm up, then the methods are called in turn (interleaved, so that they share the
machine's load), each call ended by ``block_until_ready``; the median over ``--repeats``
of (call time / iterations) is reported, with the CPU time of the process beside it (on a
machine shared with other jobs the CPU time is the steadier of the two).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--num-walkers", type=int, default=10_000)
    parser.add_argument("--num-data", type=int, default=10_000)
    parser.add_argument("--float32", action="store_true")
    parser.add_argument("--noise-dtype", default=None)
    parser.add_argument("--methods", default="jarzynski,pcd")
    parser.add_argument("--iterations", type=int, default=100, help="iterations per timed call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()

    jax.config.update("jax_enable_x64", not args.float32)
    import jax.numpy as jnp

    from numpyro_ebm import kernels
    from numpyro_ebm.experiments import gmm
    from numpyro_ebm.training import build_trainer

    config = gmm.GMMConfig(dim=args.dim, num_walkers=args.num_walkers, num_data=args.num_data,
                           float64=not args.float32)
    key = jax.random.key(0)
    data = gmm.sample_mixture(key, gmm.teacher_params(config), config.num_data)
    params0 = gmm.initial_params(key, config)
    walkers0 = gmm.sample_mixture(jax.random.key(1), params0, config.num_walkers)
    methods = args.methods.split(",")
    noise_dtype = None if args.noise_dtype is None else jnp.dtype(args.noise_dtype)

    variants, compile_s = {}, {}
    for m in methods:
        kernel = kernels.for_method(m, config.step_size, ess_threshold=config.ess_threshold,
                                    restart_every=config.cd_restart_every, noise_dtype=noise_dtype)
        trainer = build_trainer(gmm.mixture_potential, gmm.optimizer(config), kernel)
        state = trainer.init(params0, walkers0)
        chunk = timing.chunk_runner(trainer, key, config.num_walkers)
        compiled, compile_s[m] = timing.compile_chunk(chunk, state, data, args.iterations)
        variants[m] = (compiled, (state, data), args.iterations)
    for fn, fargs, _ in variants.values():  # warm-up
        jax.block_until_ready(fn(*fargs))
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m, (fn, fargs, k) in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*fargs))
            wall[m].append(1e3 * (time.perf_counter() - t0) / k)
            cpu[m].append(1e3 * (time.process_time() - c0) / k)

    dtype = "float32" if args.float32 else "float64"
    print(f"GMM d={args.dim}, {args.num_walkers} walkers, {args.num_data} data, {dtype}, noise "
          f"{args.noise_dtype or dtype}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}")
    print(f"{'method':<10} {'wall ms/iter':>13} {'cpu ms/iter':>12} {'compile s':>10}  wall repeats")
    medians = {m: statistics.median(v) for m, v in wall.items()}
    cpu_medians = {m: statistics.median(v) for m, v in cpu.items()}
    for m in methods:
        print(f"{m:<10} {medians[m]:>13.2f} {cpu_medians[m]:>12.2f} {compile_s[m]:>10.2f}  "
              f"{[round(v, 2) for v in wall[m]]}")
    if "jarzynski" in medians and "pcd" in medians:
        print(f"jarzynski / pcd = {medians['jarzynski'] / medians['pcd']:.3f} (wall), "
              f"{cpu_medians['jarzynski'] / cpu_medians['pcd']:.3f} (cpu)")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"config": vars(args),
                       "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                   "device": jax.devices()[0].device_kind, "jax": jax.__version__},
                       "method": "compiled chunk, interleaved, median (benchmarks/timing.py)",
                       "ms_per_iteration": wall, "cpu_ms_per_iteration": cpu,
                       "median_ms_per_iteration": medians, "median_cpu_ms_per_iteration": cpu_medians,
                       "compile_s": compile_s}, fh, indent=2)


if __name__ == "__main__":
    main()
