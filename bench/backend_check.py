"""The model code and the input path under a Keras backend other than TensorFlow (JAX by default), e.g. on a GPU.

The seed's CNN (tasks/models.py, Keras 3 only) trains one epoch on 200,000 generated glyph-like
images, fed two ways: by `SplitBatches.keras_input()` (a Keras PyDataset of float batches on backends
other than TensorFlow), with 1 and 16 steps per execution, and by `DeviceSplits` (what the training
stage uses there: the uint8 split held on the device, batches fed as row numbers and gathered there),
with 16 and 64. Prints the devices, the PyDataset's samples/s alone (no model), and each variant's
training samples/s (after a warm-up epoch that compiles). Needs only keras, numpy and the backend (no
TensorFlow, Prefect or pyarrow):

    KERAS_BACKEND=jax python bench/backend_check.py [ROWS]     # 200,000 rows unless given (fewer on a CPU)
"""
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
out = {"python": sys.version.split()[0]}  # printed as one JSON line
try:
    import jax
    import keras
    import numpy as np
except ImportError as error:  # what the machine lacks
    print(json.dumps({**out, "error": repr(error)}))
    sys.exit(0)

from tasks.batches import DeviceSplits, SplitBatches  # noqa: E402
from tasks.models import build_one_layer_cnn, make_optimizer  # noqa: E402

out.update(keras=keras.__version__, backend=keras.backend.backend(), devices=[str(d) for d in jax.devices()])
rng = np.random.default_rng(0)
rows = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
labels = rng.integers(0, 10, rows)
images = rng.integers(0, 40, (rows, 28, 28), dtype=np.uint8)
for i, label in enumerate(labels[:rows]):
    images[i, 2 + (label // 5) * 12 : 14 + (label // 5) * 12, 1 + (label % 5) * 5 : 7 + (label % 5) * 5] = 200
train = SplitBatches(images, labels, batch_size=128, classes=10, normalisation=(127.5, 255.0), shuffle_seed=133)
feed = train.keras_input()
t = time.perf_counter()
for i in range(len(train)):
    feed[i]
out["input_alone_samples_per_second"] = round(rows / (time.perf_counter() - t))
device = DeviceSplits({"train": train})
variants = [("pydataset", spe, lambda model: model, feed) for spe in (1, 16)]
variants += [("device", spe, device.model, device.keras_input("train")) for spe in (16, 64)]
for name, spe, fed, data in variants:
    keras.utils.set_random_seed(133)
    model = fed(build_one_layer_cnn())
    model.compile(optimizer=make_optimizer("adadelta", 1.0), loss="categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=spe)
    model.fit(data, epochs=1, verbose=0)  # compile and warm up
    t = time.perf_counter()
    history = model.fit(data, epochs=1, verbose=0)
    out[f"{name}_spe{spe}_samples_per_second"] = round(rows / (time.perf_counter() - t))
    out[f"{name}_spe{spe}_accuracy"] = round(float(history.history["accuracy"][-1]), 4)
print(json.dumps(out))
