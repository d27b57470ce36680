"""Project-wide test setup.

Triton picks between compiling and interpreting when a kernel is decorated, so the
choice has to be made before any kernel module is imported: with no CUDA GPU the
kernels run in Triton's CPU interpreter (small shapes only).
"""

import os

try:
    import torch
except ImportError:  # the plugin's own tests run without torch
    torch = None

if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
