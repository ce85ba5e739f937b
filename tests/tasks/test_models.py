"""The seed's models and optimizer defaults in Keras 3."""

from __future__ import annotations

import random
import threading

import keras
import numpy as np
import pytest

from core.errors import PipelineError
from core.seed import IRIS_LEARNING_RATE, LEARNING_RATE
from tasks.models import build_one_layer_cnn, build_softmax_regression, make_optimizer


@pytest.mark.parametrize(
    ("build", "input_shape", "output_shape", "parameters"),
    [
        # Dense(3) on 4 features: 4 x 3 weights + 3 biases.
        (build_softmax_regression, (4,), (None, 3), 15),
        # Conv2D(32, 3x3): 32 x (9 + 1); valid padding leaves 26 x 26 x 32 = 21,632 features for Dense(10).
        (build_one_layer_cnn, (28, 28, 1), (None, 10), 320 + 21_632 * 10 + 10),
    ],
    ids=["softmax-regression", "one-layer-cnn"],
)
def test_models_have_the_seeds_shape_and_size(build, input_shape, output_shape, parameters):
    model = build()
    assert model.input_shape == (None, *input_shape)
    assert model.output_shape == output_shape
    assert model.count_params() == parameters


def test_the_cnn_has_no_pooling_and_valid_padding_as_in_the_seed():
    model = build_one_layer_cnn()
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv2D", "Activation", "Flatten", "Dense", "Activation"]
    assert model.layers[0].padding == "valid" and model.layers[0].filters == 32


@pytest.mark.parametrize("build", [build_softmax_regression, build_one_layer_cnn], ids=["softmax-regression", "cnn"])
def test_the_initial_weights_come_from_the_seed_alone_whatever_other_threads_draw(build):
    """Keras seeds each layer's initializer from Python's global `random` as the layer is made; a thread drawing from
    it meanwhile (websockets' keepalive ping, in Prefect's event client) must not change the model, which stays the
    one Keras' own seeding gives undisturbed."""
    keras.utils.set_random_seed(7)
    undisturbed = build().get_weights()
    keras.utils.set_random_seed(7)
    ping = threading.Thread(target=random.getrandbits, args=(32,))
    ping.start()
    ping.join()
    disturbed = build(seed=7).get_weights()
    assert len(disturbed) == len(undisturbed) == len(build().weights)
    for made, expected in zip(disturbed, undisturbed, strict=True):
        np.testing.assert_array_equal(made, expected)
    keras.utils.set_random_seed(8)
    assert not np.array_equal(build(seed=8).get_weights()[0], disturbed[0])  # another seed, other weights


@pytest.mark.parametrize("build", [build_softmax_regression, build_one_layer_cnn], ids=["softmax-regression", "cnn"])
def test_outputs_are_probabilities(build):
    model = build()
    batch = np.random.default_rng(0).random((3, *model.input_shape[1:]), dtype=np.float32)
    probabilities = np.asarray(model(batch))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities >= 0).all()


@pytest.mark.parametrize(
    ("name", "learning_rate", "kind", "expected_rate"),
    [
        ("adadelta", LEARNING_RATE, keras.optimizers.Adadelta, 1.0),  # Keras 1's default, not Keras 3's 0.001
        ("sgd", IRIS_LEARNING_RATE, keras.optimizers.SGD, 0.01),
        ("Adadelta", 0.5, keras.optimizers.Adadelta, 0.5),
    ],
    ids=["adadelta-seed-rate", "sgd-seed-rate", "explicit-rate"],
)
def test_optimizer_factory(name, learning_rate, kind, expected_rate):
    optimizer = make_optimizer(name, learning_rate)
    assert isinstance(optimizer, kind)
    assert float(optimizer.learning_rate) == pytest.approx(expected_rate)


@pytest.mark.parametrize(
    ("name", "learning_rate", "message"),
    [("adam", 1.0, "Unknown optimizer 'adam'; choose one of adadelta, sgd"), ("sgd", 0.0, "must be positive"),
     ("sgd", -1.0, "must be positive")],
    ids=["not-the-seeds", "zero-rate", "negative-rate"],
)
def test_optimizer_factory_refuses_bad_input(name, learning_rate, message):
    with pytest.raises(PipelineError, match=message):
        make_optimizer(name, learning_rate)
