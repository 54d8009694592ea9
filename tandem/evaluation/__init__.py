"""Offline evaluation: the protocol (temporal holdout, retrieval sources, two-stage ranking), the
metrics, the re-ranking sweep, the Optuna studies that choose hyper-parameters (``tuning``) and
the night's bundle as retrieval sources.

May import: the foundation (``tandem.config``, ``schema``, ``validation``, ``security``),
``tandem.data``, ``tandem.features``, ``tandem.models`` and ``tandem.policy``.
"""
