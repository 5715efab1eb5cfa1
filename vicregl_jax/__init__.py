"""vicregl_jax: VICRegL (Bardes, Ponce, LeCun 2022) in JAX/Flax."""

__version__ = "0.1.0"
