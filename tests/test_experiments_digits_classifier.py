"""The walkers' classifiers: held-out accuracy, a jittable labelling, masses from the trace."""

import jax
import numpy as np
import pytest

from numpyro_ebm.datasets import load_digits
from numpyro_ebm.experiments import digits_classifier as dc

DATA = load_digits(num_samples=245)


def test_cnn_classifier_is_accurate_and_its_labels_are_jittable():
    """A small CNN on the 296 8x8 images outside the subset (207 for training): above 90%
    on the held-out 89 and on the 245 subset images it never saw; label_fn (jitted) agrees
    with predict_proba's argmax."""
    clf = dc.train_cnn_classifier(DATA.rest_images, DATA.rest_labels, DATA.classes, num_epochs=30,
                                  batch_size=32, max_shift=1)
    assert clf.kind == "CNN" and clf.num_train + clf.num_test == len(DATA.rest_labels)
    assert clf.test_accuracy > 0.9
    proba = clf.predict_proba(DATA.images)
    assert np.mean(np.asarray(DATA.classes)[proba.argmax(1)] == DATA.labels) > 0.9
    labels = jax.jit(clf.label_fn)(DATA.images)
    np.testing.assert_array_equal(np.asarray(labels), proba.argmax(1))


def test_logistic_logits_match_scikit_learn():
    from sklearn.linear_model import LogisticRegression  # noqa: F401 (the backend)

    clf = dc.train_classifier(DATA.rest_images, DATA.rest_labels, DATA.classes)
    proba = clf.predict_proba(DATA.images)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)  # float32 softmax
    assert np.mean(np.asarray(DATA.classes)[proba.argmax(1)] == DATA.labels) > 0.9


def test_classifier_inputs_are_checked():
    with pytest.raises(ValueError, match="no classifier images"):
        dc.train_classifier(DATA.rest_images, DATA.rest_labels, (2, 3, 7))
    with pytest.raises(ValueError, match="outside `classes`"):
        dc.train_cnn_classifier(DATA.rest_images, DATA.rest_labels, (2, 3))


def _fixed(labels_by_row):
    """A classifier over 3 classes that gives row ``i`` of its input (a column of row
    indices) the label ``labels_by_row[i]``."""
    table = jax.numpy.asarray(np.eye(3)[labels_by_row] * 10.0, jax.numpy.float32)
    return dc.DigitClassifier(lambda x: table[x[:, 0].astype(int)], (2, 3, 6), 1.0, 1, 1)


def test_mass_readout_spread_and_agreement_are_exact():
    """Three classifiers that disagree on rows 1 and 3 of four: each one's masses are its own
    weighted label shares, the spread is max - min per class, and the agreement is the weight
    of rows 0 and 2."""
    rows = np.arange(4, dtype=np.float32)[:, None]
    classifiers = [_fixed([0, 1, 2, 0]), _fixed([0, 0, 2, 0]), _fixed([0, 1, 2, 1])]
    w = np.array([0.1, 0.2, 0.3, 0.4])
    probas = [c.predict_proba(rows) for c in classifiers]
    out = dc.mass_readout(probas, np.log(w) - 3.0)
    expected = np.array([[0.5, 0.2, 0.3], [0.7, 0.0, 0.3], [0.1, 0.6, 0.3]])
    np.testing.assert_allclose(out["masses_by_classifier"], expected, atol=1e-12)
    np.testing.assert_allclose(out["classifier_spread"], [0.6, 0.6, 0.0], atol=1e-12)
    assert out["classifier_agreement"] == pytest.approx(0.4)
    equal = dc.mass_readout(probas)  # equal weights
    assert equal["classifier_agreement"] == pytest.approx(0.5)
    np.testing.assert_allclose(equal["masses_by_classifier"][0], [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="`probas`"):
        dc.mass_readout([])
