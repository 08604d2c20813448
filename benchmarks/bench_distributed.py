"""Time per training iteration with the walkers split over processes on one machine, and
the cost of resampling across processes (issue 17).

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_distributed.py --json benchmarks/results/bench_distributed.json

Each layout ``PxD`` (P processes on localhost, D CPU devices each, meeting through
``numpyro_ebm.distributed.initialize``; CPU collectives over gloo) trains the paper's
Gaussian mixture (d = 50, 10^4 data, float64 walkers with float32 noise, Jarzynski) at each
walker count twice, alternating:

* ``never``: ``ess_threshold=1e-9``, no resampling;
* ``always``: ``ess_threshold=1``: the walkers are resampled at every iteration (the ESS
  falls below N after every move), ancestors drawn from all the weights and walkers
  gathered across devices and processes.

An iteration's time is (time of ``fit`` with N2 iterations - time with N1) / (N2 - N1), so
that compilation and set-up cancel (compiled code comes from a persistent cache after the
first call); the median over repeats is reported. ``always - never`` is the cost of one
resampling. Every process computes; process 0 reports.

``--single`` measures in this process on its default device only (e.g. one GPU: see
``benchmarks/gpu_distributed.py``); ``--resampling-alone`` times one resampling step on 1
and 2 CPU devices of one process, with the weights split or copied whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CACHE = os.path.join(tempfile.gettempdir(), "numpyro_ebm_bench_cache")
ITERATIONS = {100_000: (2, 12), 1_000_000: (2, 6)}  # (N1, N2); chunks of N1 iterations


def measure(num_walkers: int, mode: str, repeats: int, mesh) -> dict:
    """Median ms per iteration of ``fit`` on ``mesh`` (``None``: default device)."""
    import jax
    import numpy as np

    from numpyro_ebm import fit
    from numpyro_ebm.experiments import gmm
    from numpyro_ebm.kernels import jarzynski_ula

    config = gmm.GMMConfig(num_walkers=num_walkers)
    key = jax.random.key(0)
    data = gmm.sample_mixture(jax.random.fold_in(key, 1), gmm.teacher_params(config), config.num_data)
    params = gmm.initial_params(jax.random.fold_in(key, 2), config)
    walkers = gmm.sample_mixture(jax.random.fold_in(key, 3), params, num_walkers)
    threshold = {"never": 1e-9, "always": 1.0}[mode]
    kernel = jarzynski_ula.walker_kernel(config.step_size, ess_threshold=threshold,
                                         noise_dtype=np.float32)
    short, long = ITERATIONS.get(num_walkers, (2, 12))

    def timed(iterations):
        start = time.perf_counter()
        result = fit(gmm.mixture_potential, params, data, optimizer=gmm.optimizer(config), kernel=kernel,
                     num_walkers=num_walkers, num_iterations=iterations, rng_key=jax.random.key(1),
                     init_particles=walkers, chunk_size=short, mesh=mesh)
        jax.block_until_ready(result.params)
        return time.perf_counter() - start, float(np.mean(result.trace["resampled"]))

    timed(short)  # compile (and fill the cache)
    per_it, fraction = [], None
    for _ in range(repeats):
        t_short, _ = timed(short)
        t_long, fraction = timed(long)
        per_it.append(1e3 * (t_long - t_short) / (long - short))
    return {"num_walkers": num_walkers, "mode": mode, "ms_per_iteration": statistics.median(per_it),
            "repeats_ms": per_it, "resampled_fraction": fraction}


def resampling_alone(num_walkers: int = 100_000, dim: int = 50, repeats: int = 5) -> None:
    """One systematic resampling (BlackJAX) and the gather of the walkers, jitted, on one
    device and on 2 CPU devices of this process, with the weights split over the devices
    (XLA partitions the cumulative sum) and copied whole to each device first (what
    ``kernels.base`` does under ``jax.set_mesh``)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from blackjax.smc import resampling
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("walkers",))
    split = NamedSharding(mesh, PartitionSpec("walkers"))
    x = jax.random.normal(jax.random.key(0), (num_walkers, dim))
    log_w = jax.nn.log_softmax(0.5 * jax.random.normal(jax.random.key(1), (num_walkers,)))

    def resample(whole):
        def fn(key, x, log_w):
            w = jnp.exp(log_w)
            if whole:
                w = jax.lax.with_sharding_constraint(w, PartitionSpec())
            return x[resampling.systematic(key, w, num_walkers)]
        return fn

    def time_it(fn, *args):
        fn(*args).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args).block_until_ready()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)

    key = jax.random.key(2)
    print(f"resampling {num_walkers} walkers (d = {dim}), median of {repeats}:")
    print(f"  1 device:                        {time_it(jax.jit(resample(False)), key, x, log_w):8.1f} ms")
    xs, log_ws = jax.device_put(x, split), jax.device_put(log_w, split)
    print(f"  2 devices, weights split:        "
          f"{time_it(jax.jit(resample(False), out_shardings=split), key, xs, log_ws):8.1f} ms")
    with jax.set_mesh(mesh):
        print(f"  2 devices, weights whole (fix):  "
              f"{time_it(jax.jit(resample(True), out_shardings=split), key, xs, log_ws):8.1f} ms")


def worker(args) -> None:
    from numpyro_ebm import distributed

    if args.num_processes > 1:
        distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id,
                               cpu_devices=args.devices)
    elif not args.single:
        import jax

        jax.config.update("jax_num_cpu_devices", args.devices)
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    mesh = None if args.single or jax.device_count() == 1 else distributed.global_mesh()
    for num_walkers in args.walkers:
        for mode in ("never", "always", "never", "always")[: 2 * args.rounds]:
            row = measure(num_walkers, mode, args.repeats, mesh)
            row.update(layout=f"{jax.process_count()}x{jax.local_device_count() if mesh else 1}",
                       device=jax.devices()[0].device_kind)
            if distributed.is_main_process():
                print("RESULT " + json.dumps(row), flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def launch(layout: str, args) -> list[dict]:
    """Run one layout ``PxD`` as P processes; the rows process 0 printed."""
    num_processes, devices = (int(v) for v in layout.split("x"))
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--worker", "--num-processes", str(num_processes), "--devices",
           str(devices), "--port", str(port), "--repeats", str(args.repeats), "--rounds", str(args.rounds),
           "--walkers", *map(str, args.walkers)]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    rows = []
    try:
        for line in procs[0].stdout:  # rows as they come
            if line.startswith("RESULT "):
                rows.append(row := json.loads(line[7:]))
                print(f"{layout:>4} {row['num_walkers']:>8} {row['mode']:>6} {row['ms_per_iteration']:9.1f} "
                      f"ms/it (resampled {row['resampled_fraction']:.2f})", flush=True)
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per layout and walker count: medians of the rounds, and always - never."""
    table = []
    for layout in dict.fromkeys(r["layout"] for r in rows):
        for n in dict.fromkeys(r["num_walkers"] for r in rows):
            pick = {m: [r["ms_per_iteration"] for r in rows if r["layout"] == layout
                        and r["num_walkers"] == n and r["mode"] == m] for m in ("never", "always")}
            if pick["never"] and pick["always"]:
                never, always = statistics.median(pick["never"]), statistics.median(pick["always"])
                table.append({"layout": layout, "num_walkers": n, "never_ms": never, "always_ms": always,
                              "resampling_ms": always - never})
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=["1x1", "1x2", "2x1"])
    p.add_argument("--walkers", nargs="+", type=int, default=[100_000, 1_000_000])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="never/always alternations")
    p.add_argument("--json", default=None)
    p.add_argument("--single", action="store_true", help="this process, default device only")
    p.add_argument("--resampling-alone", action="store_true",
                   help="time one resampling on 1 and 2 CPU devices (weights split or whole)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.resampling_alone:
        resampling_alone()
        return
    if args.worker or args.single:
        worker(args)
        return
    rows = [row for layout in args.layouts for row in launch(layout, args)]
    table = summarise(rows)
    print(f"{'layout':>6} {'walkers':>9} {'no resampling':>14} {'resampling every it':>20} {'per resampling':>15}")
    for t in table:
        print(f"{t['layout']:>6} {t['num_walkers']:>9} {t['never_ms']:>11.1f} ms {t['always_ms']:>17.1f} ms "
              f"{t['resampling_ms']:>12.1f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows, "table": table},
                      fh, indent=1)


if __name__ == "__main__":
    main()
