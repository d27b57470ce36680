"""Models that exercise the KV cache end to end: the tiny gpt-oss-style LM and the TE attention
block.
"""
