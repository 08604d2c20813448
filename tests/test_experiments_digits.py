"""The imbalanced-digits experiment: exact initial model, classifier, class masses, a tiny run."""

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_ebm.datasets import load_digits
from numpyro_ebm.experiments import digits

TINY = digits.DigitsConfig(num_walkers=64, num_iterations=30, hidden=16, num_snapshots=3)


def test_classifier_held_out_accuracy_above_90_percent():
    data = load_digits(num_samples=245)
    clf = digits.train_classifier(data.rest_images, data.rest_labels, data.classes, seed=0)
    assert clf.test_accuracy > 0.9
    assert clf.num_train + clf.num_test == len(data.rest_labels)
    # and it labels the EBM's training images (never seen by it) correctly too
    proba = clf.predict_proba(data.images)
    assert proba.shape == (245, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)  # float32 softmax
    predicted = np.asarray(data.classes)[proba.argmax(1)]
    assert np.mean(predicted == data.labels) > 0.9


def test_class_masses_weighted_and_equal():
    proba = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    np.testing.assert_allclose(digits.class_masses(proba), [0.5, 0.25, 0.25])
    log_w = np.log([0.1, 0.2, 0.3, 0.4]) + 5.0  # unnormalised is fine
    np.testing.assert_allclose(digits.class_masses(proba, log_w), [0.5, 0.2, 0.3])


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_initial_energy_is_the_exact_gaussian(model):
    config = dataclasses.replace(TINY, model=model, channels=4)
    data = load_digits(num_samples=70)
    potential_fn, params, base = digits.make_energy(config, data.images)
    mean, scale = base["mean"], base["scale"]
    x = jnp.asarray(mean + scale * np.random.default_rng(0).normal(size=(5, 8, 8)), jnp.float32)
    energy = jax.vmap(potential_fn, (None, 0))(params, x)
    expected = 0.5 * np.sum((np.asarray(x, np.float64) - mean) ** 2, axis=(1, 2)) / scale**2
    np.testing.assert_allclose(np.asarray(energy), expected, rtol=1e-5)
    assert base["log_z0"] == pytest.approx(32 * math.log(2 * math.pi * scale**2))
    # the network does depend on its parameters (last layer zero, not the others)
    grads = jax.grad(potential_fn)(params, x[0])
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_tiny_run_reports_masses_and_cross_entropy():
    results = digits.run(TINY)
    np.testing.assert_allclose(results["truth"], [4 / 7, 2 / 7, 1 / 7])
    assert results["classifier"].test_accuracy > 0.9
    for method in ("jarzynski", "pcd"):
        r = results[method]
        assert r["masses"].shape == (3,)
        assert r["masses"].sum() == pytest.approx(1.0)
        assert r["mass_error"] == pytest.approx(np.max(np.abs(r["masses"] - results["truth"])))
        assert r["snapshot_masses"].shape == (len(r["snapshot_iterations"]), 3)
        assert 0.0 <= r["unsure_fraction"] <= 1.0
    jz = results["jarzynski"]
    trace = jz["result"].trace
    # at theta_0 the walkers are exact draws and log Z_0 is known: CE = data energy + log Z_0
    assert trace["log_normalizer"][0] == 0.0
    assert trace["cross_entropy"][0] == pytest.approx(trace["data_energy"][0] + results["log_z0"], rel=1e-6)
    # data energy of N(mean, scale^2) at theta_0 is D/2 (the scale is the clean images' pixel
    # std), plus D noise_std^2 / (2 scale^2) for the fixed noisy copies the model is fitted to
    scale = results["base"]["scale"]
    expected = 32.0 * (1.0 + TINY.noise_std**2 / scale**2)
    assert trace["data_energy"][0] == pytest.approx(expected, abs=0.2)
    # PCD keeps equal weights, so its weighted and unweighted masses agree
    np.testing.assert_allclose(results["pcd"]["masses"], results["pcd"]["unweighted_masses"])
    table = digits.format_table(results)
    assert "truth" in table and "jarzynski" in table and "pcd" in table and "accuracy" in table
    summary = digits.summary(results)
    assert summary["counts"] == {"2": 140, "3": 70, "6": 35}
    assert set(summary["methods"]) == {"jarzynski", "pcd"}
    # the classifier's masses every iteration, and the long-run figures read from them
    for method in ("jarzynski", "pcd"):
        r = results[method]
        assert r["mass_trace"].shape == (TINY.num_iterations, 3)
        np.testing.assert_allclose(r["mass_trace"].sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(r["tail_masses"], r["mass_trace"][24:].mean(0))
        assert r["tail_mass_error"] == pytest.approx(np.max(np.abs(r["tail_masses"] - results["truth"])))
    # equal weights: the masses' standard error is sqrt(m (1 - m) / N), averaged over the tail
    tail = results["pcd"]["mass_trace"][24:]
    np.testing.assert_allclose(results["pcd"]["tail_mass_standard_error"],
                               np.sqrt(tail * (1 - tail) / TINY.num_walkers).mean(0), rtol=1e-3)
    assert "MC standard error" in table
    # three classifiers (seeds 0, 10, 20) read the final walkers; the first is the one that
    # labels them in the loop, so its masses are the final masses
    assert len(results["classifiers"]) == 3 and results["classifiers"][0] is results["classifier"]
    for method in ("jarzynski", "pcd"):
        r = results[method]
        assert r["masses_by_classifier"].shape == (3, 3)
        np.testing.assert_allclose(r["masses_by_classifier"][0], r["masses"])
        np.testing.assert_allclose(r["classifier_spread"], np.ptp(r["masses_by_classifier"], axis=0))
        assert 0.0 <= r["classifier_agreement"] <= 1.0
        assert summary["methods"][method]["classifier_spread"] == r["classifier_spread"].tolist()
    assert "classifier spread" in table
    assert 0.0 < jz["min_lineage_fraction"] <= 1.0
    # the default adapts h from a probe of MALA's acceptance every 10 iterations, starting
    # at the given h: h changes only after a probe (iterations 0, 10, 20)
    assert trace["step_size"][0] == pytest.approx(TINY.step_size)
    assert np.ptp(trace["step_size"]) > 0
    assert np.all(np.isfinite(trace["probe_acceptance"][::10]))
    assert np.all((np.nonzero(np.diff(trace["step_size"]))[0] + 1) % 10 == 1)


def test_labels_every_few_iterations_feed_the_tail_figures():
    """``label_every=4``: the classifier's masses at iterations 0, 4, ..., 28 only (no
    missing rows), and the tail average is that of the labelled rows in the last 20%."""
    config = dataclasses.replace(TINY, label_every=4, methods=("pcd",), num_classifiers=1)
    results = digits.run(config)
    r = results["pcd"]
    assert "classifier spread" not in digits.format_table(results)  # one classifier: no spread
    np.testing.assert_array_equal(r["classifier_spread"], 0.0)
    np.testing.assert_array_equal(r["mass_trace_iterations"], np.arange(0, 30, 4))
    assert r["mass_trace"].shape == (8, 3) and np.all(np.isfinite(r["mass_trace"]))
    np.testing.assert_allclose(r["mass_trace"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(r["tail_masses"], r["mass_trace"][-2:].mean(0))  # iterations 24, 28


def test_figure_without_jarzynski_shows_energy_and_gradient(tmp_path, monkeypatch):
    """A PCD-only run has no weights to show: the panels beside the masses show the energy at
    the data and the gradient norm (where a runaway shows), not empty axes."""
    import matplotlib.figure

    titles = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    results = digits.run(dataclasses.replace(TINY, methods=("pcd",), num_classifiers=1))
    digits.plot(results, str(tmp_path / "masses.png"))
    assert titles[1:] == ["mean energy at the data", "gradient norm before clipping"]


def test_a_run_too_short_for_a_labelled_tail_warns_and_reports_nan():
    """Labels at iterations 0 and 20 of 30: none in the last 20% (24-29). The run says so
    before training and its tail figures are NaN, without numpy's empty-mean warnings."""
    config = dataclasses.replace(TINY, label_every=20, methods=("pcd",), num_classifiers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = digits.run(config)["pcd"]
    messages = [str(w.message) for w in caught]
    assert any("`label_every`=20" in m and "last 20%" in m for m in messages)
    assert not any("empty slice" in m or "invalid value" in m for m in messages)
    assert np.all(np.isnan(r["tail_masses"])) and np.isnan(r["tail_mass_error"])
    assert np.all(np.isfinite(r["masses"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="cifar"), "source"),
        (dict(source="mnist"), "data_dir"),
        (dict(model="resnet"), "model"),
        (dict(num_walkers=1), "num_walkers"),
        (dict(label_every=0), "label_every"),
        (dict(step_size=0.0), "step_size"),
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(methods=("sgld",)), "methods"),
        (dict(schedule="linear"), "schedule"),
        (dict(target_ess=1.0), "target_ess"),
        (dict(num_mcmc_steps=0), "num_mcmc_steps"),
        (dict(clip_norm=0.0), "clip_norm"),
        (dict(learning_rate_schedule="cosine"), "learning_rate_schedule"),
        (dict(classifier="svm"), "classifier"),
        (dict(target_acceptance=1.0), "target_acceptance"),
        (dict(acceptance_probe_every=0), "acceptance_probe_every"),
        (dict(optimizer="lbfgs"), "optimizer"),
        (dict(rejuvenation_moves=-1), "rejuvenation_moves"),
        (dict(num_classifiers=0), "num_classifiers"),
    ],
)
def test_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits.DigitsConfig(**kwargs)


def test_num_mcmc_steps_and_adaptive_schedule_reach_fit():
    # the adaptive schedule is for the weighted walkers only: PCD runs with the fixed one
    config = dataclasses.replace(TINY, num_iterations=10, num_mcmc_steps=2, schedule="adaptive", max_substeps=3)
    results = digits.run(config)
    trace = results["jarzynski"]["result"].trace
    assert trace["num_substeps"].shape == (10,)
    assert 1 <= int(trace["num_substeps"].max()) <= 3
    assert "num_substeps" not in results["pcd"]["result"].trace
    assert digits.summary(results)["config"]["num_mcmc_steps"] == 2


@pytest.mark.parametrize(
    "num_iterations, expected",
    [(1000, 0.005), (8000, 0.005), (10000, 0.004), (12000, 40 / 12000), (16000, 0.0025), (20000, 0.0025),
     (100000, 0.0025)],
)
def test_default_learning_rate_follows_the_run_length(num_iterations, expected):
    """lr_0 = min(0.005, max(0.0025, 40 / K)): the sum of the linearly decayed rate (lr_0 K / 2)
    is 20 between 8000 and 16 000 iterations; an explicit rate is kept at any length; the
    schedule starts at lr_0 and ends at 0."""
    config = dataclasses.replace(digits.DigitsConfig(), num_iterations=num_iterations)
    assert config.learning_rate is None
    assert digits.peak_learning_rate(config) == pytest.approx(expected, rel=1e-12)
    schedule = digits.learning_rate(config)
    assert float(schedule(0)) == pytest.approx(expected, rel=1e-6)
    assert float(schedule(num_iterations)) == 0.0
    if 8000 <= num_iterations <= 16000:
        total = float(jnp.sum(schedule(jnp.arange(num_iterations))))  # lr_0 (K + 1) / 2
        assert total == pytest.approx(expected * (num_iterations + 1) / 2, rel=1e-4)
        assert total == pytest.approx(20.0, rel=1e-3)
    explicit = dataclasses.replace(config, learning_rate=0.001)
    assert digits.peak_learning_rate(explicit) == 0.001
    assert digits.learning_rate(dataclasses.replace(explicit, learning_rate_schedule="constant")) == 0.001
    assert digits.peak_learning_rate(digits.mnist_defaults("unused")) == 0.002


def test_default_optimiser_follows_the_cross_entropy_alone():
    """The default is the theory's objective: the step is -lr times the clipped
    cross-entropy gradient, with no pull towards theta = 0; ``weight_decay`` (an L2 penalty,
    which changes the objective) adds -lr * weight_decay * theta and only when asked for."""
    params = {"w": jnp.full(4, 2.0)}
    grads = {"w": jnp.full(4, 0.1)}  # norm 0.2, below the clip
    for base in (digits.DigitsConfig(), digits.mnist_defaults("unused")):
        lr = digits.peak_learning_rate(base)
        for weight_decay, expected in ((None, -lr * 0.1), (0.05, -lr * (0.1 + 0.05 * 2.0))):
            config = dataclasses.replace(base, learning_rate_schedule="constant")
            if weight_decay is not None:
                config = dataclasses.replace(config, weight_decay=weight_decay)
            optimizer = digits.make_optimizer(config)
            updates, _ = optimizer.update(grads, optimizer.init(params), params)
            np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
