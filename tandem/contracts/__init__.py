"""Python code generated from ``schemas/*.proto`` by ``make proto``; never edit by hand.

Imports: grpc and protobuf only (the generated stubs).
"""
