"""kswap_jax: forget, retain and learn classes in pretrained vision transformers with JAX."""
__version__ = "0.1.0"
