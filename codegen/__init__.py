"""Turns derivations into code: lowering index notation to arrays, printing, rendering, writing."""
