"""Small shared test helpers (style guide 4.9: a few focused helpers, no god class)."""

import numpy as np
import tensorflow as tf


def run_both(fn, data):
    """Runs ``fn`` eagerly and inside ``tf.data.Dataset.map``.

    Returns:
      ``(eager, in_dataset)``: the two results as dicts of numpy arrays.
    """
    tensors = {k: tf.convert_to_tensor(v) for k, v in data.items()}
    eager = fn(tensors)
    (in_dataset,) = list(tf.data.Dataset.from_tensors(tensors).map(fn))
    return (
        {k: np.asarray(v) for k, v in eager.items()},
        {k: np.asarray(v) for k, v in in_dataset.items()},
    )


def run_pipeline(pipeline, data):
    """Builds the pp string ``pipeline`` and runs it with :func:`run_both`."""
    from revisit_tf.pp import get_preprocess_fn

    return run_both(get_preprocess_fn(pipeline, log_data=False), data)
