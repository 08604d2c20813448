"""Time and peak memory per training iteration: methods side by side, walkers 10^3-10^6,
dimension, float32/float64, the digits energy, several (host) devices.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_scale.py --suite gmm --json benchmarks/results/bench_scale_gmm.json
    .venv/bin/python benchmarks/bench_scale.py --suite walkers,dim,digits,devices --json ...

Each case runs in its own Python process (so that its peak memory, the process's maximum
resident set size, is its own, and so that ``--xla_force_host_platform_device_count`` can
split the CPU into devices). In that process every method is timed by
``benchmarks/timing.py``: ``fit``'s jitted chunk of ``long - short`` iterations, compiled
ahead of time (compile time kept apart), one warm-up call, then calls ended by
``block_until_ready``, methods interleaved within each repeat so they see the same machine
load; the median over repeats of (call time / iterations) is reported. (Before issue 14:
the difference of two whole ``fit`` runs of N1 and N2 iterations, noisy and sometimes
negative on a GPU.) Suites:

* ``gmm``: the paper's configuration (d = 50, 10^4 walkers, 10^4 data, full batch) for
  jarzynski, pcd and cd, float64, float64 with float32 noise, float32, and float64 with the
  walkers split over 2 CPU devices;
* ``walkers``: 10^3 to 10^6 walkers (d = 50, float32 noise), jarzynski and pcd, one
  process per method (peak memory per method); 10^6 also with ``walker_batch_size``;
* ``dim``: d = 10 to 1000 at 10^4 walkers;
* ``digits``: the digits experiment's MLP energy (8x8 images, 245 images, 1000 walkers);
* ``devices``: the paper's configuration on 1, 2 and 4 CPU devices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CACHE = os.path.join(tempfile.gettempdir(), "numpyro_ebm_bench_cache")


def gmm_case(**kw):
    case = dict(energy="gmm", dim=50, num_walkers=10_000, num_data=10_000, float64=True,
                noise_dtype=None, devices=1, walker_batch_size=None,
                methods=["jarzynski", "pcd"], short=20, long=320, repeats=3)
    case.update(kw)
    return case


def suites() -> dict[str, list[dict]]:
    three = ["jarzynski", "pcd", "cd"]
    out = {
        "gmm": [
            gmm_case(label="paper GMM, float64", methods=three),
            gmm_case(label="paper GMM, float64, float32 noise", methods=three, noise_dtype="float32"),
            gmm_case(label="paper GMM, float32", methods=three, float64=False),
            gmm_case(label="paper GMM, float64, float32 noise, 2 devices", methods=three,
                     noise_dtype="float32", devices=2),
        ],
        "walkers": [],
        "dim": [],
        "digits": [
            dict(energy="digits", label="digits MLP, float32", num_walkers=1000, float64=False,
                 noise_dtype=None, devices=1, walker_batch_size=None, methods=["jarzynski", "pcd"],
                 short=20, long=220, repeats=3),
        ],
        "devices": [
            gmm_case(label=f"paper GMM, float64, float32 noise, {n} device(s)",
                     noise_dtype="float32", devices=n)
            for n in (1, 2, 4)
        ],
    }
    for n in (1_000, 10_000, 100_000, 1_000_000):
        its = {1_000: (20, 520), 10_000: (20, 320), 100_000: (5, 45), 1_000_000: (2, 7)}[n]
        for method in ("jarzynski", "pcd"):
            out["walkers"].append(gmm_case(
                label=f"{n} walkers, {method}", num_walkers=n, noise_dtype="float32",
                methods=[method], short=its[0], long=its[1], repeats=2))
    for method in ("jarzynski", "pcd"):
        out["walkers"].append(gmm_case(
            label=f"1000000 walkers, {method}, walker_batch_size=100000", num_walkers=1_000_000,
            walker_batch_size=100_000, noise_dtype="float32", methods=[method], short=2, long=7,
            repeats=2))
    for d in (10, 50, 200, 1000):
        out["dim"].append(gmm_case(label=f"d={d}", dim=d, noise_dtype="float32",
                                   short=20, long=220 if d < 1000 else 70, repeats=2))
    return out


# ---------------------------------------------------------------------------------------
# one case, in its own process
# ---------------------------------------------------------------------------------------


def worker(case: dict) -> dict:
    import jax

    jax.config.update("jax_enable_x64", case["float64"])
    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh

    from numpyro_ebm import kernels

    key = jax.random.key(0)
    if case["energy"] == "gmm":
        from numpyro_ebm.experiments import gmm

        config = gmm.GMMConfig(dim=case["dim"], num_walkers=case["num_walkers"],
                               num_data=case["num_data"], float64=case["float64"])
        data = gmm.sample_mixture(key, gmm.teacher_params(config), config.num_data)
        params0 = gmm.initial_params(key, config)
        walkers0 = gmm.sample_mixture(jax.random.key(1), params0, config.num_walkers)
        potential_fn, optimizer, step_size = gmm.mixture_potential, gmm.optimizer(config), config.step_size
    else:
        from numpyro_ebm.experiments import digits

        config = digits.DigitsConfig(num_walkers=case["num_walkers"], hidden=128)
        subset = digits.load_data(config)
        data = jnp.asarray(subset.images, jnp.float32)
        potential_fn, params0, base = digits.make_energy(config, subset.images)
        walkers0 = (base["mean"] + base["scale"] * np.random.default_rng(0).standard_normal(
            (case["num_walkers"], *data.shape[1:]))).astype(np.float32)
        optimizer = optax.sgd(1e-3)
        step_size = config.step_size
    mesh = None
    if case["devices"] > 1:
        mesh = Mesh(np.array(jax.devices()[: case["devices"]]), ("walkers",))
    noise_dtype = None if case["noise_dtype"] is None else jnp.dtype(case["noise_dtype"])

    from numpyro_ebm.training import build_trainer

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import timing

    constrain = None
    if mesh is not None:
        from numpyro_ebm import sharding

        data, params0, constrain = sharding.place_for_training(mesh, data, params0, case["num_walkers"])
        walkers0 = jax.device_put(walkers0, sharding.walker_sharding(mesh))
    length = case["long"] - case["short"]
    variants, compile_s = {}, {}
    for m in case["methods"]:
        kernel = kernels.for_method(m, step_size, noise_dtype=noise_dtype,
                                    walker_batch_size=case["walker_batch_size"])
        trainer = build_trainer(potential_fn, optimizer, kernel, constrain_walkers=constrain)
        state = trainer.init(params0, walkers0)
        chunk = timing.chunk_runner(trainer, key, case["num_walkers"])
        compiled, compile_s[m] = timing.compile_chunk(chunk, state, data, length)
        variants[m] = (compiled, (state, data), length)
    timed = timing.time_interleaved(variants, repeats=case["repeats"])
    per_iter = {m: r["repeats_ms"] for m, r in timed.items()}
    return {
        "case": case,
        "ms_per_iteration": per_iter,
        "median_ms_per_iteration": {m: statistics.median(v) for m, v in per_iter.items()},
        "compile_s": compile_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
    }


def run_case(case: dict) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if case["devices"] > 1:
        flags += f" --xla_force_host_platform_device_count={case['devices']}"
    env["XLA_FLAGS"] = flags.strip()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = [f"{'case':<58} {'method':<10} {'ms/iter':>9} {'peak MiB':>9} {'vs pcd':>7}"]
    for res in results:
        label = res["case"]["label"]
        if "error" in res:
            lines.append(f"{label:<58} ERROR {res['error'].splitlines()[-1][:60]}")
            continue
        med = res["median_ms_per_iteration"]
        for m, v in med.items():
            ratio = f"{v / med['pcd']:.3f}" if "pcd" in med and m != "pcd" else ""
            lines.append(f"{label:<58} {m:<10} {v:>9.2f} {res['peak_rss_mib']:>9.0f} {ratio:>7}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="gmm", help="comma-separated: gmm,walkers,dim,digits,devices")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    all_suites = suites()
    cases = [c for name in args.suite.split(",") for c in all_suites[name]]
    results = []
    for case in cases:
        t0 = time.perf_counter()
        res = run_case(case)
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(table([res]).splitlines()[-len(case["methods"]):] if "error" not in res else res["error"],
              flush=True)
    import jax

    print(f"\n{platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}")
    print(table(results))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                   "jax": jax.__version__}, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
