r"""The paper's Gaussian-mixture experiment (Carbone et al. 2023, Sec. 4.1).

Teacher: two unit-variance Gaussians in :math:`\mathbb R^d` at :math:`-10 e_1` and
:math:`+6 e_1` with masses 1/4 and 3/4. Student: a two-mode mixture

.. math::

   U_\theta(x) = -\log \sum_{j=1}^2 \exp\big(\ell_j - \tfrac12 |x - \mu_j|^2\big),
   \qquad Z_\theta = (2\pi)^{d/2} \sum_j e^{\ell_j},

with learnable means :math:`\mu_j` and log-weights :math:`\ell_j`; the mass of mode
:math:`j` is :math:`\mathrm{softmax}(\ell)_j`. Because :math:`\log Z_\theta` is closed-form,
the exact (empirical) cross-entropy :math:`H(\theta) = \frac1n\sum_j U_\theta(x_j) + \log Z_\theta`
is known at every iteration and can be set beside the Jarzynski estimate.

Expected (the paper's finding): Jarzynski recovers the small mass 1/4; PCD does not (its
walkers stay split as they were when the modes separated, so the mass gradient never
vanishes); CD does not either (walkers restarted at the data see the data's proportions,
so the mass gradient is always close to zero and the masses stay near their start).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import logsumexp

from numpyro_ebm import kernels
from numpyro_ebm.estimators import (
    feedback_bias_step,
    group_log_normalizers,
    group_log_weight_sums,
    heldout_log_normalizer,
)
from numpyro_ebm.training.callbacks import Checkpoint, ParetoKhat, Snapshots
from numpyro_ebm.training.fit import METHODS, FitResult, fit

__all__ = [
    "GMMConfig",
    "mixture_potential",
    "mixture_log_normalizer",
    "sample_mixture",
    "teacher_params",
    "initial_params",
    "optimizer",
    "small_mode_mass",
    "run",
    "format_table",
    "plot",
]


@dataclasses.dataclass(frozen=True)
class GMMConfig:
    """Settings of the experiment (defaults: the paper's configuration)."""

    dim: int = 50
    num_data: int = 10_000
    num_walkers: int = 10_000
    num_iterations: int = 2_000
    step_size: float = 0.1
    learning_rate: float = 0.01
    logit_learning_rate: float = 0.05
    small_mass: float = 0.25
    small_mean: float = -10.0
    large_mean: float = 6.0
    init_scale: float = 0.1
    ess_threshold: float = 0.5
    cd_restart_every: int = 4
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    float64: bool = True
    feedback_correction: bool = True
    num_groups: int = 10
    island_resampling: bool = True
    heldout_groups: int = 0
    record_params: bool = False

    def __post_init__(self):
        for name in ("dim", "num_data", "num_walkers", "num_iterations"):
            if getattr(self, name) < (2 if name == "num_walkers" else 1):
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if not 0.0 < self.small_mass < 0.5:
            raise ValueError(f"`small_mass` must lie in (0, 0.5), got {self.small_mass}")
        if self.island_resampling and self.num_walkers % self.num_groups:
            raise ValueError(f"`num_groups` ({self.num_groups}) must divide `num_walkers` ({self.num_walkers}) "
                             "with `island_resampling` (or set island_resampling=False; CLI "
                             "--no-island-resampling)")
        if self.heldout_groups and not (self.island_resampling and 2 <= self.heldout_groups < self.num_groups):
            raise ValueError(f"`heldout_groups` ({self.heldout_groups}) needs island_resampling and must lie in "
                             f"[2, num_groups = {self.num_groups})")
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"`methods` must be a non-empty subset of {METHODS}, got {self.methods}")


def mixture_potential(params: dict, x: jax.Array) -> jax.Array:
    """Energy of one sample ``x`` (shape ``(d,)``) under the two-mode mixture."""
    sq = jnp.sum((x[None, :] - params["means"]) ** 2, axis=-1)
    return -logsumexp(params["logits"] - 0.5 * sq)


def mixture_log_normalizer(params: dict) -> jax.Array:
    """:math:`\\log Z_\\theta = \\tfrac d2 \\log 2\\pi + \\log\\sum_j e^{\\ell_j}`."""
    dim = params["means"].shape[-1]
    return 0.5 * dim * math.log(2 * math.pi) + logsumexp(params["logits"])


def sample_mixture(rng_key: jax.Array, params: dict, num: int) -> jax.Array:
    """``num`` exact draws from the mixture :math:`\\rho_\\theta`."""
    comp_key, noise_key = jax.random.split(rng_key)
    means = params["means"]
    comp = jax.random.categorical(comp_key, params["logits"], shape=(num,))
    return means[comp] + jax.random.normal(noise_key, (num, means.shape[-1]), means.dtype)


def teacher_params(config: GMMConfig) -> dict:
    dtype = jnp.float64 if config.float64 else jnp.float32
    means = jnp.zeros((2, config.dim), dtype)
    means = means.at[0, 0].set(config.small_mean).at[1, 0].set(config.large_mean)
    masses = jnp.asarray([config.small_mass, 1 - config.small_mass], dtype)
    return {"means": means, "logits": jnp.log(masses)}


def initial_params(rng_key: jax.Array, config: GMMConfig) -> dict:
    """Means near 0 (Gaussian noise of scale ``init_scale / 10``, and -/+ ``init_scale``
    along e1 so that mode 0 heads for the teacher's small mode), equal weights."""
    dtype = jnp.float64 if config.float64 else jnp.float32
    means = 0.1 * config.init_scale * jax.random.normal(rng_key, (2, config.dim), dtype)
    means = means.at[0, 0].set(-config.init_scale).at[1, 0].set(config.init_scale)
    return {"means": means, "logits": jnp.zeros((2,), dtype)}


def optimizer(config: GMMConfig) -> optax.GradientTransformation:
    """Plain gradient descent, with its own learning rate for the log-weights (as in the
    paper, which also uses a larger rate for the weights than for the means)."""
    return optax.multi_transform(
        {"means": optax.sgd(config.learning_rate), "logits": optax.sgd(config.logit_learning_rate)},
        {"means": "means", "logits": "logits"},
    )


def small_mode_mass(params: dict, config: GMMConfig) -> jax.Array:
    """Model mass of the mode nearest the teacher's small mode (at ``small_mean * e1``)."""
    target = jnp.zeros((config.dim,)).at[0].set(config.small_mean)
    j = jnp.argmin(jnp.sum((params["means"] - target) ** 2, axis=-1))
    return jax.nn.softmax(params["logits"])[j]


def _walker_small_mass(state, config: GMMConfig) -> jax.Array:
    """Weighted fraction of walkers on the small mode's side of the midpoint."""
    midpoint = 0.5 * (config.small_mean + config.large_mean)
    on_small = state.particles[:, 0] < midpoint
    return jnp.sum(jnp.exp(state.log_weights) * on_small)


def run(config: GMMConfig = GMMConfig(), *, progress: bool = False, mesh: Any = None,
        checkpoint_dir: str | None = None, checkpoint_every: int | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Run the experiment for every method in ``config.methods``.

    Returns a dict with ``config``, the data, the initial params, and per method a dict
    with the ``FitResult``, the per-iteration ``small_mass`` (model), ``walker_small_mass``
    (weighted walkers), ``exact_cross_entropy``, ``cross_entropy`` (Jarzynski estimate,
    jarzynski only), and ``wall_time`` in seconds (compilation included).

    ``mesh`` splits the walkers over its devices (``fit(mesh=)``; with a mesh over several
    processes every process calls ``run`` alike and gets the whole results, gathered).
    ``checkpoint_dir``: Orbax checkpoints of each method in ``checkpoint_dir/<method>`` every
    ``checkpoint_every`` iterations; ``resume`` continues from them.
    """
    previous_x64 = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", config.float64)
    try:
        return _run(config, progress, mesh, checkpoint_dir, checkpoint_every, resume)
    finally:
        jax.config.update("jax_enable_x64", previous_x64)


def _callbacks(config, method, checkpoint_dir, checkpoint_every, resume):
    """Snapshots (every K/8 iterations) with k-hat, and the checkpoints: their interval is
    rounded down to a multiple of the snapshot interval (the loop needs one)."""
    from numpyro_ebm.diagnostics import pareto_khat

    callbacks = [Snapshots(max(1, config.num_iterations // 8)), ParetoKhat(pareto_khat)]
    if checkpoint_dir is not None:
        every = checkpoint_every
        snapshot_every = callbacks[0].snapshot_every
        if every is not None and every % snapshot_every:  # the loop needs a multiple
            every = max(snapshot_every, every - every % snapshot_every)
        callbacks.append(Checkpoint(os.path.join(checkpoint_dir, method), every=every, resume=resume))
    return callbacks


def _trace_fns(config: GMMConfig):
    """``(trace_fn, jarzynski_trace_fn)``: the mixture's masses and exact log normaliser, and
    for Jarzynski also the walker-group sums, the parameters and the feedback-bias term."""
    learning_rates = {"means": config.learning_rate, "logits": config.logit_learning_rate}

    def trace_fn(params, state):
        return {
            "small_mass": small_mode_mass(params, config),
            "walker_small_mass": _walker_small_mass(state, config),
            "log_normalizer_exact": mixture_log_normalizer(params),
        }

    def jarzynski_trace_fn(params, state):
        out = {**trace_fn(params, state),
               "group_log_weights": group_log_weight_sums(state, config.num_groups)}
        if config.record_params:
            out["params"] = params
        if config.feedback_correction:
            out["feedback_bias"] = feedback_bias_step(mixture_potential, params, state, learning_rates)
        return out

    return trace_fn, jarzynski_trace_fn


def _run(config: GMMConfig, progress: bool, mesh=None, checkpoint_dir=None, checkpoint_every=None,
         resume=False) -> dict[str, Any]:
    key = jax.random.key(config.seed)
    data_key, init_key, walker_key, fit_key = jax.random.split(key, 4)
    teacher = teacher_params(config)
    data = sample_mixture(data_key, teacher, config.num_data)
    params0 = initial_params(init_key, config)
    walkers0 = sample_mixture(walker_key, params0, config.num_walkers)
    log_z0 = float(mixture_log_normalizer(params0))
    trace_fn, jarzynski_trace_fn = _trace_fns(config)
    out: dict[str, Any] = {
        "config": config,
        "data": data,
        "initial_params": params0,
        "log_z0": log_z0,
        "teacher_params": teacher,
    }
    for method in config.methods:
        t0 = time.perf_counter()
        result: FitResult = fit(
            mixture_potential,
            params0,
            data,
            optimizer=optimizer(config),
            kernel=kernels.for_method(method, config.step_size, ess_threshold=config.ess_threshold,
                                      restart_every=config.cd_restart_every,
                                      resampling_groups=config.num_groups if config.island_resampling else None,
                                      heldout_groups=config.heldout_groups),
            num_walkers=config.num_walkers,
            num_iterations=config.num_iterations,
            rng_key=fit_key,
            init_particles=walkers0,
            log_z0=log_z0 if method == "jarzynski" else None,
            trace_fn=jarzynski_trace_fn if method == "jarzynski" else trace_fn,
            progress=progress,
            callbacks=_callbacks(config, method, checkpoint_dir, checkpoint_every, resume),
            mesh=mesh,
        )
        if mesh is not None:  # the walkers may be spread over processes: gather them
            from numpyro_ebm.distributed import to_host

            result = to_host(result)
        jax.block_until_ready(result.params)
        out[method] = _method_entry(config, data, log_z0, result, time.perf_counter() - t0)
    return out


def _method_entry(config: GMMConfig, data, log_z0: float, result: FitResult, wall: float) -> dict[str, Any]:
    """The per-method results of :func:`run` (see there)."""
    trace = result.trace
    extra = trace["extra"]
    exact_ce = trace["data_energy"] + extra["log_normalizer_exact"]
    final_params = result.params
    final_exact_ce = float(
        jnp.mean(jax.vmap(mixture_potential, (None, 0))(final_params, data))
        + mixture_log_normalizer(final_params)
    )
    entry = {
        "result": result,
        "small_mass": np.asarray(extra["small_mass"]),
        "walker_small_mass": np.asarray(extra["walker_small_mass"]),
        "exact_cross_entropy": np.asarray(exact_ce),
        "final_small_mass": float(small_mode_mass(final_params, config)),
        "final_exact_cross_entropy": final_exact_ce,
        "wall_time": wall,
    }
    if "cross_entropy" in trace:
        entry["cross_entropy"] = np.asarray(trace["cross_entropy"])
        # the estimate at theta_K: data energy at theta_K + log Z0 + Jarzynski ratio
        final_estimate = (
            final_exact_ce
            - float(mixture_log_normalizer(final_params))
            + log_z0
            + float(result.state.log_normalizer)
        )
        entry["final_cross_entropy_estimate"] = final_estimate
        entry["ce_estimate_error"] = final_estimate - final_exact_ce
        entry["max_abs_ce_estimate_error"] = float(
            np.max(np.abs(entry["cross_entropy"] - entry["exact_cross_entropy"]))
        )
        entry["num_resampling"] = int(np.sum(trace["resampled"]))
        _add_group_stderr(entry, trace, result.state, config.num_groups, config.island_resampling)
        if "feedback_bias" in extra:
            _add_feedback_correction(entry, np.asarray(extra["feedback_bias"]))
        if config.heldout_groups:
            _add_heldout_estimate(entry, trace, result.state, config)
    return entry


def _add_group_stderr(entry: dict[str, Any], trace: dict, state, num_groups: int, islands: bool) -> None:
    """The standard error of the estimate from independent walker groups
    (:func:`numpyro_ebm.estimators.group_log_normalizers`), per iteration and at the end;
    ``islands``: the groups were resampled on their own (nothing frozen)."""
    extra = trace["extra"]
    final_sums = group_log_weight_sums(state, num_groups)[None]
    _, stderr = group_log_normalizers(
        np.append(trace["log_normalizer"], float(state.log_normalizer)),
        np.concatenate([extra["group_log_weights"], np.asarray(final_sums)]),
        None if islands else np.append(trace["resampled"], False),
    )
    entry["cross_entropy_stderr"] = np.asarray(stderr[:-1])
    entry["final_cross_entropy_stderr"] = float(stderr[-1])


def _add_heldout_estimate(entry: dict[str, Any], trace: dict, state, config: GMMConfig) -> None:
    """The cross-entropy estimate from the held-out islands alone (no feedback bias;
    :func:`numpyro_ebm.estimators.heldout_log_normalizer`), per iteration and at the end."""
    log_normalizer = np.append(trace["log_normalizer"], float(state.log_normalizer))
    sums = np.concatenate([trace["extra"]["group_log_weights"],
                           np.asarray(group_log_weight_sums(state, config.num_groups))[None]])
    held, stderr = map(np.asarray, heldout_log_normalizer(log_normalizer, sums, config.heldout_groups))
    entry["cross_entropy_heldout"] = entry["cross_entropy"] + held[:-1] - log_normalizer[:-1]
    entry["cross_entropy_heldout_stderr"] = stderr[:-1]
    entry["final_cross_entropy_heldout"] = entry["final_cross_entropy_estimate"] + held[-1] - log_normalizer[-1]
    entry["final_cross_entropy_heldout_stderr"] = float(stderr[-1])
    entry["ce_heldout_error"] = entry["final_cross_entropy_heldout"] - entry["final_exact_cross_entropy"]


def _add_feedback_correction(entry: dict[str, Any], per_step: np.ndarray) -> None:
    """The estimate with the feedback bias removed (:func:`numpyro_ebm.estimators.
    feedback_bias_step`): at iteration ``k`` add the sum of the steps before it."""
    before = np.concatenate([[0.0], np.cumsum(per_step)])
    entry["feedback_bias"] = per_step
    entry["cross_entropy_corrected"] = entry["cross_entropy"] + before[:-1]
    entry["final_cross_entropy_corrected"] = entry["final_cross_entropy_estimate"] + before[-1]
    entry["ce_corrected_error"] = entry["final_cross_entropy_corrected"] - entry["final_exact_cross_entropy"]


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the final figures per method."""
    config: GMMConfig = results["config"]
    header = (
        f"{'method':<10} {'small-mode mass':>15} {'target':>7} {'|error|':>8} "
        f"{'exact CE':>10} {'CE est. error':>13} {'max |err|':>9} {'wall s':>7}"
    )
    lines = [header, "-" * len(header)]
    for method in config.methods:
        r = results[method]
        err = r.get("ce_estimate_error")
        max_err = r.get("max_abs_ce_estimate_error")
        lines.append(
            f"{method:<10} {r['final_small_mass']:>15.4f} {config.small_mass:>7.3f} "
            f"{abs(r['final_small_mass'] - config.small_mass):>8.4f} "
            f"{r['final_exact_cross_entropy']:>10.4f} "
            f"{(f'{err:+.4f}' if err is not None else 'n/a'):>13} "
            f"{(f'{max_err:.4f}' if max_err is not None else 'n/a'):>9} "
            f"{r['wall_time']:>7.1f}"
        )
    r = results.get("jarzynski", {})
    if "final_cross_entropy_stderr" in r:
        corrected = r.get("ce_corrected_error")
        lines.append(
            f"jarzynski CE estimate: error {r['ce_estimate_error']:+.4f}"
            + (f", with the feedback correction {corrected:+.4f}" if corrected is not None else "")
            + f"; standard error (walker groups) {r['final_cross_entropy_stderr']:.4f}"
        )
    if "ce_heldout_error" in r:
        lines.append(f"jarzynski CE estimate from the {config.heldout_groups} held-out groups: error "
                     f"{r['ce_heldout_error']:+.4f} ± {r['final_cross_entropy_heldout_stderr']:.4f}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Save a PNG: small-mode mass and cross-entropy against iteration, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config: GMMConfig = results["config"]
    colors = {"jarzynski": "C0", "pcd": "C1", "cd": "C2"}
    fig, (ax_mass, ax_ce) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in config.methods:
        r = results[method]
        it = np.arange(len(r["small_mass"]))
        ax_mass.plot(it, r["small_mass"], color=colors[method], label=f"{method} (model)")
        ax_mass.plot(
            it, r["walker_small_mass"], color=colors[method], ls=":", alpha=0.8,
            label=f"{method} (walkers)",
        )
        ax_ce.plot(it, r["exact_cross_entropy"], color=colors[method], label=f"{method}: exact")
        if "cross_entropy" in r:
            ax_ce.plot(
                it, r["cross_entropy"], color="k", ls="--", lw=1,
                label=f"{method}: Jarzynski estimate",
            )
    ax_mass.axhline(config.small_mass, color="k", lw=0.8, ls="-.", label="truth")
    ax_mass.set_xlabel("training iteration")
    ax_mass.set_ylabel("mass of the small mode")
    ax_mass.set_ylim(-0.02, 0.75)
    ax_mass.legend(fontsize=7, ncol=2)
    ax_ce.set_xlabel("training iteration")
    ax_ce.set_ylabel("cross-entropy")
    ce_all = np.concatenate([results[m]["exact_cross_entropy"] for m in config.methods])
    lo, hi = np.percentile(ce_all, [0, 90])
    ax_ce.set_ylim(lo - 0.05 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1))
    ax_ce.legend(fontsize=7)
    fig.suptitle(
        f"Gaussian mixture, d={config.dim}, {config.num_walkers} walkers, "
        f"h={config.step_size}, lr={config.learning_rate} (means), "
        f"{config.logit_learning_rate} (log-weights)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
