"""DeepSeek latent KV caches: the three byte layouts (``layouts``), kv_norm + GPT-J RoPE
(``norm_rope``), the fused norm + RoPE + FP8 quantise + paged write kernel (``write``), the
gather / dequantise kernel (``gather``) and the slot mappings of ragged batches, strided
compressed caches and sliding windows (``paging``). Each kernel has its torch reference
beside it, written from the layout's description, not from the kernel.
"""
