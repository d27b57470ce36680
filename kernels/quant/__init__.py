"""KV-cache quantisers: FP8 E4M3 (per tensor, token, 1xB block), MXFP8 and NVFP4, each with its
torch reference.
"""
