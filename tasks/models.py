"""The seed's models and optimizers in Keras 3, written against `keras` alone so any backend runs them."""

from __future__ import annotations

import random

import keras

from core.errors import PipelineError

# The seed's optimizers: Adadelta for the CNN, SGD for iris (their learning rates: core/seed.py).
OPTIMIZERS = {"adadelta": keras.optimizers.Adadelta, "sgd": keras.optimizers.SGD}


def kernel_initializers(seed: int | None, layers: int) -> list[keras.initializers.Initializer]:
    """Each layer's kernel initializer (Glorot uniform, Keras' default), in the layers' order.

    With `seed`, their seeds are those Keras itself draws from Python's global `random`, one per layer as it is made,
    right after `keras.utils.set_random_seed(seed)`: the model is the one Keras gives undisturbed. They are drawn from
    a generator of their own, since another thread's draw meanwhile would change them, and Prefect's event client
    makes some (websockets' keepalive ping, every 20 s): a pipeline whose training started as one went out trained
    another model. Without `seed`, Keras draws them."""
    draws = random.Random(seed) if seed is not None else None
    return [keras.initializers.GlorotUniform(draws.randint(1, int(1e9)) if draws else None) for _ in range(layers)]


def build_softmax_regression(input_features: int = 4, classes: int = 3, *, seed: int | None = None) -> keras.Model:
    """The seed's iris model: Dense(classes) then softmax, i.e. multinomial logistic regression."""
    (dense,) = kernel_initializers(seed, 1)
    return keras.Sequential(
        [
            keras.Input(shape=(input_features,), name="features"),
            keras.layers.Dense(classes, kernel_initializer=dense, name="dense"),
            keras.layers.Activation("softmax", name="softmax"),
        ],
        name="softmax_regression",
    )


def build_one_layer_cnn(
    input_shape: tuple[int, int, int] = (28, 28, 1),
    classes: int = 10,
    filters: int = 32,
    kernel_size: tuple[int, int] = (3, 3),
    *,
    seed: int | None = None,
) -> keras.Model:
    """The seed's MNIST/notMNIST model: Conv2D(valid) -> ReLU -> Flatten -> Dense -> softmax, no pooling; its
    initial weights depend on `seed` alone (`kernel_initializers`)."""
    convolution, dense = kernel_initializers(seed, 2)
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="image"),
            keras.layers.Conv2D(filters, kernel_size, padding="valid", kernel_initializer=convolution,
                                name="convolution"),
            keras.layers.Activation("relu", name="relu"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(classes, kernel_initializer=dense, name="dense"),
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
