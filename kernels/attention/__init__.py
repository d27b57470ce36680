"""Attention over the KV cache: the paged decode kernel beside its float64 reference, and
compressed-cache attention.
"""
