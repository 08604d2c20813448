"""Cost of recording the trace inside ``fit``'s jitted loop (issue 4: at most 5 %).

Run by hand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_trace_overhead.py [--dim 50] [--walkers 10000]
        [--data 10000] [--iterations 300] [--repeats 3]

GMM experiment configuration (``numpyro_ebm.experiments.gmm``, float64, full-batch
gradient, Jarzynski). Variants, all the same computation:

* ``no trace``: a replica of ``fit``'s iteration (same kernel, gradient, optimiser, keys,
  chunking) whose ``lax.scan`` emits nothing;
* ``core trace``: the replica emitting the fields ``fit`` recorded before issue 4
  (grad_norm, data_energy, log_normalizer, cross_entropy, ess, resampled);
* ``fit``: :func:`numpyro_ebm.fit` with its full trace (adds normalized_ess, max_weight,
  step_size);
* ``fit + snapshots``: ``fit(snapshot_every=50, khat_fn=pareto_khat)`` (walker copies and
  the host-side PSIS after the run).

``fit`` builds a fresh jitted function per call, so JAX's persistent compilation cache is
switched on (in a temporary folder) and every variant is run once untimed: the timed runs
then load the compiled code and measure the training loop, not XLA. Timed runs are
interleaved (A B C D A B C D ...) so that load from other processes hits all variants
alike; minimum and median of wall and process CPU time are reported. The replica's
final parameters are checked against ``fit``'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ebm_bench_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from blackjax.smc import resampling  # noqa: E402

from numpyro_ebm import fit  # noqa: E402
from numpyro_ebm.diagnostics import pareto_khat  # noqa: E402
from numpyro_ebm.estimators import ce_value_and_grad  # noqa: E402
from numpyro_ebm.experiments.gmm import (  # noqa: E402
    GMMConfig,
    initial_params,
    mixture_log_normalizer,
    mixture_potential,
    sample_mixture,
    teacher_params,
)
from numpyro_ebm.kernels import jarzynski_ula  # noqa: E402
from numpyro_ebm.kernels.jarzynski_ula import build_kernel, init  # noqa: E402
from numpyro_ebm.training.callbacks import ParetoKhat, Snapshots  # noqa: E402


def replica_fit(params, data, walkers, *, config, rng_key, log_z0, record, chunk=250):
    """``fit``'s Jarzynski iteration, with no trace (``record=False``) or the core trace."""
    _, loop_key = jax.random.split(rng_key)
    optimizer = optax.sgd(config.learning_rate)
    state = init(walkers, params, mixture_potential)
    kernel = build_kernel(
        mixture_potential, config.step_size, resampling.systematic, config.ess_threshold, 1,
    )

    def body(carry, iteration):
        params, opt_state, state = carry
        key = jax.random.fold_in(loop_key, iteration)
        _, move_key, _ = jax.random.split(key, 3)
        data_energy, grads = ce_value_and_grad(mixture_potential, params, data, state)
        row = None
        if record:
            row = {
                "grad_norm": optax.global_norm(grads),
                "data_energy": data_energy,
                "log_normalizer": state.log_normalizer,
                "cross_entropy": data_energy + log_z0 + state.log_normalizer,
            }
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        state, info = kernel(move_key, state, new_params)
        if record:
            row["ess"] = info.ess
            row["resampled"] = info.resampled
        return (new_params, opt_state, state), row

    run_chunk = jax.jit(
        lambda carry, start, length: jax.lax.scan(body, carry, start + jnp.arange(length)),
        static_argnums=(2,),
    )
    carry = (params, optimizer.init(params), state)
    start, rows = 0, []
    while start < config.num_iterations:
        length = min(chunk, config.num_iterations - start)
        carry, chunk_rows = run_chunk(carry, jnp.asarray(start), length)
        rows.append(jax.device_get(chunk_rows))
        start += length
    return carry[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--walkers", type=int, default=10_000)
    parser.add_argument("--data", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = GMMConfig(
        dim=args.dim, num_data=args.data, num_walkers=args.walkers,
        num_iterations=args.iterations,
    )
    key = jax.random.key(config.seed)
    data_key, init_key, walker_key, fit_key = jax.random.split(key, 4)
    data = sample_mixture(data_key, teacher_params(config), config.num_data)
    params0 = initial_params(init_key, config)
    walkers0 = sample_mixture(walker_key, params0, config.num_walkers)
    log_z0 = float(mixture_log_normalizer(params0))

    def run_fit(callbacks=()):
        result = fit(
            mixture_potential, params0, data, optimizer=optax.sgd(config.learning_rate),
            kernel=jarzynski_ula.walker_kernel(config.step_size, ess_threshold=config.ess_threshold),
            num_walkers=config.num_walkers, num_iterations=config.num_iterations, rng_key=fit_key,
            init_particles=walkers0, log_z0=log_z0, callbacks=list(callbacks),
        )
        return jax.block_until_ready(result.params)

    def run_replica(record):
        return jax.block_until_ready(
            replica_fit(params0, data, walkers0, config=config, rng_key=fit_key,
                        log_z0=log_z0, record=record)
        )

    variants = {
        "no trace": lambda: run_replica(False),
        "core trace": lambda: run_replica(True),
        "fit": run_fit,
        "fit + snapshots": lambda: run_fit([Snapshots(50), ParetoKhat(pareto_khat)]),
    }
    print(f"GMM d={config.dim}, {config.num_walkers} walkers, {config.num_data} data, "
          f"{config.num_iterations} iterations, float64; backend {jax.default_backend()}, "
          f"{os.cpu_count()} CPU(s) visible, load average {os.getloadavg()[0]:.2f}")
    finals = {}
    for name, run in variants.items():  # compile and fill the persistent cache
        t0 = time.perf_counter()
        finals[name] = run()
        print(f"  warm-up {name:<16} {time.perf_counter() - t0:7.2f} s (with compilation)")
    np.testing.assert_allclose(finals["no trace"]["means"], finals["fit"]["means"], rtol=1e-8)
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    # wall time suffers from other processes on a shared machine; the process CPU time
    # (all threads of this process) much less so. Minimum = least disturbed run.
    for label, table in (("wall", wall), ("CPU", cpu)):
        base_min = min(table["no trace"])
        base_med = statistics.median(table["no trace"])
        print(f"\n{label} time  {'min s':>8}{'vs none':>9}{'median s':>10}{'vs none':>9}"
              f"{'ms/iter':>9}   all runs (s)")
        for name, ts in table.items():
            lo, med = min(ts), statistics.median(ts)
            print(f"{name:<16}{lo:>8.2f}{100 * (lo / base_min - 1):>+8.1f}%{med:>10.2f}"
                  f"{100 * (med / base_med - 1):>+8.1f}%{1e3 * lo / config.num_iterations:>9.1f}"
                  "   " + " ".join(f"{t:.2f}" for t in ts))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
