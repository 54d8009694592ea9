"""Data sources and the lake: the in-memory :class:`~tandem.data.dataset.Dataset`, MovieLens
loaders, the synthetic world, the landing area, the lake as pyarrow reads it, the bundle's catalog
order, the item-event columns and the impression-sink hook.

May import: the top-level foundation (``tandem.config``, ``schema``, ``validation``,
``security``) and third-party packages.
"""
