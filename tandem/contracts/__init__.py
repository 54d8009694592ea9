"""Python code generated from ``schemas/*.proto`` by ``make proto``; never edit by hand."""
