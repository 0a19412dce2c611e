"""The single MoE dispatch point: routed SwiGLU experts over dropless routing.

backend: "auto" (Triton on CUDA, reference on CPU), "triton", "reference", "cpu", "megablocks" (optional CUDA extra).
"cpu" is kernels/moe_cpu.py, a one-node CPU path tested against the reference; opt-in (see resolve_backend).
The choice is logged once per (requested, resolved, device) triple.
Under torch.compile the routed experts are one custom op, mobilemoe::moe_experts (bottom of this file).
"""

from __future__ import annotations

import importlib
import logging
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.moe_cpu import moe_experts_cpu

log = logging.getLogger("mobilemoe.kernels")
_logged: set = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        # CPU stays on the reference: kernels/moe_cpu.py ("cpu") measured no faster at the tiny and sweep shapes
        # (bench/results/kernels.md, "CPU training path"), so it is opt-in, not the automatic choice
        resolved = "triton" if device.type == "cuda" else "reference"
    elif backend in ("reference", "triton", "cpu"):
        resolved = backend
    elif backend == "megablocks":
        from kernels.megablocks_adapter import require_megablocks  # noqa: PLC0415

        require_megablocks(device)  # the adapter's own check: CUDA device, megablocks + grouped_gemm importable
        resolved = "megablocks"
    else:
        raise ValueError(f"unknown moe backend {backend!r}: auto|triton|reference|cpu|megablocks")
    key = (backend, resolved, device.type)
    # dynamo cannot trace a Logger call (a graph break in every compiled MoE block): a compiled model's first
    # eager call (evaluation, generation) logs the choice instead
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        log.info("MoE backend: %s (requested %s, device %s)", resolved, backend, device.type)
    return resolved


def _select_rows(x, idx, pad: bool):
    """x[idx]; with pad, idx == len(x) selects a zero row (padding slots)."""
    if pad:
        x = torch.cat([x, x.new_zeros(1, x.shape[1])], 0)
    return x.index_select(0, idx)


class _RowGather(torch.autograd.Function):
    """out = x[idx] (idx == len(x) -> zero row when pad_fwd), with a gather-based backward
    dx[t] = sum_{j<k} dout[inv[t*k + j]] (j in slot order; inv == len(out) -> zero when pad_bwd).

    Autograd's default backward for x[idx] is a scatter-add (index_put_ with accumulate): slow on CPU and
    summed in an unspecified order. Every row index here is a permutation of the token-slots (plus padding),
    so its inverse turns the backward into a gather + a fixed-order sum over the k slots: deterministic, and
    the PyTorch twin of the Triton combine kernel."""

    @staticmethod
    def forward(ctx, x, idx, inv, k: int, pad_fwd: bool, pad_bwd: bool):
        ctx.save_for_backward(inv)
        ctx.k, ctx.n, ctx.pad_bwd = k, x.shape[0], pad_bwd
        return _select_rows(x, idx, pad_fwd)

    @staticmethod
    def backward(ctx, dout):
        (inv,) = ctx.saved_tensors
        d = _select_rows(dout, inv, ctx.pad_bwd)
        return (d.view(ctx.n, ctx.k, d.shape[-1]).sum(1) if ctx.k > 1 else d), None, None, None, None, None


def _gather_rows(x, idx, inv, k: int = 1, pad_fwd: bool = False, pad_bwd: bool = False):
    return _RowGather.apply(x, idx, inv, k, pad_fwd, pad_bwd)


def moe_experts_reference(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                          w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                          act_fq: Callable | None = None, method: str = "auto") -> torch.Tensor:
    """Dropless routed SwiGLU experts in plain PyTorch (the CPU path).

    x_TD (T, D); ids_TK, gates_TK (T, K); w_gate_up_EFD (E, 2F, D) = [gate; up] rows; w_down_EDF (E, D, F).
    Token-slots are ordered by expert (stable sort); each expert multiplies its rows; each token's K slots are
    weighted and summed back in slot order. Deterministic: no atomics / index_add in forward or backward.
    act_fq: optional per-row activation fake-quant applied to the down projection's input (QAT); the caller
    applies it to x_TD itself. Zero padding rows stay zero under a per-row quantiser.
    method (bench/results/kernels.md compares them on CPU, forward + backward, 1 thread):
      "slices"  one torch.mm per non-empty expert on its contiguous rows, with a hand-written backward
                (_SlicedGemm): no padding, no per-expert zero gradients. "auto" uses it.
      "grouped_mm"  torch._grouped_mm: on CPU ahead of slices in 16 of 24 measured rows, by at most 1.25x;
                not the default because it needs 16-byte row strides and its autograd backward rejects
                expanded (stride-0) gradients (e.g. y.sum().backward()).
      "padded"  rows scattered into an (E, C, D) buffer, C = max rows per expert, two torch.bmm calls per
                pass: slowest of the three (pays for the padding; E x C memory on an unbalanced router).
    """
    T, K = ids_TK.shape
    E = w_gate_up_EFD.shape[0]
    S = T * K
    flat_S = ids_TK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    inv_S = torch.empty_like(order_S)
    inv_S[order_S] = torch.arange(S, device=order_S.device)
    counts_E = torch.bincount(flat_S, minlength=E)
    D_out = w_down_EDF.shape[1]  # explicit sizes everywhere: with T = 0 a -1 in a reshape is ambiguous
    if method == "auto" or S == 0:
        method = "slices"
    if method == "padded":
        C = int(counts_E.max()) if S else 0
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        e_S = flat_S[order_S]  # expert of each sorted row
        pad_of_sorted = e_S * C + (torch.arange(S, device=flat_S.device) - starts_E[e_S])
        pad_of_slot = pad_of_sorted[inv_S]  # token-slot -> padded row
        slot_of_pad = torch.full((E * C,), S, dtype=torch.long, device=flat_S.device)  # S = padding
        slot_of_pad[pad_of_slot] = torch.arange(S, device=flat_S.device)
        tok_of_pad = torch.where(slot_of_pad < S, slot_of_pad // K, T)  # T = the zero row
        x_ECD = _gather_rows(x_TD, tok_of_pad, pad_of_slot, K, pad_fwd=True).view(E, C, x_TD.shape[1])
        g_ECF, u_ECF = torch.bmm(x_ECD, w_gate_up_EFD.transpose(1, 2)).chunk(2, dim=-1)
        h_ECF = F.silu(g_ECF) * u_ECF
        if act_fq is not None:
            h_ECF = act_fq(h_ECF.reshape(E * C, h_ECF.shape[-1])).view(E, C, h_ECF.shape[-1])
        y_ECD = torch.bmm(h_ECF, w_down_EDF.transpose(1, 2))
        y_SD = _gather_rows(y_ECD.reshape(E * C, D_out), pad_of_slot, slot_of_pad, 1, pad_bwd=True)  # slot order
    elif method in ("slices", "grouped_mm"):
        x_sorted = _gather_rows(x_TD, order_S // K, inv_S, K)
        if method == "grouped_mm":
            offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
            gemm = lambda a, w: torch._grouped_mm(a, w.transpose(1, 2), offs=offs_E)
        else:
            bounds = torch.cumsum(counts_E, 0).tolist()
            gemm = lambda a, w: _slices_gemm(a, w, bounds)
        g_SF, u_SF = gemm(x_sorted, w_gate_up_EFD).chunk(2, dim=-1)
        h_SF = F.silu(g_SF) * u_SF
        if act_fq is not None:
            h_SF = act_fq(h_SF)
        # Router weights scale the down projection's *input* rows (F wide) instead of its output (D wide):
        # W2 (g h) = g (W2 h), and with fine-grained experts F << D, so the (S, D) multiply disappears.
        # Gates keep their dtype (fp32 from the router): with bf16 rows the product is formed in fp32 and rounded
        # to bf16 once, and the gate gradient is reduced in fp32 (model/precision.py).
        g_S1 = _gather_rows(gates_TK.reshape(-1, 1), order_S, inv_S)
        hg_SF = h_SF * g_S1 if g_S1.dtype == h_SF.dtype else (h_SF.float() * g_S1.float()).to(h_SF.dtype)
        y_SD = _gather_rows(gemm(hg_SF, w_down_EDF), inv_S, order_S)  # back to slot order
        return y_SD.view(T, K, D_out).sum(dim=1)
    else:
        raise ValueError(f"moe_experts_reference: method must be auto|padded|slices|grouped_mm, got {method!r}")
    y_SD = y_SD * gates_TK.reshape(-1, 1).to(y_SD.dtype)
    return y_SD.view(T, K, D_out).sum(dim=1)


class _SlicedGemm(torch.autograd.Function):
    """Y = X_e @ W_e^T on each expert's contiguous rows, one torch.mm per non-empty expert, written in place.

    A hand-written backward (dX_e = dY_e @ W_e, dW_e = dY_e^T @ X_e into one (E, N, Kd) buffer): autograd's own
    backward of w[e] slicing would materialise a full-size zero gradient per expert (O(E^2) memory traffic)."""

    @staticmethod
    def forward(ctx, x_SK, w_ENK, bounds: list[int]):
        ctx.save_for_backward(x_SK, w_ENK)
        ctx.bounds = bounds
        y = x_SK.new_empty(x_SK.shape[0], w_ENK.shape[1])
        a = 0
        for e, b in enumerate(bounds):
            if b > a:
                torch.mm(x_SK[a:b], w_ENK[e].t(), out=y[a:b])
            a = b
        return y

    @staticmethod
    def backward(ctx, dy_SN):
        x_SK, w_ENK = ctx.saved_tensors
        dy_SN = dy_SN.contiguous()
        dx = torch.empty_like(x_SK) if ctx.needs_input_grad[0] else None  # every row belongs to one expert
        dw = torch.empty_like(w_ENK) if ctx.needs_input_grad[1] else None
        a = 0
        for e, b in enumerate(ctx.bounds):
            if b > a:
                if dx is not None:
                    torch.mm(dy_SN[a:b], w_ENK[e], out=dx[a:b])
                if dw is not None:
                    torch.mm(dy_SN[a:b].t(), x_SK[a:b], out=dw[e])
            elif dw is not None:
                dw[e].zero_()  # an expert with no rows gets an exact zero gradient
            a = b
        return dx, dw, None


def _slices_gemm(x_SD, w_ENK, bounds: list[int]):
    return _SlicedGemm.apply(x_SD, w_ENK, bounds)


def dispatch_experts(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, resolved: str,
                     act_fq: Callable | None = None) -> torch.Tensor:
    """The routed experts on an already resolved backend, eagerly (autograd through the backend's own pieces)."""
    if resolved == "reference":
        return moe_experts_reference(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, act_fq)
    if resolved == "cpu":
        return moe_experts_cpu(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, act_fq)
    if resolved == "triton":
        from kernels.moe_triton import moe_experts_triton  # noqa: PLC0415  (imports triton)

        return moe_experts_triton(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, act_fq)
    from kernels.megablocks_adapter import moe_experts_megablocks  # noqa: PLC0415

    return moe_experts_megablocks(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, act_fq)


def moe_experts(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend: str = "auto",
                act_fq: Callable | None = None) -> torch.Tensor:
    """Routed experts. Under torch.compile every backend runs through the custom op mobilemoe::moe_experts
    (below: one opaque node, backward by recompute); eager calls run the backend directly."""
    resolved = resolve_backend(backend, x_TD.device)
    if torch.compiler.is_compiling():
        act_name = act_fq_name(act_fq)
        if act_name is not None:
            return moe_experts_op(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, resolved, act_name)
    return dispatch_experts(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, resolved, act_fq)


# ---- torch.compile: the routed experts as one torch.library custom op, so a compiled MoE block has no graph
# break ---------------------------------------------------------------------------------------------------------
#     mobilemoe::moe_experts(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend, act_fq) -> y_TD
#     mobilemoe::moe_experts_backward(dy_TD, <the same inputs>) -> (dx_TD, dgates_TK, dw_gate_up_EFD, dw_down_EDF)
#
# Why an opaque op: both backends are data-dependent inside (a sort by expert id, per-expert row counts read on
# the host, Triton launches whose grids depend on them), which dynamo can only trace by breaking the graph or
# specialising on the counts. The op hides all of that behind a fake implementation whose output shapes depend
# on the input shapes alone: y is (T, D) in x's dtype.
#
# Backward = recompute. The forward op runs the dispatch without building an autograd graph; the backward op
# runs it again with grad enabled and calls torch.autograd.grad, so the gradients are exactly those of the
# existing backward (the reference's _RowGather/_SlicedGemm, the Triton autograd.Functions) with no second
# derivation to keep in step. The price is one extra forward of the routed experts per step (2 of the step's 6
# expert GEMMs); the saving is that no (S, 2F) / (S, D) activations are held between forward and backward (the
# routed experts are checkpointed). kernels.moe.moe_experts therefore uses the op only while torch.compile is
# tracing; eager calls keep the direct path and its saved activations.
#
# act_fq (the QAT activation fake-quant) cannot cross the op boundary as a callable; it travels as
# "module:name" and is imported back inside the op. A callable without such a name (a lambda, a closure)
# makes moe_experts fall back to the direct path, i.e. a graph break at the MoE block.

_C = torch._C
_AUTOGRAD_KEYS = (_C.DispatchKey.AutogradFunctionality, _C.DispatchKey.AutogradOther,
                  _C.DispatchKey.AutogradNestedTensor, _C.DispatchKey.ADInplaceOrView)
_fn_cache: dict[str, Callable] = {}


def act_fq_name(fn: Callable | None) -> str | None:
    """'' for no fake-quant, 'module:name' when that path imports back to fn itself, else None."""
    if fn is None:
        return ""
    if not isinstance(fn, types.FunctionType):  # a partial, a callable object: no importable name
        return None
    # __name__, not __qualname__: under dynamo (2.13) a traced function argument's __qualname__ reads as the
    # getset descriptor. So only module-level functions qualify; eagerly that is checked by importing the name
    # back, while tracing (dynamo cannot run importlib) it is trusted and the op imports it when it runs.
    name = fn.__module__ + ":" + fn.__name__
    if "<" in name:  # <lambda>: not importable
        return None
    if torch.compiler.is_compiling():
        return name
    try:
        return name if _resolve(name) is fn else None
    except (ImportError, AttributeError):
        return None


def _resolve(name: str) -> Callable | None:
    if not name:
        return None
    fn = _fn_cache.get(name)
    if fn is None:
        module, qual = name.split(":", 1)
        fn = importlib.import_module(module)
        for part in qual.split("."):
            fn = getattr(fn, part)
        _fn_cache[name] = fn
    return fn


def _check(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend, act_fq):
    if backend not in ("reference", "cpu", "triton", "megablocks"):
        raise ValueError(f"mobilemoe::moe_experts: backend must be a resolved backend "
                         f"(reference|cpu|triton|megablocks), got {backend!r}")
    if ids_TK.dim() != 2 or x_TD.dim() != 2 or x_TD.shape[0] != ids_TK.shape[0]:
        raise ValueError(f"mobilemoe::moe_experts: x_TD {tuple(x_TD.shape)} and ids_TK {tuple(ids_TK.shape)} "
                         f"must be 2-D with the same T")
    if gates_TK.shape != ids_TK.shape:
        raise ValueError(f"mobilemoe::moe_experts: gates_TK {tuple(gates_TK.shape)} != ids_TK "
                         f"{tuple(ids_TK.shape)}")
    if w_gate_up_EFD.dim() != 3 or w_down_EDF.dim() != 3:
        raise ValueError("mobilemoe::moe_experts: w_gate_up_EFD and w_down_EDF must be 3-D (E, 2F, D), (E, D, F)")


@torch.library.custom_op("mobilemoe::moe_experts", mutates_args=())
def moe_experts_op(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                   w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, backend: str,
                   act_fq: str) -> torch.Tensor:
    _check(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend, act_fq)
    with torch.no_grad():
        y_TD = dispatch_experts(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend,
                                _resolve(act_fq))
    return y_TD.contiguous()


@moe_experts_op.register_fake
def _(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend, act_fq):
    _check(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend, act_fq)
    return x_TD.new_empty((ids_TK.shape[0], w_down_EDF.shape[1]))


@torch.library.custom_op("mobilemoe::moe_experts_backward", mutates_args=())
def moe_experts_backward_op(dy_TD: torch.Tensor, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                            gates_TK: torch.Tensor, w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                            backend: str, act_fq: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend, act_fq)
    # A custom op's implementation runs with the autograd dispatch keys excluded (it is "below autograd"), so
    # enable_grad alone would record nothing; put the keys back for the recompute only.
    exclude = _C._dispatch_tls_local_exclude_set()
    for k in _AUTOGRAD_KEYS:
        exclude = exclude.remove(k)
    leaves = [t.detach().requires_grad_() for t in (x_TD, gates_TK, w_gate_up_EFD, w_down_EDF)]
    with _C._ForceDispatchKeyGuard(_C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        y_TD = dispatch_experts(leaves[0], ids_TK, leaves[1], leaves[2], leaves[3], backend,
                                _resolve(act_fq))
        grads = torch.autograd.grad(y_TD, leaves, dy_TD, allow_unused=True)
    # an input that did not reach y (only possible with T = 0) has an exact zero gradient
    return tuple((torch.zeros_like(t) if g is None else g).contiguous() for g, t in zip(grads, leaves))


@moe_experts_backward_op.register_fake
def _(dy_TD, x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend, act_fq):
    _check(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend, act_fq)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (x_TD, gates_TK, w_gate_up_EFD, w_down_EDF))


def _setup_context(ctx, inputs, output):
    x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend, act_fq = inputs
    ctx.save_for_backward(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF)
    ctx.backend, ctx.act_fq = backend, act_fq


def _backward(ctx, dy_TD):
    x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF = ctx.saved_tensors
    dx, dgates, dw13, dw2 = moe_experts_backward_op(dy_TD, x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF,
                                                    ctx.backend, ctx.act_fq)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, None, dgates if need[2] else None, dw13 if need[3] else None,
            dw2 if need[4] else None, None, None)


moe_experts_op.register_autograd(_backward, setup_context=_setup_context)
