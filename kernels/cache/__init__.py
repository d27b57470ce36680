"""KV-cache storage: the paged layout (``paged_kv``) and the exact bytes of each format
(``kv_memory``).
"""
