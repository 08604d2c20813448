"""One training process of the multi-process tests (tests/test_distributed.py); not a test.

    NUMPYRO_EBM_COORDINATOR=localhost:PORT NUMPYRO_EBM_NUM_PROCESSES=2 NUMPYRO_EBM_PROCESS_ID=I \\
        python tests/distributed_worker.py --out OUT.npz --cpu-devices 2 --checkpoint-dir DIR

joins the other processes (from those environment variables; without them it runs alone
on ``--cpu-devices`` CPU devices), trains a small quadratic energy with Jarzynski walkers
split over every device of every process, and process 0 writes the final parameters,
walkers, weights, log normaliser and trace to ``--out``. ``--kill-process I --kill-at K``
makes process I kill itself (SIGKILL) when iteration K is reached, before that
iteration's checkpoint; ``--shard-data`` gives each process only its own rows of the data
(``distributed.shard_data``).
"""

import argparse
import os
import signal

from numpyro_ebm import distributed


class KillAt:
    """SIGKILL process ``process`` at the end of the chunk that reaches iteration ``at``
    (every process holds one, so that they all run the same callbacks)."""

    def __init__(self, at, process):
        self.at, self.process = at, process

    def on_chunk(self, ctx, chunk):
        import jax

        if jax.process_index() == self.process and chunk.start + chunk.length == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


class FirstChunk:
    """Records where the first chunk started (0, or the iteration a resume began at)."""

    start = None

    def on_chunk(self, ctx, chunk):
        if self.start is None:
            self.start = chunk.start


def energy(params, x):
    import jax.numpy as jnp

    return 0.5 * jnp.sum((x - params["mu"]) ** 2) * jnp.exp(-2.0 * params["log_scale"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cpu-devices", type=int, default=1)
    p.add_argument("--num-iterations", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--kill-process", type=int, default=None)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--shard-data", action="store_true", help="each process passes only its rows of the data")
    args = p.parse_args()
    if os.environ.get(distributed.ENV_COORDINATOR):
        distributed.initialize(cpu_devices=args.cpu_devices)
    else:
        import jax

        jax.config.update("jax_num_cpu_devices", args.cpu_devices)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from numpyro_ebm import fit
    from numpyro_ebm.kernels import jarzynski_ula
    from numpyro_ebm.training.callbacks import Checkpoint

    jax.config.update("jax_enable_x64", True)
    data = 1.5 + 0.7 * jax.random.normal(jax.random.key(0), (200, 3))
    params = {"mu": jnp.zeros(3), "log_scale": jnp.zeros(())}
    first = FirstChunk()
    callbacks = [first]
    if args.kill_at is not None:
        callbacks.append(KillAt(args.kill_at, args.kill_process))
    if args.checkpoint_dir:
        callbacks.append(Checkpoint(args.checkpoint_dir, every=args.checkpoint_every, resume=True))
    mesh = distributed.global_mesh() if jax.device_count() > 1 else None
    if args.shard_data:  # process p holds rows [p n/P, (p+1) n/P) only
        rows = data.shape[0] // jax.process_count()
        data = distributed.shard_data(np.asarray(data)[jax.process_index() * rows:][:rows], mesh)
    result = fit(energy, params, data, optimizer=optax.sgd(0.05),
                 kernel=jarzynski_ula.walker_kernel(0.3, ess_threshold=0.9), num_walkers=64,
                 num_iterations=args.num_iterations, rng_key=jax.random.key(args.seed),
                 init_particles="standard_normal", chunk_size=5, callbacks=callbacks, mesh=mesh)
    params, state = distributed.to_host((result.params, result.state))
    if distributed.is_main_process():
        np.savez(args.out, mu=params["mu"], log_scale=params["log_scale"], particles=state.particles,
                 log_weights=state.log_weights, log_normalizer=state.log_normalizer,
                 resampled=result.trace["resampled"], log_normalizer_trace=result.trace["log_normalizer"],
                 first_chunk_start=first.start, num_processes=jax.process_count(),
                 num_devices=jax.device_count())


if __name__ == "__main__":
    main()
