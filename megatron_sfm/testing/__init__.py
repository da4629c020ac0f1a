"""Helpers for tests of parallel code: run a function in N gloo processes."""
