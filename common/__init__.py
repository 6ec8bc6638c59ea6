"""The small shared core: losses, metrics, checkpointing, config, seeding, logging, distributed helpers.

`common` imports no package of this repository; every package imports it.
"""

__version__ = "0.1.0"
