"""The presets shipped with imram-dist (``--config NAME``); installed as ``imram_dist.presets``."""
