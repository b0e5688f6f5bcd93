"""Benchmarks (``mmtok bench ...``): measured, written as JSON and a table, never asserted in tests."""
