"""Offline evaluation and model selection: the protocol (``protocol``: rules and split;
``sources``, ``point_in_time``, ``requests``; ``offline``: the run), the metrics, the re-ranking
sweep, the Optuna studies that choose hyper-parameters (``tuning``) and the night's bundle as
retrieval sources (``night``).

May import: the foundation (``tandem.config``, ``schema``, ``validation``, ``security``),
``tandem.data``, ``tandem.features``, ``tandem.models`` and ``tandem.policy``.
"""
