"""imram-dist: train and compare IMRAM image-text retrieval models at scale."""

__version__ = "0.1.0"
