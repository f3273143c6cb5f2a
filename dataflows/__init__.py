"""Bytewax dataflows: streaming blocks, user sequences (thin flows over features/)."""
