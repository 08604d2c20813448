"""Cost of drawing a data minibatch per iteration: the old scheme (a
``jax.random.choice(..., replace=False)`` over the whole data set every iteration) against
the trainer's epoch scheme (one permutation per epoch, carried in the scan, and a
``dynamic_slice`` + gather per iteration).

    .venv/bin/python benchmarks/bench_minibatch.py [--num-data 1000000 --dim 50 --batch 256]

Times a jitted ``lax.scan`` of ``--iterations`` draws (each summed, so nothing is
optimised away) after a warm-up: median of ``--repeats``, in ms per iteration.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from numpyro_ebm.training.loop import _batch_source


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-data", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    key = jax.random.key(0)
    data = jax.random.normal(key, (a.num_data, a.dim), jnp.float32)

    @jax.jit
    def old(data, key):
        def body(total, k):
            idx = jax.random.choice(jax.random.fold_in(key, k), a.num_data, (a.batch,), False)
            return total + jnp.sum(data[idx]), None
        return jax.lax.scan(body, 0.0, jnp.arange(a.iterations))[0]

    @jax.jit
    def epoch(data, key):
        first_order, next_batch = _batch_source(key, data, a.batch)

        def body(carry, k):
            total, order = carry
            batch, order = next_batch(order, k)
            return (total + jnp.sum(batch), order), None
        return jax.lax.scan(body, (0.0, first_order(jnp.asarray(0))), jnp.arange(a.iterations))[0][0]

    per_epoch = a.num_data // a.batch
    print(f"{a.num_data} points of dim {a.dim}, batch {a.batch} ({per_epoch} batches per epoch), "
          f"{a.iterations} iterations per timing, backend {jax.default_backend()}")
    for name, fn in (("choice(replace=False) every iteration", old), ("permutation per epoch", epoch)):
        fn(data, key).block_until_ready()
        times = []
        for r in range(a.repeats):
            t0 = time.perf_counter()
            fn(data, jax.random.fold_in(key, r)).block_until_ready()
            times.append(1e3 * (time.perf_counter() - t0) / a.iterations)
        print(f"  {name:<40} {statistics.median(times):8.3f} ms/it (median of {a.repeats})")
    print("  (the epoch scheme's permutation of the first epoch is inside the timed scan: its "
          f"cost is shared by {min(a.iterations, per_epoch)} iterations here, by {per_epoch} in a "
          "whole epoch)")


if __name__ == "__main__":
    main()
