"""The search spaces shipped with imram-dist (``--space NAME``); installed as ``imram_dist.spaces``."""
