"""pytest-kvperf: correctness and speed regression tests for LLM KV-cache GPU kernels.

``__all__`` is what suites and scripts may import; the rest of the package is the
plugin's own and may change. The fixtures (``kvperf``, ``kv_bench``) need no import.
"""

from .accuracy import error_metrics
from .metric import Metric, Spread
from .peaks import Peaks, get_peaks
from .timing import Timing, measure
from .verdict import Verdict, speed_verdict

__all__ = [
    "Metric",
    "Peaks",
    "Spread",
    "Timing",
    "Verdict",
    "error_metrics",
    "get_peaks",
    "measure",
    "speed_verdict",
]

__version__ = "0.1.0"
