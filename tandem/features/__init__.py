"""Features, one definition for training and serving: the entity features and their transforms
(``entity``), the Feast repo and online fast path (``feature_store``), the ranker's per-candidate
matrix (``ranking_features``), the towers' dense inputs (``tower_features``), the query history
and the serve-time feature log.

May import: the foundation (``tandem.config``, ``schema``, ``validation``, ``security``) and
``tandem.data``.
"""
