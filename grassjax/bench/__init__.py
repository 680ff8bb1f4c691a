"""Benchmarks: scaling of the mixers and LM train steps, and streaming generation."""
