"""Speed figures of issue 14 on one accelerator (or a CPU): per-iteration times, resampling,
noise generators, walker scaling and the whole paper-settings run with compile time apart.

    python benchmarks/gpu_speed.py --out DIR            # the GPU run (~3 min on an H100/H200)
    python benchmarks/gpu_speed.py --out DIR --small    # a CPU smoke run (smaller sizes)
    python benchmarks/gpu_speed.py --out DIR --sections iter,resampling

Writes ``DIR/gpu_speed.json`` and prints a table. Every per-iteration figure is
``benchmarks/timing.py``'s method: ``fit``'s own jitted chunk (a ``lax.scan`` over K
training iterations, trace included) compiled ahead of time, one warm-up call, then calls
ended by ``block_until_ready``, variants interleaved, median of repeats divided by K.
Sections (paper GMM: d = 50, 10^4 data, full batch, h = 0.1, ESS threshold 0.5):

* ``iter``: 10^4 walkers, float32 and float64, Jarzynski vs PCD; Jarzynski forced to
  resample at every iteration (ESS threshold 1.0) with BlackJAX's ``searchsorted``
  systematic resampling vs ``numpyro_ebm.kernels.resampling.systematic``; and Jarzynski
  with the run's key made by ``rbg`` (so the noise is ``jax.random.normal`` of that
  generator instead of the threefry one);
* ``resampling``: one systematic resampling of 10^4 (and 10^6) walkers alone: BlackJAX's,
  the new default (histogram + cumulative sum) and a collision-free variant (scatter of
  each walker's first position + cumulative maximum), all checked to give BlackJAX's
  ancestors first;
* ``noise``: 10^4 x 50 standard normals: ``jax.random.normal`` with threefry / rbg /
  unsafe_rbg keys vs ``kernels.langevin.standard_normal`` (float32 and float64);
* ``scale``: 10^5 and 10^6 walkers (float32, float64) and 10^7 walkers (float32),
  Jarzynski and PCD: the cost per walker shows whether time grows linearly;
* ``whole``: ``experiments.gmm.run`` with the paper's settings and 8000 iterations
  (Jarzynski; snapshots, Pareto k-hat, trace as the CLI runs it), wall time with
  compilation included, and the compile time on its own (``timing.CompileClock``); then the
  same run again in the same process with JAX's persistent compilation cache filled by the
  first (what ``numpyro-ebm gmm --compilation-cache DIR`` gives a second run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # timing.py, and this checkout's numpyro_ebm

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import timing  # noqa: E402

SECTIONS = ("iter", "resampling", "noise", "scale", "whole")


def _gmm_problem(num_walkers: int, float64: bool, dim: int = 50, num_data: int = 10_000):
    from numpyro_ebm.experiments import gmm

    config = gmm.GMMConfig(dim=dim, num_walkers=num_walkers, num_data=num_data, float64=float64)
    key = jax.random.key(0)
    data = gmm.sample_mixture(key, gmm.teacher_params(config), num_data)
    params0 = gmm.initial_params(key, config)
    walkers0 = gmm.sample_mixture(jax.random.key(1), params0, num_walkers)
    return config, data, params0, walkers0


def _chunk_variant(config, data, params0, walkers0, kernel, length, key_impl=None):
    """``(compiled chunk, args, length)`` and its compile seconds, for ``timing``; the loop
    key of ``key_impl`` (default: JAX's default, threefry)."""
    from numpyro_ebm.experiments import gmm
    from numpyro_ebm.training import build_trainer

    trainer = build_trainer(gmm.mixture_potential, gmm.optimizer(config), kernel)
    state = trainer.init(params0, walkers0)
    key = jax.random.key(2) if key_impl is None else jax.random.key(2, impl=key_impl)
    chunk = timing.chunk_runner(trainer, key, config.num_walkers)
    compiled, seconds = timing.compile_chunk(chunk, state, data, length)
    return (compiled, (state, data), length), seconds


def _kernels(names):
    from blackjax.smc import resampling as blackjax_resampling

    from numpyro_ebm.kernels import jarzynski_ula, resampling, ula

    make = {
        "jarzynski": lambda: jarzynski_ula.walker_kernel(0.1, ess_threshold=0.5),
        "pcd": lambda: ula.walker_kernel(0.1),
        "jarzynski_resample_always_blackjax": lambda: jarzynski_ula.walker_kernel(
            0.1, ess_threshold=1.0, resampling_fn=blackjax_resampling.systematic),
        "jarzynski_resample_always_counts": lambda: jarzynski_ula.walker_kernel(
            0.1, ess_threshold=1.0, resampling_fn=resampling.systematic),
    }
    return {n: make[n]() for n in names}


def section_iter(args, out):
    names = ["jarzynski", "pcd", "jarzynski_resample_always_blackjax", "jarzynski_resample_always_counts"]
    n = 1_000 if args.small else 10_000
    for float64 in (False, True):
        with jax.enable_x64(float64):
            problem = _gmm_problem(n, float64)
            variants, compile_s = {}, {}
            for name, kernel in _kernels(names).items():
                variants[name], compile_s[name] = _chunk_variant(*problem, kernel, args.iterations)
            for impl in ("rbg",):  # every key of the run from this generator
                name = f"jarzynski_{impl}_keys"
                variants[name], compile_s[name] = _chunk_variant(
                    *problem, _kernels(["jarzynski"])["jarzynski"], args.iterations, key_impl=impl)
            res = timing.time_interleaved(variants, repeats=args.repeats)
        dtype = "float64" if float64 else "float32"
        for name in variants:
            res[name]["compile_s"] = compile_s[name]
        res["jarzynski_over_pcd"] = res["jarzynski"]["ms_per_iteration"] / res["pcd"]["ms_per_iteration"]
        out[f"iter/{n}/{dtype}"] = res


def _resampling_loop(fn, n, dtype, num_calls):
    """A jitted scan of ``num_calls`` resamplings of ``n`` walkers (fresh key and weights
    each call, the ancestors consumed by a sum so nothing is skipped)."""
    log_w = jax.random.normal(jax.random.key(3), (n,), dtype)

    @jax.jit
    def loop(key):
        def body(total, i):
            weights = jax.nn.softmax(log_w + 1e-3 * i.astype(dtype))
            return total + jnp.sum(fn(jax.random.fold_in(key, i), weights, n)).astype(jnp.int32), None

        return jax.lax.scan(body, jnp.zeros((), jnp.int32), jnp.arange(num_calls))[0]

    return loop


def _systematic_by_marks(rng_key, weights, num_samples):
    """A variant of ``kernels.resampling.systematic`` to compare on a GPU: walker ``i`` with
    copies is written at the first position it fills, F_{i-1} + 1 (a scatter without
    colliding updates, where the histogram's scatter-add collides when many walkers share
    an F_i), and a cumulative maximum carries it over its copies. Same ancestors (checked
    against BlackJAX below before timing); on the CPU slower than the histogram."""
    from numpyro_ebm.kernels.resampling import _thresholds

    n = weights.shape[0]
    f = _thresholds(rng_key, weights, num_samples)
    previous = jnp.concatenate([jnp.full((1,), -1, jnp.int32), f])  # F_{i-1}, i = 0..N
    has_copies = jnp.concatenate([f, jnp.full((1,), num_samples, jnp.int32)]) > previous
    starts = jnp.where(has_copies, previous + 1, num_samples)  # num_samples: dropped
    marks = jnp.zeros((num_samples,), jnp.int32).at[starts].set(
        jnp.arange(n + 1, dtype=jnp.int32), mode="drop")
    return jnp.minimum(jax.lax.cummax(marks), n - 1)


def _check_same_ancestors(fns, n, dtype):
    from blackjax.smc import resampling as blackjax_resampling

    for seed in range(5):
        key = jax.random.key(seed)
        weights = jax.nn.softmax(3.0 * jax.random.normal(jax.random.fold_in(key, 1), (n,), dtype))
        want = blackjax_resampling.systematic(key, weights, n)
        for name, fn in fns:
            if not bool(jnp.all(fn(key, weights, n) == want)):
                raise AssertionError(f"{name}: ancestors differ from BlackJAX's")


def section_resampling(args, out):
    from blackjax.smc import resampling as blackjax_resampling

    from numpyro_ebm.kernels import resampling

    sizes = (1_000, 10_000) if args.small else (10_000, 1_000_000)
    for float64 in (False, True):
        with jax.enable_x64(float64):
            dtype = jnp.float64 if float64 else jnp.float32
            for n in sizes:
                calls = 200 if n <= 10_000 else 20
                # the softmax alone, to subtract: what is left is the resampling
                ours = (("counts", resampling.systematic), ("counts_by_marks", _systematic_by_marks))
                _check_same_ancestors(ours, n, dtype)
                variants = {
                    name: (_resampling_loop(fn, n, dtype, calls), (jax.random.key(4),), calls)
                    for name, fn in (("blackjax_searchsorted", blackjax_resampling.systematic), *ours,
                                     ("weights_only", lambda k, w, m: w[:1].astype(jnp.int32)))
                }
                res = timing.time_interleaved(variants, repeats=args.repeats)
                base = res["weights_only"]["ms_per_iteration"]
                for name in ("blackjax_searchsorted", "counts", "counts_by_marks"):
                    res[name]["ms_per_resampling_net"] = res[name]["ms_per_iteration"] - base
                out[f"resampling/{n}/{jnp.dtype(dtype)}"] = res


def section_noise(args, out):
    from numpyro_ebm.kernels.langevin import standard_normal

    shape = (1_000 if args.small else 10_000, 50)
    calls = 50
    for float64 in (False, True):
        with jax.enable_x64(float64):
            dtype = jnp.float64 if float64 else jnp.float32

            def loop(make_key, draw, dtype=dtype):
                @jax.jit
                def run(seed):
                    def body(total, i):
                        return total + jnp.sum(draw(jax.random.fold_in(make_key(seed), i))), None

                    return jax.lax.scan(body, jnp.zeros((), dtype), jnp.arange(calls))[0]

                return run

            variants = {}
            for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
                make_key = lambda s, impl=impl: jax.random.key(s, impl=impl)  # noqa: E731
                variants[f"jax.random.normal/{impl}"] = (
                    loop(make_key, lambda k, dt=dtype: jax.random.normal(k, shape, dt)), (0,), calls)
            variants["standard_normal/threefry2x32"] = (
                loop(jax.random.key, lambda k, dt=dtype: standard_normal(k, shape, dt)), (0,), calls)
            out[f"noise/{shape[0]}x{shape[1]}/{jnp.dtype(dtype)}"] = timing.time_interleaved(
                variants, repeats=args.repeats)


def section_scale(args, out):
    cases = ([(10_000, False), (100_000, False)] if args.small else
             [(100_000, False), (100_000, True), (1_000_000, False), (1_000_000, True),
              (10_000_000, False)])
    for n, float64 in cases:
        length = max(2, min(args.iterations, int(2e7 // n)))
        with jax.enable_x64(float64):
            problem = _gmm_problem(n, float64)
            variants, compile_s = {}, {}
            for name, kernel in _kernels(["jarzynski", "pcd"]).items():
                try:
                    variants[name], compile_s[name] = _chunk_variant(*problem, kernel, length)
                except Exception as err:  # e.g. out of memory at 10^7 walkers
                    out[f"scale/{n}/{'float64' if float64 else 'float32'}/{name}"] = {"error": repr(err)[:300]}
            res = timing.time_interleaved(variants, repeats=max(3, args.repeats - 2)) if variants else {}
            del problem, variants
        for name, r in res.items():
            r["compile_s"] = compile_s[name]
            r["ns_per_walker"] = 1e6 * r["ms_per_iteration"] / n
            r["iterations_per_call"] = length
        out[f"scale/{n}/{'float64' if float64 else 'float32'}"] = res


def _whole_run(num_iterations, small):
    from numpyro_ebm.experiments import gmm

    config = gmm.GMMConfig(num_iterations=num_iterations, methods=("jarzynski",),
                           **({"num_walkers": 1_000, "num_data": 1_000} if small else {}))
    with timing.CompileClock() as clock:
        t0 = time.perf_counter()
        result = gmm.run(config)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "fit_wall_s": result["jarzynski"]["wall_time"], "compile_s": clock.seconds,
            "compile_by_event_s": clock.by_event, "num_compilations": clock.count,
            "num_iterations": num_iterations,
            "final_small_mass": result["jarzynski"]["final_small_mass"]}


def section_whole(args, out):
    cache = tempfile.mkdtemp(prefix="numpyro_ebm_gpu_speed_cache_")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    iters = 800 if args.small else 8000
    out["whole/cold"] = _whole_run(iters, args.small)
    out["whole/persistent_cache"] = _whole_run(iters, args.small)
    jax.config.update("jax_compilation_cache_dir", None)


def _print_table(out):
    print(f"\n{'figure':<62} {'ms':>10} {'extra':>24}")
    for group, res in out.items():
        if group == "machine":
            continue
        if group.startswith("whole"):
            print(f"{group:<62} {1e3 * res['wall_s']:>10.0f} compile {res['compile_s']:.2f} s "
                  f"({res['num_compilations']} compilations)")
            continue
        for name, r in res.items():
            if not isinstance(r, dict):
                print(f"{group + ' ' + name:<62} {r:>10.3f}")
                continue
            if "error" in r:
                print(f"{group + ' ' + name:<62} ERROR {r['error'][:60]}")
                continue
            extra = ""
            if "ms_per_resampling_net" in r:
                extra = f"net {r['ms_per_resampling_net']:.4f} ms"
            elif "ns_per_walker" in r:
                extra = f"{r['ns_per_walker']:.2f} ns/walker"
            elif "compile_s" in r:
                extra = f"compile {r['compile_s']:.2f} s"
            print(f"{group + ' ' + name:<62} {r['ms_per_iteration']:>10.4f} {extra:>24}")


def _targets(out) -> list[str]:
    """Issue 14's GPU targets against the figures measured (those present)."""
    lines = []

    def check(label, value, limit):
        if value is not None:
            lines.append(f"{label:<58} {value:>10.4f} <= {limit:<8} {'met' if value <= limit else 'NOT met'}")

    def get(*path):
        node = out
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node

    for dtype, limit in (("float32", 0.08), ("float64", 0.12)):
        check(f"Jarzynski ms/it, 10^4 walkers, {dtype}",
              get(f"iter/10000/{dtype}", "jarzynski", "ms_per_iteration"), limit)
        check(f"Jarzynski / PCD, {dtype}", get(f"iter/10000/{dtype}", "jarzynski_over_pcd"), 1.2)
        check(f"one resampling of 10^4 walkers (counts), {dtype}, ms",
              get(f"resampling/10000/{dtype}", "counts", "ms_per_resampling_net"), 0.05)
    check(f"whole {get('whole/cold', 'num_iterations')}-iteration run, compile included, s",
          get("whole/cold", "wall_s"), 3.0)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_speed.json")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--small", action="store_true", help="small sizes (a CPU smoke run)")
    parser.add_argument("--iterations", type=int, default=200, help="K iterations per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    out = {"machine": {"platform": platform.platform(), "jax": jax.__version__,
                       "devices": [d.device_kind for d in jax.devices()],
                       "backend": jax.default_backend(), "args": vars(args)}}
    print(f"jax {jax.__version__} on {out['machine']['devices']}", flush=True)
    path = os.path.join(args.out, "gpu_speed.json")
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            globals()[f"section_{name}"](args, out)
        except Exception as err:  # keep the other sections' figures
            out[f"{name}/error"] = {"error": {"error": repr(err)[:500]}}
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    _print_table(out)
    targets = _targets(out)
    if targets:
        print("\nissue 14 targets (GPU):")
        print("\n".join(targets))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
