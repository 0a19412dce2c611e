"""Small shared helpers for the Triton kernels: launch plans and the ahead-of-time compile used by tests.

Every Triton op builds a `Launch` (kernel, grid, positional args, constexprs, num_warps/num_stages) and
runs it through `Launch.run()`. The cubin compile tests call the same planning functions and hand the
plan to `compile_launch`, so what is compiled for sm_80 / sm_90 is exactly the launch configuration and
argument dtypes the op uses at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def device_cc(device: torch.device) -> int:
    """Compute capability as 80 / 90 / ...; 0 for the CPU interpreter."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 0


@dataclass
class Launch:
    kernel: object  # a @triton.jit function
    grid: tuple
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def run(self) -> None:
        if interpreting():  # the interpreter ignores warps/stages; passing them is harmless but noisy
            self.kernel[self.grid](*self.args, **self.constexprs)
        else:
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                                   num_stages=self.num_stages)

    def specialization(self):
        """(signature, constexprs, attrs) for `ASTSource`, specialised the way triton's JIT launcher does it:
        an int equal to 1 becomes a constexpr, ints divisible by 16 and 16-byte aligned pointers get
        tt.divisibility=16 (this decides vectorised / cp.async loads, so the AOT compile must match)."""
        from triton._C.libtriton import native_specialize_impl  # noqa: PLC0415
        from triton.backends.compiler import BaseBackend  # noqa: PLC0415

        names = self.kernel.arg_names
        sig, consts, attrs = {}, dict(self.constexprs), {}
        for i, (name, a) in enumerate(zip(names, self.args)):
            if not isinstance(a, (torch.Tensor, int, float)):
                raise TypeError(f"unsupported launch argument {name}={type(a).__name__}")
            ty, spec = native_specialize_impl(BaseBackend, a, False, True, True)
            if ty == "constexpr":
                sig[name] = "constexpr"
                consts[name] = spec
                continue
            sig[name] = ty
            if spec:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
        for name in names[len(self.args):]:
            if name not in self.constexprs:
                raise TypeError(f"kernel {self.kernel.__name__}: argument {name} has no value in the launch plan")
            sig[name] = "constexpr"
        return sig, consts, attrs


def compile_launch(launch: Launch, cc: int):
    """Compile a launch plan to cubin for GPUTarget('cuda', cc, 32) without a GPU; returns the CompiledKernel."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    sig, consts, attrs = launch.specialization()
    src = ASTSource(fn=launch.kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
