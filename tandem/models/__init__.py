"""Models and their bundle: ALS, ANN indexes, the two-tower (training, exported user tower and
its inputs), the session sequence model, the LightGBM ranker, the bundle format, a synthetic
bundle at any scale and training-run tracking.

May import: the foundation (``tandem.config``, ``schema``, ``validation``, ``security``),
``tandem.data`` and ``tandem.features``.
"""
