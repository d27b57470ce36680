"""KV offload: host memory on a NUMA node (numa), slabs and their checks (transfer),
overlapped swaps (swap) and a paged cache with host and file tiers (paged_offload)."""
