"""MoE kernels: router, dropless routing, permute/unpermute, grouped GEMM.

Each op has a plain-PyTorch reference twin (also the CPU path) and a Triton path (CUDA, and the
interpreter in tests). `kernels.moe.moe_experts` is the one dispatch point the model calls.
"""
