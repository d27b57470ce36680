"""Bit-level rules of the low-precision formats (``codecs``) and the quantisers' input contract
(``checks``).
"""
