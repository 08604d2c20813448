"""Weight diagnostics, ArviZ export, degeneracy warning (DegeneracyCheck), snapshots and
k-hat (Snapshots, ParetoKhat callbacks), progress and plots (issue 4)."""

from __future__ import annotations

import math
import re
import warnings

import arviz_stats
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import pytest
import xarray as xr
from arviz_stats.base import array_stats
from matplotlib.figure import Figure

from numpyro_ebm import WeightDegeneracyWarning, fit
from numpyro_ebm import diagnostics as dg
from numpyro_ebm.training import callbacks as cbs
from numpyro_ebm.training.callbacks import _first_long_run
from numpyro_ebm.training.callbacks import degeneracy_message as _degeneracy_message

NUM_WALKERS = 128


def gaussian_potential(params, x):
    return 0.5 * jnp.sum((x - params["mu"]) ** 2)


def _fit(dim, *, step_size=0.1, learning_rate=0.05, num_iterations=40, kernel="jarzynski",
         snapshot_every=None, khat_fn=None, **kwargs):
    """``fit`` with ``Snapshots(snapshot_every)`` and ``ParetoKhat(khat_fn)`` callbacks when
    given (the callbacks that replaced fit's ``snapshot_every=`` and ``khat_fn=``)."""
    data = jax.random.normal(jax.random.key(1), (200, dim)) + 1.0
    params = {"mu": jnp.zeros(dim)}
    callbacks = []
    if snapshot_every is not None:
        callbacks.append(cbs.Snapshots(snapshot_every))
    if khat_fn is not None:
        callbacks.append(cbs.ParetoKhat(khat_fn))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(
            gaussian_potential,
            params,
            data,
            optimizer=optax.sgd(learning_rate),
            num_walkers=NUM_WALKERS,
            kernel=kernel,
            step_size=step_size,
            num_iterations=num_iterations,
            rng_key=jax.random.key(0),
            callbacks=callbacks,
            **kwargs,
        )
    ours = [w for w in caught if issubclass(w.category, WeightDegeneracyWarning)]
    return result, ours, data


@pytest.fixture(scope="module")
def healthy():
    """2-D Gaussian model, small step and learning rate: weights stay healthy."""
    return _fit(
        2,
        snapshot_every=10,
        khat_fn=dg.pareto_khat,
        log_z0=math.log(2 * math.pi),
        trace_fn=lambda p, s: {"mu": p["mu"]},
    )


@pytest.fixture(scope="module")
def degenerate():
    """ULA step 1.5 in 8-D: the Jarzynski weights collapse at every move."""
    return _fit(8, step_size=1.5, snapshot_every=5, khat_fn=dg.pareto_khat)


@pytest.fixture(scope="module")
def pcd():
    return _fit(2, kernel="pcd", snapshot_every=10, num_iterations=20)


# ---------------------------------------------------------------------------------------
# effective_sample_size, pareto_khat
# ---------------------------------------------------------------------------------------


def test_effective_sample_size_formula():
    rng = np.random.default_rng(0)
    lw = rng.normal(size=(3, 500))
    w = np.exp(lw)
    expected = w.sum(-1) ** 2 / (w**2).sum(-1)
    np.testing.assert_allclose(dg.effective_sample_size(lw), expected, rtol=1e-10)
    assert dg.effective_sample_size(np.zeros(50)) == pytest.approx(50.0)
    assert dg.effective_sample_size(np.r_[0.0, np.full(99, -200.0)]) == pytest.approx(1.0)
    # shift invariance (normalised or not)
    np.testing.assert_allclose(dg.effective_sample_size(lw + 1e3), expected, rtol=1e-10)


def test_pareto_khat_separates_light_and_heavy_tails():
    rng = np.random.default_rng(1)
    light = 0.3 * rng.normal(size=4000)  # log-normal weights, all moments
    heavy = np.log1p(rng.pareto(1.0, size=4000))  # Pareto weights, tail index k = 1
    k_light, k_heavy = dg.pareto_khat(light), dg.pareto_khat(heavy)
    assert isinstance(k_light, float)
    assert k_light < 0.5
    assert k_heavy > dg.KHAT_THRESHOLD
    assert 0.8 < k_heavy < 1.2
    # shift-invariant: normalised or raw log weights give the same k-hat
    assert dg.pareto_khat(heavy - 37.0) == pytest.approx(k_heavy, abs=1e-8)


def test_pareto_khat_delegates_to_arviz_psis_and_batches():
    rng = np.random.default_rng(2)
    lw = rng.standard_t(3, size=(2, 3, 300))
    khat = dg.pareto_khat(lw)
    assert khat.shape == (2, 3)
    # ArviZ's psislw takes negated log ratios; our k-hat is that of the weights e^lw
    np.testing.assert_allclose(khat[1, 2], array_stats.psislw(-lw[1, 2], r_eff=1.0)[1])
    # equal weights have no tail: NaN, not a made-up number
    assert math.isnan(dg.pareto_khat(np.full(100, -np.log(100))))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.float64(1.0), "`log_weights` must have a walker axis"),
        (np.array([0.0, np.nan, 1.0]), "`log_weights` contains non-finite"),
        (np.array([0.0]), "`log_weights` needs at least 2 walkers"),
    ],
)
def test_pareto_khat_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        dg.pareto_khat(bad)


def test_pareto_khat_zero_weights_are_dropped():
    """-inf log weights (walkers of weight 0, as training leaves them) do not enter the fit:
    k-hat and the ESS equal those of the positive weights alone."""
    rng = np.random.default_rng(3)
    positive = np.log1p(rng.pareto(1.5, size=300))
    lw = np.concatenate([positive, np.full(20, -np.inf)])
    rng.shuffle(lw)
    assert dg.pareto_khat(lw) == pytest.approx(dg.pareto_khat(positive), abs=1e-12)
    assert math.isfinite(dg.pareto_khat(lw))
    assert dg.effective_sample_size(lw) == pytest.approx(dg.effective_sample_size(positive))
    with pytest.raises(ValueError, match="every weight is zero"):
        dg.pareto_khat(np.full(40, -np.inf))
    with pytest.raises(ValueError, match=r"\(NaN or \+inf\)"):
        dg.pareto_khat(np.r_[0.0, np.inf, 1.0])


def test_pareto_khat_too_few_walkers_is_nan_with_warning():
    rng = np.random.default_rng(4)
    lw = rng.normal(size=(3, 16))
    with pytest.warns(dg.TooFewWalkersWarning, match="too few walkers"):
        khat = dg.pareto_khat(lw)
    assert khat.shape == (3,) and np.isnan(khat).all()
    # 40 walkers of which 12 have weight 0: 28 positive weights, too few as well
    lw40 = rng.normal(size=40)
    lw40[:12] = -np.inf
    with pytest.warns(dg.TooFewWalkersWarning):
        assert math.isnan(dg.pareto_khat(lw40))
    # the boundary follows ArviZ's tail rule: 30 positive weights fit, without a warning
    assert dg.psis_tail_length(29) == 5 and dg.psis_tail_length(30) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(dg.pareto_khat(rng.normal(size=30)))


def test_datatree_and_plots_accept_16_walkers_with_zero_weights(tmp_path):
    """A 16-walker run whose state and snapshots hold walkers of weight 0 (-inf)."""
    data = jax.random.normal(jax.random.key(1), (100, 2)) + 1.0
    result = fit(
        gaussian_potential, {"mu": jnp.zeros(2)}, data, optimizer=optax.sgd(0.05),
        num_walkers=16, step_size=0.1, num_iterations=10, rng_key=jax.random.key(0),
        init_particles="standard_normal", callbacks=[cbs.Snapshots(5)],
    )
    snaps = dict(result.trace["snapshots"])
    for name in ("log_weights", "log_weights_before_resampling"):
        lw = np.array(snaps[name])
        lw[:, :3] = -np.inf
        snaps[name] = lw
    state_lw = np.array(result.state.log_weights)
    state_lw[:3] = -np.inf
    result = result._replace(
        trace={**result.trace, "snapshots": snaps},
        state=result.state._replace(log_weights=jnp.asarray(state_lw)),
    )
    with pytest.warns(dg.TooFewWalkersWarning):
        dt = dg.to_datatree(result)
    khat = dt["sample_stats"]["pareto_k"].values[0]
    assert np.isnan(khat).all()
    walkers = dt["walkers"].to_dataset()
    assert walkers.sizes["draw"] == 16
    assert np.isneginf(walkers["log_weights"].values[0, :3]).all()
    with pytest.warns(dg.TooFewWalkersWarning):
        assert isinstance(dg.plot_training(result, path=tmp_path / "t.png"), Figure)
    assert isinstance(dg.plot_samples(result, path=tmp_path / "s.png"), Figure)


def test_pareto_khat_rejects_bad_r_eff():
    with pytest.raises(ValueError, match="`r_eff`"):
        dg.pareto_khat(np.arange(50.0), r_eff=0.0)


# ---------------------------------------------------------------------------------------
# fit: new trace fields and snapshots
# ---------------------------------------------------------------------------------------


def test_trace_weight_fields(healthy):
    result, _, _ = healthy
    tr = result.trace
    np.testing.assert_allclose(tr["normalized_ess"], tr["ess"] / NUM_WALKERS, rtol=1e-6)
    assert np.all(tr["max_weight"] >= 1.0 / NUM_WALKERS * (1 - 1e-5))
    assert np.all(tr["max_weight"] <= 1.0)
    # sum w^2 <= max w, hence ESS >= 1 / max w
    assert np.all(tr["ess"] >= (1 - 1e-4) / tr["max_weight"])
    np.testing.assert_allclose(tr["step_size"], 0.1, rtol=1e-6)
    assert tr["step_size"].shape == (40,)


def test_snapshots_are_the_walkers_at_the_start_of_the_iteration(healthy):
    result, _, _ = healthy
    snaps = result.trace["snapshots"]
    np.testing.assert_array_equal(snaps["iteration"], [0, 10, 20, 30])
    assert snaps["particles"].shape == (4, NUM_WALKERS, 2)
    # the default walkers start from N(0, I) drawn with the fit's init key, equal weights
    init_key, _ = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(init_key, (NUM_WALKERS, 2))
    np.testing.assert_allclose(snaps["particles"][0], x0, rtol=1e-6)
    np.testing.assert_allclose(snaps["log_weights"][0], -np.log(NUM_WALKERS), rtol=1e-6)
    # pre-resampling weights are those whose ESS the trace reports
    ess = dg.effective_sample_size(snaps["log_weights_before_resampling"])
    np.testing.assert_allclose(ess, result.trace["ess"][snaps["iteration"]], rtol=1e-4)
    # k-hat from the callback, one per snapshot
    np.testing.assert_allclose(
        snaps["pareto_k"], dg.pareto_khat(snaps["log_weights_before_resampling"])
    )


def test_snapshots_do_not_change_the_run(healthy, capfd):
    result, _, _ = healthy
    plain, _, _ = _fit(
        2, log_z0=math.log(2 * math.pi), trace_fn=lambda p, s: {"mu": p["mu"]}, progress=False
    )
    assert capfd.readouterr().err == ""  # progress=False is silent
    np.testing.assert_allclose(plain.params["mu"], result.params["mu"], rtol=1e-6)
    assert "snapshots" not in plain.trace
    for name, values in plain.trace.items():
        np.testing.assert_allclose(
            np.asarray(jax.tree.leaves(values)[0], float),
            np.asarray(jax.tree.leaves(result.trace[name])[0], float),
            rtol=1e-5, atol=1e-6, err_msg=name,
        )


def test_cd_snapshots_with_short_last_interval_and_progress(capfd):
    result, _, _ = _fit(
        2, kernel="cd", snapshot_every=10, chunk_size=10, num_iterations=23, progress=True
    )
    err = capfd.readouterr().err
    assert "fit[cd]" in err and "23/23" in err
    snaps = result.trace["snapshots"]
    np.testing.assert_array_equal(snaps["iteration"], [0, 10, 20])
    assert sorted(snaps) == ["iteration", "particles"]  # no weights for CD
    assert len(result.trace["grad_norm"]) == 23


@pytest.mark.parametrize(
    "make, match",
    [
        # the messages name fit's former keywords (snapshot_every, warn_*) rather than the
        # constructors' own argument names (every, ess_floor, khat, patience): accept both
        (lambda: cbs.Snapshots(0), "`(snapshot_)?every`"),
        (lambda: cbs.Snapshots(2.0), "`(snapshot_)?every`"),
        (lambda: cbs.ParetoKhat(0.7), "`khat_fn`"),
        (lambda: cbs.DegeneracyCheck(ess_floor=1.5), "`(warn_)?ess_floor`"),
        (lambda: cbs.DegeneracyCheck(ess_floor=0.0), "`(warn_)?ess_floor`"),
        (lambda: cbs.DegeneracyCheck(khat=float("nan")), "`(warn_)?khat`"),
        (lambda: cbs.DegeneracyCheck(patience=0), "`(warn_)?patience`"),
        (lambda: cbs.DivergenceCheck(0.0), "`(divergence_)?factor`"),
    ],
)
def test_bad_diagnostic_options_name_the_argument(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_only_one_callback_may_ask_for_snapshots():
    with pytest.raises(ValueError, match="snapshot"):
        fit(
            gaussian_potential, {"mu": jnp.zeros(2)}, jnp.ones((10, 2)),
            optimizer=optax.sgd(0.1), num_walkers=8, step_size=0.1, num_iterations=5,
            rng_key=jax.random.key(0), callbacks=[cbs.Snapshots(5), cbs.Snapshots(2)],
        )


# ---------------------------------------------------------------------------------------
# Degeneracy warning
# ---------------------------------------------------------------------------------------


def test_khat_warning_fires_once_on_a_degenerate_run(degenerate):
    result, caught, _ = degenerate
    assert len(caught) == 1
    message = str(caught[0].message)
    match = re.search(r"Pareto k-hat > 0.7 at every snapshot from iteration (\d+) to (\d+)",
                      message)
    assert match is not None, message
    first, last = int(match[1]), int(match[2])
    snaps = result.trace["snapshots"]
    in_range = (snaps["iteration"] >= first) & (snaps["iteration"] <= last)
    assert last - first + 5 >= 20  # spans the default patience of 20 iterations
    assert np.all(snaps["pareto_k"][in_range] > dg.KHAT_THRESHOLD)
    for advice in ("more walkers", "step_size", "learning rate", "ess_threshold",
                   "kernels.adaptive_jarzynski_ula"):
        assert advice in message
    assert np.mean(snaps["pareto_k"] > dg.KHAT_THRESHOLD) > 0.5


def test_no_warning_on_a_healthy_run(healthy):
    result, caught, _ = healthy
    assert caught == []
    assert np.nanmax(result.trace["snapshots"]["pareto_k"]) < dg.KHAT_THRESHOLD


def test_ess_floor_criterion_and_switches(degenerate):
    trace = degenerate[0].trace
    message = _degeneracy_message(trace, 0.3, None, 10)
    assert message is not None and "normalised ESS < 0.3 over iterations 0-" in message
    assert _degeneracy_message(trace, None, None, 10) is None
    # a k-hat run shorter than the patience (in iterations) does not warn
    assert _degeneracy_message(trace, None, 0.7, 41) is None


def test_first_long_run():
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], bool)
    assert _first_long_run(mask, 2) == (0, 1)
    assert _first_long_run(mask, 3) == (3, 5)
    assert _first_long_run(mask, 4) == (7, 10)
    assert _first_long_run(mask, 5) is None
    assert _first_long_run(np.zeros(0, bool), 1) is None


# ---------------------------------------------------------------------------------------
# ArviZ export
# ---------------------------------------------------------------------------------------


def test_datatree_layout(healthy):
    result, _, _ = healthy
    dt = dg.to_datatree(result)
    stats = dt["sample_stats"].to_dataset()
    for name in ("ess", "normalized_ess", "resampled", "max_weight", "log_normalizer",
                 "cross_entropy", "grad_norm", "step_size", "pareto_k", "extra_mu"):
        assert name in stats, name
        assert stats[name].dims[:2] == ("chain", "draw")
    assert stats.sizes["chain"] == 1 and stats.sizes["draw"] == 40
    np.testing.assert_array_equal(stats["ess"].values[0], result.trace["ess"])
    khat = stats["pareto_k"].values[0]
    snap_it = result.trace["snapshots"]["iteration"]
    np.testing.assert_allclose(khat[snap_it], result.trace["snapshots"]["pareto_k"])
    assert np.isnan(np.delete(khat, snap_it)).all()
    walkers = dt["walkers"].to_dataset()
    assert walkers["x"].dims == ("chain", "draw", "iteration", "x_dim_0")
    assert walkers.sizes["draw"] == NUM_WALKERS
    np.testing.assert_array_equal(walkers["iteration"].values, snap_it)
    np.testing.assert_array_equal(
        walkers["x"].values[0, :, 2], result.trace["snapshots"]["particles"][2]
    )
    assert dt.attrs["method"] == "jarzynski"
    assert stats.attrs["inference_library"] == "numpyro_ebm"


def test_datatree_netcdf_roundtrip_and_arviz_functions(healthy, tmp_path):
    result, _, _ = healthy
    dt = dg.to_datatree(result)
    path = tmp_path / "run.nc"
    dt.to_netcdf(path)
    back = xr.open_datatree(path)
    for group in ("sample_stats", "walkers"):
        xr.testing.assert_allclose(back[group].to_dataset(), dt[group].to_dataset())
    assert back["sample_stats"]["resampled"].dtype == bool
    # ArviZ functions run on the snapshot group as stored
    ess = arviz_stats.ess(back, group="walkers", var_names=["x"])
    assert ess["x"].dims == ("iteration", "x_dim_0")
    assert np.all(np.isfinite(ess["x"].values)) and np.all(ess["x"].values > 1)
    khat_x = back["walkers"].to_dataset()[["x"]].azstats.pareto_khat(
        sample_dims=["chain", "draw"]
    )
    assert khat_x["x"].shape == (4, 2) and np.all(np.isfinite(khat_x["x"].values))
    # and k-hat of the stored weights reproduces the exported diagnostic
    lw = back["walkers"]["log_weights_before_resampling"].transpose("iteration", "chain", "draw")
    np.testing.assert_allclose(
        dg.pareto_khat(lw.values[:, 0]),
        back["sample_stats"]["pareto_k"].values[0, lw["iteration"].values],
    )
    back.close()


def test_datatree_snapshot_subsampling(healthy):
    result, _, _ = healthy
    dt = dg.to_datatree(result, snapshot_every=20)
    np.testing.assert_array_equal(dt["walkers"]["iteration"].values, [0, 20])
    with pytest.raises(ValueError, match="`snapshot_every`"):
        dg.to_datatree(result, snapshot_every=15)


def test_datatree_for_pcd_has_no_weight_fields(pcd):
    result, caught, _ = pcd
    assert caught == []
    dt = dg.to_datatree(result)
    stats = dt["sample_stats"].to_dataset()
    for absent in ("ess", "normalized_ess", "resampled", "max_weight", "log_normalizer",
                   "cross_entropy", "pareto_k"):
        assert absent not in stats, absent
    assert {"grad_norm", "data_energy", "step_size"} <= set(stats.data_vars)
    assert set(dt["walkers"].to_dataset().data_vars) == {"x"}


def test_datatree_argument_errors(healthy):
    with pytest.raises(TypeError, match="`result`"):
        dg.to_datatree({"trace": {}})
    plain = healthy[0]._replace(trace={k: v for k, v in healthy[0].trace.items()
                                       if k != "snapshots"})
    with pytest.raises(ValueError, match="`snapshot_every`"):
        dg.to_datatree(plain, snapshot_every=10)


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------


def _visible_axes(fig: Figure) -> int:
    return sum(ax.get_visible() for ax in fig.axes)


def test_plot_training_png(healthy, tmp_path):
    result, _, _ = healthy
    exact = result.trace["cross_entropy"] + 0.01
    path = tmp_path / "training.png"
    fig = dg.plot_training(result, exact_cross_entropy=exact, path=path)
    assert isinstance(fig, Figure)
    assert path.stat().st_size > 20_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ESS, largest weight, log Z, CE, k-hat, gradient norm
    assert _visible_axes(fig) == 6
    assert plt.get_fignums() == []  # pyplot's state is left alone
    with pytest.raises(ValueError, match="`exact_cross_entropy`"):
        dg.plot_training(result, exact_cross_entropy=np.zeros(3))


def _panel(fig: Figure, title: str):
    return next(ax for ax in fig.axes if ax.get_visible() and ax.get_title() == title)


def test_plot_training_labels_a_constant_exact_ce_as_constant(healthy):
    result, _, _ = healthy
    const = _panel(dg.plot_training(result, exact_cross_entropy=2.5), "Cross-entropy")
    labels = [t.get_text() for t in const.get_legend().get_texts()]
    assert "exact CE (constant)" in labels
    curve = _panel(
        dg.plot_training(result, exact_cross_entropy=result.trace["cross_entropy"] + 0.01),
        "Cross-entropy",
    )
    labels = [t.get_text() for t in curve.get_legend().get_texts()]
    assert "exact CE" in labels and not any("constant" in t for t in labels)


def test_plot_training_ess_legend_hides_no_resampling_tick_nor_curve(degenerate):
    result = degenerate[0]
    trace = result.trace
    assert np.asarray(trace["resampled"])[:3].all()  # ticks at the left edge
    fig = dg.plot_training(result)
    fig.canvas.draw()
    ax = _panel(fig, "Effective sample size")
    box = ax.get_legend().get_window_extent()
    it = np.arange(len(trace["resampled"]))
    events = it[np.asarray(trace["resampled"], bool)]
    ticks = ax.transData.transform(np.c_[events, np.zeros(events.size)])
    curve = ax.transData.transform(np.c_[it, trace["normalized_ess"]])
    # a tick is a vertical bar of 8 points: pad the legend box by half of it
    pad = 4 * fig.dpi / 72
    points = np.r_[ticks, curve]
    inside_x = (points[:, 0] > box.x0 - pad) & (points[:, 0] < box.x1 + pad)
    inside_y = (points[:, 1] > box.y0 - pad) & (points[:, 1] < box.y1 + pad)
    assert not (inside_x & inside_y).any()


def test_plot_training_pcd_png(pcd, tmp_path):
    path = tmp_path / "pcd.png"
    fig = dg.plot_training(pcd[0], exact_cross_entropy=2.5, path=path)
    assert path.stat().st_size > 10_000
    assert _visible_axes(fig) == 2  # cross-entropy (exact), gradient norm


def test_plot_samples_scatter_png(healthy, tmp_path):
    result, _, data = healthy
    path = tmp_path / "walkers.png"
    fig = dg.plot_samples(result, data=data, path=path)
    assert path.stat().st_size > 15_000
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)  # weights as colour
    with pytest.raises(ValueError, match="`log_weights`"):
        dg.plot_samples(np.zeros((5, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="`dims`"):
        dg.plot_samples(np.zeros((5, 2)), dims=(0, 2))


def test_plot_samples_image_grid_png(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.uniform(size=(20, 8, 8))
    lw = rng.normal(size=20)
    path = tmp_path / "images.png"
    fig = dg.plot_samples(images, lw, max_images=9, path=path)
    assert path.stat().st_size > 5_000
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titled) == 9
    # heaviest walker first
    assert titled[0] == f"Nw={20 * np.exp(lw.max()) / np.exp(lw).sum():.2g}"
    # flat vectors with image_shape
    dg.plot_samples(images.reshape(20, 64), image_shape=(8, 8), path=tmp_path / "flat.png")
    with pytest.raises(ValueError, match="`image_shape`"):
        dg.plot_samples(images.reshape(20, 64), image_shape=(7, 7))


def test_resampling_rate_criterion():
    """A run that resamples in at least half of some window of max(5 * patience, 100)
    iterations is flagged even though its ESS never stays below the floor (each resampling
    resets it); a few resamplings, or the ESS check switched off, are not flagged."""
    n = 400
    resampled = np.zeros(n, bool)
    resampled[250::2] = True  # every other iteration from 250 on: 75 in the last 150
    trace = {"normalized_ess": np.full(n, 0.6), "resampled": resampled}
    message = _degeneracy_message(trace, 0.05, 0.7, 20)
    assert message is not None and "resampled in 50 of the 100 iterations 249-348" in message
    assert "(75 resamplings in all)" in message and "clip" in message
    assert _degeneracy_message(trace, None, 0.7, 20) is None
    few = {"normalized_ess": np.full(n, 0.6), "resampled": np.arange(n) % 50 == 0}
    assert _degeneracy_message(few, 0.05, 0.7, 20) is None
