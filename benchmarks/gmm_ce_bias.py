"""Where the cross-entropy estimate's error on the paper's GMM comes from: the final error
of the Jarzynski estimate, with and without the feedback correction
(:func:`numpyro_ebm.estimators.feedback_bias_step`), against the number of walkers, the
learning rate and the resampling threshold, over seeds; and the per-iteration error.

Run by hand (not a test; minutes per 10^4-walker run on a 2-core CPU):

    python benchmarks/gmm_ce_bias.py --walkers 1000,3000 --seeds 0,1,2 --json out.json
    python benchmarks/gmm_ce_bias.py --walkers 100000 --seeds 0 --out DIR   # GPU
    python benchmarks/gmm_ce_bias.py --figure docs/figures/gmm_ce_error.png [--walkers 10000]

``--figure``: one run (the first of ``--walkers``, ``--seeds``) and, at its 8 walker
snapshots, ``estimate_log_normalizer`` at that iteration's parameters (forward from the
data's Gaussian, reverse from the weighted walkers); the figure shows every estimate of
``log Z`` minus the exact value, with two standard errors.

Each run is ``GMMConfig(methods=("jarzynski",), ...)``; ``--lr-scale s`` multiplies both
learning rates by ``s`` and divides the number of iterations by ``s`` (the same path length).
Prints one line per run and a summary per setting (mean and standard error over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def one(num_walkers, seed, lr_scale, ess, iterations, dim, islands=True, heldout=0):
    from numpyro_ebm.experiments import gmm

    base = gmm.GMMConfig()
    config = gmm.GMMConfig(
        dim=dim, num_walkers=num_walkers, seed=seed, methods=("jarzynski",), ess_threshold=ess,
        learning_rate=base.learning_rate * lr_scale,
        logit_learning_rate=base.logit_learning_rate * lr_scale,
        num_iterations=int(round(iterations / lr_scale)), island_resampling=islands, heldout_groups=heldout,
    )
    t0 = time.perf_counter()
    r = gmm.run(config)["jarzynski"]
    err = r["cross_entropy"] - r["exact_cross_entropy"]
    err_c = r["cross_entropy_corrected"] - r["exact_cross_entropy"]
    every = max(1, len(err) // 200)
    return {
        "num_walkers": num_walkers, "seed": seed, "lr_scale": lr_scale, "ess_threshold": ess,
        "num_iterations": config.num_iterations, "dim": dim, "island_resampling": islands,
        "final_error": r["ce_estimate_error"], "final_corrected_error": r["ce_corrected_error"],
        "total_feedback_correction": float(np.sum(r["feedback_bias"])),
        "final_stderr": r["final_cross_entropy_stderr"],
        "num_resampling": r["num_resampling"], "final_small_mass": r["final_small_mass"],
        "mean_normalized_ess": float(np.mean(r["result"].trace["normalized_ess"])),
        "error_trace": err[::every].tolist(), "corrected_error_trace": err_c[::every].tolist(),
        "stderr_trace": r["cross_entropy_stderr"][::every].tolist(),
        "trace_every": every, "wall_s": time.perf_counter() - t0, "heldout_groups": heldout,
        **({"final_heldout_error": r["ce_heldout_error"],
            "final_heldout_stderr": r["final_cross_entropy_heldout_stderr"],
            "heldout_error_trace": (r["cross_entropy_heldout"] - r["exact_cross_entropy"])[::every].tolist(),
            "heldout_stderr_trace": r["cross_entropy_heldout_stderr"][::every].tolist()} if heldout else {}),
    }


def bounds_along_run(num_walkers, seed, out_png, annealing_walkers=500):
    """The figure of the docs (see the module docstring)."""
    import warnings

    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from numpyro_ebm.experiments import gmm
    from numpyro_ebm.normalizer import estimate_log_normalizer

    config = gmm.GMMConfig(num_walkers=num_walkers, seed=seed, methods=("jarzynski",),
                           record_params=True)
    res = gmm.run(config)
    r = res["jarzynski"]
    trace = r["result"].trace
    snaps = trace["snapshots"]
    rows = []
    jax.config.update("jax_enable_x64", True)
    for j, k in enumerate(np.asarray(snaps["iteration"])):
        params = jax.tree.map(lambda a, k=int(k): a[k], trace["extra"]["params"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = estimate_log_normalizer(
                gmm.mixture_potential, params, jax.random.key(int(k)), num_walkers=annealing_walkers,
                data=res["data"][:2000], model_samples=snaps["particles"][j],
                model_log_weights=snaps["log_weights"][j], step_size=config.step_size,
                target_ess=0.9)
        exact = float(gmm.mixture_log_normalizer(params))
        rows.append({"iteration": int(k), "exact": exact, "lower": float(est.lower),
                     "lower_se": float(est.stderr), "upper": float(est.upper),
                     "upper_se": float(est.upper_stderr), "warned": len(caught) > 0})
        print(rows[-1], flush=True)
    it = np.arange(len(r["cross_entropy"]))
    err = r["cross_entropy"] - r["exact_cross_entropy"]
    err_c = r["cross_entropy_corrected"] - r["exact_cross_entropy"]
    se = r["cross_entropy_stderr"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.axhline(0.0, color="k", lw=0.8)
    ax.plot(it, err, color="C0", label="training estimate (Jarzynski) - exact")
    ax.plot(it, err_c, color="C2", label="with the feedback correction")
    ax.fill_between(it, err_c - 2 * se, err_c + 2 * se, color="C2", alpha=0.25,
                    label="± 2 s.e. (10 walker groups)")
    ks = np.array([row["iteration"] for row in rows])
    for name, color, marker in (("lower", "C3", "^"), ("upper", "C1", "v")):
        vals = np.array([row[name] - row["exact"] for row in rows])
        ses = np.array([row[name + "_se"] for row in rows])
        ax.errorbar(ks, vals, yerr=2 * ses, fmt=marker, color=color, capsize=3,
                    label=f"annealing at theta_k: {name} ± 2 s.e.")
    ax.set_xlabel("training iteration k")
    ax.set_ylabel("estimate of log Z (or CE) - exact  [nats]")
    ax.set_title(f"GMM, d={config.dim}, {num_walkers} walkers: log Z estimates against the exact value")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    with open(out_png.rsplit(".", 1)[0] + ".json", "w") as fh:
        json.dump({"annealing": rows, "final_error": r["ce_estimate_error"],
                   "final_corrected_error": r["ce_corrected_error"],
                   "final_stderr": r["final_cross_entropy_stderr"]}, fh, indent=1)
    print(f"saved {out_png}")


def summary(runs):
    keys = sorted({(r["num_walkers"], r["lr_scale"], r["ess_threshold"]) for r in runs})
    lines = [f"{'N':>7} {'lr x':>5} {'ess':>5} {'seeds':>5} {'error':>16} {'corrected':>16} "
             f"{'correction':>10} {'group se':>8} {'sd(corr.)':>9} {'|z|<2':>6}"]
    for n, s, e in keys:
        sel = [r for r in runs if (r["num_walkers"], r["lr_scale"], r["ess_threshold"]) == (n, s, e)]
        def ms(name, sel=sel):
            v = np.array([r[name] for r in sel])
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
            return f"{v.mean():+.4f} ± {se:.4f}"
        corr = np.mean([r["total_feedback_correction"] for r in sel])
        se = np.sqrt(np.mean([r.get("final_stderr", np.nan) ** 2 for r in sel]))
        sd = np.std([r["final_corrected_error"] for r in sel], ddof=1) if len(sel) > 1 else np.nan
        z = np.array([r["final_corrected_error"] / r.get("final_stderr", np.nan) for r in sel])
        lines.append(f"{n:>7} {s:>5} {e:>5} {len(sel):>5} {ms('final_error'):>16} "
                     f"{ms('final_corrected_error'):>16} {corr:>10.4f} {se:>8.4f} {sd:>9.4f} "
                     f"{np.mean(np.abs(z) < 2):>6.2f}")
        held = [r for r in sel if "final_heldout_error" in r]
        if held:
            v = np.array([r["final_heldout_error"] for r in held])
            hs = np.array([r["final_heldout_stderr"] for r in held])
            lines.append(f"{'':>7} held-out estimate ({held[0]['heldout_groups']} groups): error {v.mean():+.4f} ± "
                         f"{v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float('nan'):.4f}, sd "
                         f"{v.std(ddof=1) if len(v) > 1 else float('nan'):.4f}, "
                         f"rms s.e. {np.sqrt(np.mean(hs**2)):.4f}, "
                         f"|z|<2 {np.mean(np.abs(v / hs) < 2):.2f}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--walkers", default="1000,3000")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lr-scales", default="1")
    p.add_argument("--ess", default="0.5")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--json", default=None)
    p.add_argument("--heldout-groups", type=int, default=0,
                   help="islands left out of the gradient (GMMConfig(heldout_groups=...)); adds the "
                   "held-out estimate")
    p.add_argument("--no-islands", action="store_true",
                   help="resample all walkers together (GMMConfig(island_resampling=False))")
    p.add_argument("--out", default=None, help="directory for gmm_ce_bias.json")
    p.add_argument("--figure", default=None, help="PNG: the docs figure instead of the table")
    a = p.parse_args()
    if a.figure:
        bounds_along_run(int(a.walkers.split(",")[0]), int(a.seeds.split(",")[0]), a.figure)
        return
    path = a.json or (os.path.join(a.out, "gmm_ce_bias.json") if a.out else None)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    runs = []
    for n in map(int, a.walkers.split(",")):
        for s in map(float, a.lr_scales.split(",")):
            for e in map(float, a.ess.split(",")):
                for seed in map(int, a.seeds.split(",")):
                    r = one(n, seed, s, e, a.iterations, a.dim, not a.no_islands, a.heldout_groups)
                    runs.append(r)
                    print(f"N={n} lr x{s} ess={e} seed={seed}: error {r['final_error']:+.4f}, "
                          f"corrected {r['final_corrected_error']:+.4f} ± {r['final_stderr']:.4f}, resamplings "
                          f"{r['num_resampling']}, {r['wall_s']:.0f} s"
                          + (f"; held out {r['final_heldout_error']:+.4f} ± {r['final_heldout_stderr']:.4f}"
                             if a.heldout_groups else ""), flush=True)
                    if path:
                        with open(path, "w") as fh:
                            json.dump(runs, fh)
    print(summary(runs))


if __name__ == "__main__":
    main()
