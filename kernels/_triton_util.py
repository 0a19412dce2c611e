"""Small shared helpers for the Triton kernels: launch plans and the ahead-of-time compile used by tests.

Every Triton op builds a `Launch` (kernel, grid, positional args, constexprs, num_warps/num_stages) and
runs it through `Launch.run()`. `record_launches(cc)` makes `run()` append the plan to a list instead of
launching it, with every plan sized for GPU `cc` (the tile tables' `config_for` functions read `target_cc`):
kernels/aot.py runs the real training ops (forward + backward) on CPU tensors under it, so what the cubin
tests compile for sm_80 / sm_90 is exactly the set of launches, configurations and argument dtypes a
training step makes. Nothing is computed while recording; outputs hold garbage and are never read.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
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


_recording: list | None = None  # set by record_launches
_record_cc = 0


def target_cc(device: torch.device) -> int:
    """The architecture the plans are sized for: the recording target, else the device's own."""
    return _record_cc if _recording is not None else device_cc(device)


def plans_for_gpu(device: torch.device) -> bool:
    """True when launches are planned as on a GPU (no host syncs to size grids): on CUDA and while recording."""
    return device.type == "cuda" or _recording is not None


@contextlib.contextmanager
def record_launches(cc: int):
    """Collect (not run) every Launch made inside, planned for compute capability `cc`."""
    global _recording, _record_cc
    if _recording is not None:
        raise RuntimeError("record_launches does not nest")
    _recording, _record_cc = [], cc
    try:
        yield _recording
    finally:
        _recording, _record_cc = None, 0


def pick_block(n: int, candidates=(128, 64, 32), max_waste: float = 0.125) -> int:
    """The largest power-of-two block (from `candidates`, largest first) whose padding of `n` wastes at most
    `max_waste` of the padded extent; else the one that wastes least. E.g. n=160: 128 pads to 256 and 64 to
    192 (17% masked), 32 tiles it exactly -> 32; n=192 -> 64; n=320 -> 64; n=384, 1280 -> 128."""
    best = None
    for b in candidates:
        padded = cdiv(n, b) * b
        waste = (padded - n) / padded
        if waste <= max_waste:
            return b
        if best is None or waste < best[0]:
            best = (waste, b)
    return best[1]


@dataclass
class Launch:
    kernel: object  # a @triton.jit function
    grid: tuple
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""  # what this launch is for (printed by kernels.aot)

    def run(self) -> None:
        if _recording is not None:
            _recording.append(self)
            return
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


def variant_key(launch: Launch, cc: int):
    """Identity of the compiled binary: two launches with the same key run the same cubin."""
    sig, consts, attrs = launch.specialization()
    return (launch.kernel.__name__, cc, tuple(sorted(sig.items())), tuple(sorted(consts.items())),
            tuple(sorted((k, tuple(map(tuple, v))) for k, v in attrs.items())), launch.num_warps, launch.num_stages)


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_RES_REGS = re.compile(r"REG:(\d+)")


def resource_usage(ck, cc: int) -> dict:
    """Registers and spills of a compiled kernel, without a GPU.

    Triton 3.9 fills `CompiledKernel.n_regs` / `n_spills` only when it loads the cubin on a device
    (`_init_handles` -> driver.load_binary), and deletes its ptxas log. So: registers are read from the cubin
    itself (`cuobjdump -res-usage`, REG:), and spills from `ptxas -v` re-run on the kernel's PTX with the
    flags triton's make_cubin uses; the two register counts must agree (checked by the caller's tests)."""
    from triton import knobs  # noqa: PLC0415
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        fmad = [] if ck.metadata.enable_fp_fusion else ["--fmad=false"]
        log = subprocess.run([get_ptxas(cc).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(cc)}", ptx, "-o", os.path.join(d, "re.o")],
                             check=True, capture_output=True, text=True).stderr
        res = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", cubin], check=True, capture_output=True,
                             text=True).stdout
    spill = _PTXAS_SPILL.search(log)
    regs_ptxas, regs_cubin = _PTXAS_REGS.search(log), _RES_REGS.search(res)
    if not (spill and regs_ptxas and regs_cubin):
        raise RuntimeError(f"could not parse ptxas -v / cuobjdump output:\n{log}\n{res}")
    return dict(regs=int(regs_cubin.group(1)), regs_ptxas=int(regs_ptxas.group(1)),
                spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)))
