"""MoE kernels: router, dropless routing, permute/unpermute, grouped GEMM.

Each op has a plain-PyTorch reference twin (also the CPU path) and a Triton path (CUDA, and the
interpreter in tests). `kernels.moe.moe_experts` is the one dispatch point the model calls.
"""

import os as _os

# Triton 3.9 warns when this is unset; pin today's default (fused multiply-add on) so results do not
# change silently when Triton 3.10 flips it. Set before any submodule imports triton.
_os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
