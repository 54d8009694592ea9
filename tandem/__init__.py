"""Tandem: shared, light code used by jobs, serving, DAGs and benchmarks.

Only third-party imports are allowed here (never jobs, serving, dags); Spark-only helpers live in
``tandem.spark`` and are imported by jobs alone.
"""

__version__ = "0.1.0"
