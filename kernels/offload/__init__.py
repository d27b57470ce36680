"""KV offload: host memory on a NUMA node (numa), slabs and their checks (transfer),
overlapped swaps (swap), a paged cache with host and file tiers (paged_offload), small-page
copies (page_copy) and KV pages between two devices (peer_transfer)."""
