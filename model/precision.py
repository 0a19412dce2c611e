"""The one precision policy of training and evaluation (single device and FSDP2 alike).

    policy          compute (matmul operands)   master weights / optimizer   grad reduction   router
    "fp32"          fp32                        fp32                         fp32             fp32
    "bf16"          bf16                        fp32                         fp32             fp32

`policy_for(device)` picks "bf16" on CUDA (tensor cores: the Triton grouped GEMM sends bf16 operands to
tl.dot / wgmma, cuBLAS and flash-attn get bf16) and "fp32" on CPU; `policy_for(device, "bf16")` on CPU is
the "cpu-bf16" twin of the CUDA policy that the CPU tests train under.

The model applies the policy explicitly (`MobileMoE.set_precision`), not through torch.autocast: autocast
does not reach inside custom autograd Functions (the grouped GEMM, the row gathers) and it would put the
router's F.linear in bf16, the opposite of what the router needs. Under the policy:
  * every matmul casts its operands to compute_dtype (attention q/k/v/o projections, dense and shared
    SwiGLU, routed experts x / w13 / w2 entering kernels.moe.moe_experts, the LM head); the kernels
    accumulate in fp32 (Triton: fp32 tl.dot accumulator; CPU reference: torch.mm on bf16, which
    accumulates in fp32 and rounds the output to bf16 once);
  * the residual stream, RMSNorm and RoPE arithmetic stay fp32, as do the router's logits, scores,
    top-k, gates, the auxiliary losses and the gradients of all of them;
  * parameters (the master weights), their gradients and AdamW's state stay param_dtype (fp32); the
    bf16 weight copies exist only inside the forward/backward.
Under FSDP2 the same policy becomes MixedPrecisionPolicy(param_dtype=compute_dtype,
reduce_dtype=reduce_dtype): blocks are all-gathered in bf16 and gradients reduce-scattered in fp32, while
the router and the RMSNorm gains are sharded in their own fp32 groups (train/parallel.py: shard_model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("mobilemoe.precision")
_logged: set = set()


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    compute_dtype: torch.dtype  # matmul operands (fp32 accumulation inside every kernel)
    param_dtype: torch.dtype = torch.float32  # master weights, their grads, optimizer state, residual stream
    reduce_dtype: torch.dtype = torch.float32  # gradient reduce-scatter / all-reduce across ranks
    router_dtype: torch.dtype = torch.float32  # router logits / scores / gates and their grads

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != self.param_dtype

    def describe(self) -> str:
        n = lambda d: str(d).removeprefix("torch.")
        return (f"{self.name} (compute {n(self.compute_dtype)}, params/optimizer {n(self.param_dtype)}, "
                f"grad reduce {n(self.reduce_dtype)}, router {n(self.router_dtype)})")

    def fsdp_mp_policy(self):
        """FSDP2 policy for the blocks: all-gather in compute dtype, reduce in reduce_dtype. Forward inputs
        are not cast, so the residual stream keeps param_dtype exactly as on one device."""
        from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: PLC0415

        return MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=self.reduce_dtype,
                                    cast_forward_inputs=False)

    def fsdp_fp32_policy(self):
        """FSDP2 policy for the router and norm gains: they are used in router_dtype / fp32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: PLC0415

        return MixedPrecisionPolicy(param_dtype=self.router_dtype, reduce_dtype=self.reduce_dtype,
                                    cast_forward_inputs=False)


FP32 = PrecisionPolicy("fp32", compute_dtype=torch.float32)
BF16 = PrecisionPolicy("bf16", compute_dtype=torch.bfloat16)
POLICIES = {"fp32": FP32, "bf16": BF16}


def policy_for(device: torch.device | str, name: str = "auto") -> PrecisionPolicy:
    """name: "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16". Logged once per (policy, device)."""
    device = torch.device(device)
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in POLICIES:
        raise ValueError(f"unknown precision policy {name!r}: auto|fp32|bf16")
    pol = POLICIES[name]
    key = (pol.name, device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("precision policy: %s on %s", pol.describe(), device.type)
    return pol
