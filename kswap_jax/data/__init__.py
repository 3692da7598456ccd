"""Data: the embedded digits dataset, TFDS / folder sources and the input pipeline."""
