"""Input data: grain over TFDS array_record or image folders, tf.data over TFDS TFRecord,
per-example transforms shared by all, the embedded offline set."""

from crate_jax.data.embedded import ensure_built
from crate_jax.data.pipeline import BACKENDS, first_images, make_iterator, num_examples
from crate_jax.data.transforms import TRANSFORM_OPTIONS, TRANSFORMS, get_transform

__all__ = [
    "BACKENDS",
    "TRANSFORM_OPTIONS",
    "TRANSFORMS",
    "ensure_built",
    "first_images",
    "get_transform",
    "make_iterator",
    "num_examples",
]
