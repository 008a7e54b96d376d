"""Symbolic derivations: pure functions that return SymPy objects (no printing, no I/O)."""
