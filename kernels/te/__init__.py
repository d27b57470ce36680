"""Transformer Engine: whether it is here and what it supports (``availability``), and the
recipe ladder (``recipes``).
"""
