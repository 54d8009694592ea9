"""Tandem's gRPC serving process: ``python -m serving.server`` (see serving/server.py)."""
