"""The seed's models and optimizers in Keras 3, written against `keras` alone so any backend runs them."""

from __future__ import annotations

import keras

from core.errors import PipelineError

# The seed's optimizers: Adadelta for the CNN, SGD for iris (their learning rates: core/seed.py).
OPTIMIZERS = {"adadelta": keras.optimizers.Adadelta, "sgd": keras.optimizers.SGD}


def build_softmax_regression(input_features: int = 4, classes: int = 3) -> keras.Model:
    """The seed's iris model: Dense(classes) then softmax, i.e. multinomial logistic regression."""
    return keras.Sequential(
        [
            keras.Input(shape=(input_features,), name="features"),
            keras.layers.Dense(classes, name="dense"),
            keras.layers.Activation("softmax", name="softmax"),
        ],
        name="softmax_regression",
    )


def build_one_layer_cnn(
    input_shape: tuple[int, int, int] = (28, 28, 1),
    classes: int = 10,
    filters: int = 32,
    kernel_size: tuple[int, int] = (3, 3),
) -> keras.Model:
    """The seed's MNIST/notMNIST model: Conv2D(valid) -> ReLU -> Flatten -> Dense -> softmax, no pooling."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="image"),
            keras.layers.Conv2D(filters, kernel_size, padding="valid", name="convolution"),
            keras.layers.Activation("relu", name="relu"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(classes, name="dense"),
            keras.layers.Activation("softmax", name="softmax"),
        ],
        name="one_layer_cnn",
    )


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """A fresh optimizer by name ("adadelta" or "sgd", case-insensitive) with a positive learning rate."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise PipelineError(f"Unknown optimizer {name!r}; choose one of {', '.join(sorted(OPTIMIZERS))}.")
    if not learning_rate > 0:
        raise PipelineError(f"learning_rate must be positive; got {learning_rate!r}.")
    return OPTIMIZERS[key](learning_rate=learning_rate)
