"""log Z of a Gaussian-mixture EBM: `estimate_log_normalizer` (adaptive Jarzynski-weighted
ULA) against BlackJAX's adaptive tempered SMC with MALA moves, error against potential
evaluations per walker.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_normalizer.py [--repeats 8] [--json FILE]

Targets: two-mode mixtures of unit Gaussians in d = 2 (modes at (-3, 0), (3, 1)) and
d = 10 (modes at -3 e1, +3 e1), masses 0.3 / 0.7, exact log Z in closed form. Both methods
anneal from the same Gaussian base N(0, 3^2 I) along (1 - lambda) U_base + lambda U with
the same target ESS, walkers and moves per step. Evaluations count value-and-gradient
evaluations per walker (BlackJAX: one per MALA step, plus one log-likelihood value per
tempering step for its ESS solve; Jarzynski: as counted by the kernel's info).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def targets():
    two = {"means": jnp.array([[-3.0, 0.0], [3.0, 1.0]]), "logits": jnp.log(jnp.array([0.3, 0.7]))}
    ten = {
        "means": jnp.zeros((2, 10)).at[0, 0].set(-3.0).at[1, 0].set(3.0),
        "logits": jnp.log(jnp.array([0.3, 0.7])),
    }
    return {"d=2": two, "d=10": ten}


def run_blackjax(potential, params, dim, key, num_walkers, step_size, num_mcmc_steps, target_ess):
    import blackjax

    scale = 3.0
    log_z_base = dim * (math.log(scale) + 0.5 * math.log(2 * math.pi))

    def logprior(x):
        return -0.5 * jnp.sum((x / scale) ** 2) - log_z_base

    def loglik(x):
        return -potential(params, x) - logprior(x)

    smc = blackjax.adaptive_tempered_smc(
        logprior, loglik, blackjax.mala.build_kernel(), blackjax.mala.init,
        {"step_size": jnp.array([step_size])}, blackjax.smc.resampling.systematic, target_ess,
        num_mcmc_steps=num_mcmc_steps,
    )
    k0, k1 = jax.random.split(key)
    state = smc.init(scale * jax.random.normal(k0, (num_walkers, dim)))

    def cond(carry):
        state, *_ = carry
        return state.tempering_param < 1.0

    def body(carry):
        state, key, log_z, steps = carry
        key, sub = jax.random.split(key)
        state, info = smc.step(sub, state)
        return state, key, log_z + info.log_likelihood_increment, steps + 1

    init = (state, k1, jnp.zeros(()), jnp.zeros((), jnp.int32))
    state, _, log_z, steps = jax.lax.while_loop(cond, body, init)
    return log_z, steps * (num_mcmc_steps + 1) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--num-walkers", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    from numpyro_ebm.experiments.gmm import mixture_log_normalizer, mixture_potential
    from numpyro_ebm.normalizer import estimate_log_normalizer

    rows = []
    settings = [(0.2, 5, 0.5), (0.2, 10, 0.5), (0.2, 10, 0.8), (0.1, 20, 0.5)]
    for name, params in targets().items():
        dim = params["means"].shape[1]
        exact = float(mixture_log_normalizer(params))
        for h, moves, target in settings:
            t0 = time.perf_counter()
            res = estimate_log_normalizer(
                mixture_potential, params, jax.random.key(0), num_walkers=args.num_walkers,
                event_shape=(dim,), base_scale=3.0, step_size=h, num_mcmc_steps=moves,
                target_ess=target, num_repeats=args.repeats,
            )
            err = np.asarray(res.estimates) - exact
            rows.append({
                "target": name, "method": "jarzynski-ula", "step_size": h, "moves": moves,
                "target_ess": target, "bias": float(err.mean()),
                "rmse": float(np.sqrt(np.mean(err**2))),
                "evaluations": float(np.mean(res.num_potential_evaluations)),
                "seconds": time.perf_counter() - t0,
            })
            t0 = time.perf_counter()
            run = jax.jit(jax.vmap(lambda k, p=params, d=dim, h=h, m=moves, t=target: run_blackjax(
                mixture_potential, p, d, k, args.num_walkers, h, m, t)))
            log_z, evals = run(jax.random.split(jax.random.key(1), args.repeats))
            err = np.asarray(log_z) - exact
            rows.append({
                "target": name, "method": "blackjax-tempered-mala", "step_size": h,
                "moves": moves, "target_ess": target, "bias": float(err.mean()),
                "rmse": float(np.sqrt(np.mean(err**2))), "evaluations": float(np.mean(evals)),
                "seconds": time.perf_counter() - t0,
            })
            for r in rows[-2:]:
                print(
                    f"{r['target']:<5} {r['method']:<24} h={r['step_size']:<4} "
                    f"moves={r['moves']:<3} ess={r['target_ess']:<4} bias={r['bias']:+.4f} "
                    f"rmse={r['rmse']:.4f} evals={r['evaluations']:.0f} ({r['seconds']:.1f} s)",
                    flush=True,
                )
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"config": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
