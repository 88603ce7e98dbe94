"""The tutorial's Keras/TensorFlow training of its CNN, timed per epoch; run by `cellcls.bench`.

    python keras_peer.py --images X.npy --labels Y.npy --batch-size 16 --epochs 3 --threads 2

`X.npy` holds uint8 images (N, H, W, 3), `Y.npy` their int64 labels. The images are scaled to
[0, 1] once, in memory, as the tutorial does. The last line of stdout is one JSON object:
`{"img_s": [per epoch], "tensorflow": ..., "keras": ...}`, or `{"skipped": why}` when this
Python has no TensorFlow. Only numpy and TensorFlow are imported (no cellcls, no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0: TensorFlow's choice")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        import numpy as np
        import tensorflow as tf
        from tensorflow import keras
    except ImportError as err:
        print(json.dumps({"skipped": f"{err} (in this Python)"}))
        return
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    x = np.load(args.images).astype(np.float32) / 255.0
    y = np.load(args.labels)
    # The tutorial's network, with the Flatten it forgot: 10,250,788 parameters at 200x200x3.
    model = keras.Sequential(
        [
            keras.Input(x.shape[1:]),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(args.classes),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    times: list[float] = []

    class EpochTime(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            times.append(time.perf_counter() - self.start)

    model.fit(
        x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0, callbacks=[EpochTime()]
    )
    print(
        json.dumps(
            {
                "img_s": [len(x) / t for t in times],
                "params": model.count_params(),
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "jit_compile": bool(model.jit_compile),
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
