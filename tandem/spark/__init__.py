"""Spark-only helpers (session builder, readers, schema-derived validation). Only jobs import this."""
