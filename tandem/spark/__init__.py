"""Spark-only helpers (session, readers, schema-derived validation); only jobs import this."""
