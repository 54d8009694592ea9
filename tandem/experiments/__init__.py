"""Experiments and safe releases: definitions, statistics, off-policy evaluation, canary ramps,
shadow comparison and the closed-loop rehearsal (issue 15). Pure Python + numpy/scipy; the Spark
job that feeds the statistics is ``jobs/experiment_report.py``.

May import: the foundation (``tandem.config``, ``schema``, ``validation``, ``security``),
``tandem.contracts``, ``data``, ``models``, ``ops``, ``policy`` and ``streaming``.
"""
