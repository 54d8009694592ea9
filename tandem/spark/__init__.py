"""Spark-only helpers (session, readers, schema-derived validation); only jobs import this.

May import: the foundation (``tandem.config``, ``schema``, ``validation``, ``security``) and
``tandem.ops`` (the jobs' shared command line).
"""
