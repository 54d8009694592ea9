"""Serving policies as pure functions: merging retrieval sources, MMR diversification,
exploration for the cold-start feed (with propensities) and deterministic A/B assignment.

May import: the foundation (``tandem.config``, ``schema``, ``validation``, ``security``) only.
"""
