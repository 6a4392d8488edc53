"""Benchmarks that write JSON and print a table; speed is never asserted in tests."""
