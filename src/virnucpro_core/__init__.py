"""virnucpro_core: packed ESM-2 protein embeddings, numerically equal to the unpacked model."""

__version__ = "0.1.0"
