"""MLflow tracking for training runs and searches: the store, a buffered writer that survives
server outages, the pyfunc model, the registry's champion rule and training-curve plots.
Called by imram_dist.train and imram_dist.tune; nothing in imram_dist.model imports it."""

from imram_dist.tracking.store import TrackingError, connect, ui_command

__all__ = ["TrackingError", "connect", "ui_command"]
