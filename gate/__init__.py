"""moegate: LoRA-aware Mixture-of-Experts router gates, gpt-oss first.

``gate.GateLinear`` is the router layer; ``gate.ops`` is the ops layer over the CUDA kernels.
"""

from gate import ops
from gate.layer import GateLinear

__all__ = ["GateLinear", "ops"]
__version__ = "0.1.0"
