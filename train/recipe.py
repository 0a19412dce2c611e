"""The four-stage recipe: `python -m train --size tiny|S|M|L --out runs/<size> [--dry-run] [--resume CKPT]`.

The recipe file (train/configs/<size>.toml, or --config) is parsed and checked by train/recipe_config.py before
anything runs (--dry-run too): an unknown key, a wrong type, a value out of range or an impossible combination
is one line naming the file, section and key, exit 2.

Stages (train/configs/<size>.toml): pretrain -> midtrain -> sft -> qat. Each stage starts from the previous
stage's model directory, writes checkpoints to <run>/<stage>/ckpt/, its per-step log to <run>/<stage>/log.jsonl,
and its final model directory to <run>/<stage>/model; the QAT model is also saved as <run>/final (config.json
"qat": true) and the run ends by exporting it with the phone engine and printing a generation.

Re-running the same command resumes: finished stages are skipped, an interrupted stage continues from its
latest checkpoint (or from --resume <checkpoint dir>). Multi-GPU / multi-node: launch with torchrun, e.g.
    torchrun --nproc_per_node=8 -m train --size M --out runs/M
    torchrun --nnodes=2 --node_rank=$R --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=$HEAD:29500 --rdzv_id=mmoe -m train --size M --out runs/M
Each stage's model is FSDP2-sharded (torch.distributed.fsdp.fully_shard per block + root), NCCL on GPUs,
gloo on CPU.

Expert parallelism (model/expert_parallel.py; train/README.md, "Expert parallelism"): `[hardware] ep = 4` in the
recipe shards the routed experts over groups of 4 ranks on a (dp_shard = world / ep) x ep mesh, tokens exchanged
by all_to_all; ep must divide n_experts and the world size (60 experts on 8-GPU nodes: ep = 2 or 4), e.g.
    torchrun --nproc_per_node=8 -m train --config M-ep4.toml --out runs/M-ep4    # [hardware] ep = 4
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from model import cli
from model.config import count_params
from model.precision import policy_for
from train import ckpt as ck
from train import data_plan
from train import store as tstore
from train.batches import Batcher, LMSource, SFTSource, eval_pairs, eval_windows
from train.chat import SPECIAL_TOKENS, encode_chat_batch, render_prompt, special_ids
from train.data import DataError, iter_source, quality_text, shakespeare_splits, take_chars
from train.loop import (
    StageConfig,
    TrainingDiverged,
    dist_info,
    evaluate,
    stage_dict,
    train_stage,
    unigram_entropy,
)
from train.recipe_config import Recipe, did_you_mean, load_recipe_file

CONFIG_DIR = Path(__file__).parent / "configs"
SIZES = ("tiny", "S", "M", "L")
GEN_PROMPT = "Continue HAMLET's speech:\nTo be, or not to be, that is the question:"


class UsageError(cli.BadInput):
    """A bad command line or recipe: one line on stderr, exit 2."""


# ------------------------------------------------------------------------------------------------------
# config
def load_recipe(size: str | None, path: str | None = None) -> Recipe:
    if path is None:
        if size not in SIZES:
            raise UsageError(f"unknown size {size!r}; choose one of {cli.choices(SIZES)}")
        path = str(CONFIG_DIR / f"{size}.toml")
    return load_recipe_file(path)


def is_done(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / "summary.json").is_file() and (run_dir / stage / "model" / "config.json").is_file()


def check_stages_arg(rec: Recipe, arg: str | None, run_dir: Path) -> set[str] | None:
    """--stages: known names, and no selected stage after an unselected one that is not done (it would start
    from a model that does not exist)."""
    if not arg:
        return None
    names = rec.stage_names
    sel = [s.strip() for s in arg.split(",")]
    for s in sel:
        if s not in names:
            raise UsageError(f"--stages: unknown stage {s!r} in {rec.path} ({did_you_mean(s, names)})")
    last = max(names.index(s) for s in sel)
    for s in names[:last]:
        if s not in sel and not is_done(run_dir, s):
            raise UsageError(f"--stages: stage {s!r} comes first and is not done in {run_dir}; "
                             f"add it to --stages")
    return set(sel)


def stage_fingerprint(rec: Recipe, st: StageConfig, n_tokens: int) -> str:
    """What a stage's checkpoints and summary are keyed by: a resumed or skipped stage must match it."""
    fp = dict(model=rec.model.to_dict(), stage=stage_dict(st), seed=rec.seed, tok=n_tokens)
    if data_plan.reads_run_stores(rec, st.name):  # another sample order than the in-memory Batcher's
        fp["data"] = "run-stores"
    return ck.fingerprint(fp)


def check_resume(rec: Recipe, resume: str | None, run_dir: Path) -> str | None:
    """--resume: an existing, complete checkpoint of one of this recipe's stages, whose earlier stages are done
    in the run folder (the stage's own checkpoint continues it; it never restarts pre-training). Returns the
    checkpoint's stage name. The config fingerprint is compared here when the checkpoint carries its
    tokenizer (train/loop.py saves one with every checkpoint), and again when training loads it."""
    if not resume:
        return None
    p = Path(resume)
    if not p.exists():
        raise UsageError(f"--resume {resume}: no such checkpoint folder")
    if not p.is_dir():
        raise UsageError(f"--resume {resume}: not a checkpoint folder (a file)")
    missing = ck.missing_file(p)  # either layout (train/ckpt.py)
    if missing is not None:
        raise UsageError(f"--resume {resume}: not a complete checkpoint folder (no {missing}; a checkpoint is "
                         f"<run>/<stage>/ckpt/step_N)")
    try:
        state = json.loads((p / "state.json").read_text())
        stage = state["stage"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UsageError(f"--resume {resume}: unreadable state.json ({cli.one_line(e)})") from None
    names = rec.stage_names
    if stage not in names:
        raise UsageError(f"--resume {resume}: a checkpoint of stage {stage!r}, which {rec.path} does not have "
                         f"(it has {cli.choices(names)})")
    st = rec.stages[names.index(stage)]
    tok_file = p / "tokenizer.json"
    if tok_file.is_file():
        from tokenizers import Tokenizer  # noqa: PLC0415

        try:
            n_tok = Tokenizer.from_file(str(tok_file)).get_vocab_size()
        except Exception as e:  # noqa: BLE001  (the tokenizers library raises its own exception type)
            raise UsageError(f"--resume {resume}: unreadable tokenizer.json ({cli.one_line(e)})") from None
        if state.get("fingerprint") != stage_fingerprint(rec, st, n_tok):
            raise UsageError(f"--resume {resume}: written for a different model / stage {stage!r} config than "
                             f"{rec.path} (fingerprint mismatch)")
    missing = [s for s in names[:names.index(stage)] if not is_done(run_dir, s)]
    if missing:
        guess = p.parent.parent.parent if p.parent.name == "ckpt" and p.parent.parent.name == stage else None
        hint = f" (this checkpoint's run folder looks like {guess}: pass --out {guess})" \
            if guess is not None and guess.resolve() != run_dir.resolve() else ""
        raise UsageError(f"--resume {resume}: a checkpoint of stage {stage!r}, but the earlier stage(s) "
                         f"{cli.choices(missing)} are not done in {run_dir}{hint}")
    return stage


# ------------------------------------------------------------------------------------------------------
# memory estimate / dry run
def memory_estimate(mcfg, st: StageConfig, gpus: int) -> dict:
    """Per-GPU bytes: FSDP2 shards fp32 weights + fp32 grads + AdamW m, v (16 B/param) over `gpus`; one block
    is gathered unsharded at a time (x2 for prefetch); activations of one micro-batch in bf16 without
    activation checkpointing (~34 B x tokens x d_model per layer, Korthikanti et al.) plus fp32 logits."""
    total, _ = count_params(mcfg)
    states = 16 * total / gpus
    per_layer = (total - mcfg.vocab_size * mcfg.d_model) / max(1, mcfg.n_layers)
    gathered = 2 * 4 * per_layer * 2
    tok = st.micro_batch * st.seq_len
    act = mcfg.n_layers * tok * mcfg.d_model * 34 + tok * mcfg.vocab_size * 4 * 3
    return dict(params=total, states=states, gathered=gathered, activations=act, total=states + gathered + act)


def print_plan(rec: Recipe, mcfg, stages: list[StageConfig], out: str) -> None:
    gpus, dev = rec.hardware.gpus, rec.hardware.device
    total, active = count_params(mcfg)
    print(f"plan: size {rec.size} ({rec.path}), run dir {out}")
    print(f"  model: {mcfg.name} d_model={mcfg.d_model} layers={mcfg.n_layers} experts={mcfg.n_experts} "
          f"top_k={mcfg.top_k} shared={mcfg.n_shared_experts} vocab={mcfg.vocab_size}; "
          f"{total / 1e6:.1f}M total / {active / 1e6:.1f}M active params")
    tk = rec.tokenizer
    print(f"  tokenizer: {tk.kind} " + (f"(train BPE {tk.vocab_size} on {tk.train_on})" if tk.kind == "bpe"
                                        else f"{tk.name or tk.file}"))
    print(f"  hardware: {dev}, planned GPUs {gpus} (FSDP2 across them)" if dev != "cpu" else f"  hardware: {dev}")
    if rec.hardware.ep > 1:
        ep = rec.hardware.ep
        dp = f"{gpus // ep}" if dev != "cpu" else f"(world / {ep})"
        print(f"  expert parallel: ep {ep} (mesh dp_shard {dp} x ep {ep}, {mcfg.n_experts // ep} experts per "
              f"rank)")
    print(f"  {'stage':<9} {'kind':<9} {'tokens':>16} {'seq':>6} {'batch':>6} {'steps':>10} {'lr':>8} "
          f"{'sched':<8} {'mem/GPU':>9}")
    for st in stages:
        mem = memory_estimate(mcfg, st, gpus)
        print(f"  {st.name:<9} {st.kind:<9} {st.tokens:>16,} {st.seq_len:>6} {st.global_batch:>6} {st.steps:>10,} "
              f"{st.lr:>8.1e} {st.schedule:<8} {mem['total'] / 2**30:>7.1f}Gi" + ("  (QAT)" if st.qat else ""))
        for line in data_plan.plan_lines(rec, st, Path(out)):  # unique vs planned tokens, epochs, warnings
            print(f"      {line}")
    ev = rec.eval
    print(f"  eval: held-out {ev.heldout} (max {ev.max_tokens} tokens) vs its unigram entropy"
          + (f"; SFT pairs {ev.heldout_sft}" if ev.heldout_sft else ""))
    print(f"  outputs: {out}/<stage>/model, {out}/final (INT4 QAT), {out}/model.mmoe")


def check_hardware(rec: Recipe, mcfg, stages: list[StageConfig]) -> torch.device:
    """CPU recipes run anywhere; CUDA recipes fail at once, in one line, when the GPU memory is short;
    device = "auto" takes CUDA when there is one."""
    dev = rec.hardware.device
    if dev == "cpu" or (dev == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    _, world = dist_info()
    need = max(memory_estimate(mcfg, st, world)["total"] for st in stages)
    if not torch.cuda.is_available():
        raise UsageError(f"size {rec.size} needs CUDA GPUs: about {need / 2**30:.1f} GiB per GPU with "
                         f"{world} GPU(s) (FSDP2); no CUDA device found (try --dry-run, or SIZE=tiny on CPU)")
    have = torch.cuda.get_device_properties(0).total_memory
    if have < need:
        raise UsageError(f"size {rec.size} needs about {need / 2**30:.1f} GiB per GPU with {world} GPU(s); "
                         f"this GPU has {have / 2**30:.1f} GiB (use more GPUs via torchrun)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


# ------------------------------------------------------------------------------------------------------
# data
class DataCache:
    """Tokenized sources, built once per run (and cached on disk under <run>/cache)."""

    def __init__(self, rec: Recipe, run: Path, tok, root: str):
        self.rec, self.run, self.tok, self.root = rec, run, tok, root
        self.eos = tok.token_to_id(SPECIAL_TOKENS[0])
        self.mem: dict = {}
        self._splits = None

    def splits(self):
        if self._splits is None:
            self._splits = shakespeare_splits(self.root)
        return self._splits

    def _cached(self, key: str, build):
        if key in self.mem:
            return self.mem[key]
        f = self.run / "cache" / (key.replace(":", "_").replace("/", "_") + ".pt")
        if f.is_file():
            try:
                v = torch.load(f, weights_only=True)
                self.mem[key] = v
                return v
            except Exception:  # noqa: BLE001  (a corrupt cache is rebuilt)
                pass
        v = build()
        if dist_info()[0] == 0:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
            torch.save(v, tmp)
            os.replace(tmp, f)
        self.mem[key] = v
        return v

    def _enc(self, texts: list[str]) -> torch.Tensor:
        out: list[int] = []
        for e in self.tok.encode_batch(texts, add_special_tokens=False):
            out.extend(e.ids)
            out.append(self.eos)
        return torch.tensor(out, dtype=torch.int32)

    def _pairs(self, pairs):
        enc = encode_chat_batch(self.tok, pairs)
        return dict(ids=[torch.tensor(i, dtype=torch.int32) for i, _ in enc],
                    masks=[torch.tensor(m, dtype=torch.int8) for _, m in enc])

    def lm(self, spec: dict) -> torch.Tensor:
        src = spec["source"]
        if src == "shakespeare:train":
            return self._cached(src, lambda: self._enc(self.splits()[0]))
        if src == "shakespeare:heldout":
            return self._cached(src, lambda: self._enc(self.splits()[1]))
        if src == "shakespeare:quality":
            return self._cached(src, lambda: self._enc([q for q in map(quality_text, self.splits()[0]) if q]))
        limit = int(spec.get("max_tokens", 50_000_000))
        if tstore.is_store(src):  # already tokenized on disk: read the first `limit` tokens, no cache copy
            ts = tstore.open_stores([src], self.tok)[0]
            return torch.from_numpy(ts.read(0, min(ts.n_tokens, limit)).astype("int64"))

        def build():
            st: dict = {}
            out: list[int] = []
            for doc in iter_source(src, spec.get("text_field", "text"), spec.get("split", "train"), st):
                out.extend(self.tok.encode(doc, add_special_tokens=False).ids)
                out.append(self.eos)
                if len(out) >= limit:
                    break
            if st.get("skipped"):
                print(f"data {src}: skipped {st['skipped']} malformed rows (kept {st['rows']})", file=sys.stderr)
            if len(out) < 2:
                raise DataError(f"data {src}: no usable text rows")
            return torch.tensor(out, dtype=torch.int32)

        return self._cached(f"{src}:{spec.get('text_field', 'text')}", build)

    def sft(self, spec: dict) -> dict:
        from train.sft import build_pairs  # noqa: PLC0415

        src = spec["source"]
        if src == "shakespeare:sft":
            return self._cached(src, lambda: self._pairs(build_pairs(self.splits()[0], seed=0)))
        if src == "shakespeare:sft_heldout":
            return self._cached(src, lambda: self._pairs(build_pairs(self.splits()[1], seed=0, max_pairs_per_play=60)))
        limit = int(spec.get("max_rows", 200_000))

        def build():
            st: dict = {}
            pairs = []
            for row in iter_source(src, spec.get("text_field", "messages"), spec.get("split", "train"), st,
                                   raw=True):
                pr = chat_pair(row)
                if pr is None:
                    st["skipped"] += 1
                    continue
                pairs.append(pr)
                if len(pairs) >= limit:
                    break
            if st.get("skipped"):
                print(f"data {src}: skipped {st['skipped']} malformed rows (kept {len(pairs)})", file=sys.stderr)
            if not pairs:
                raise DataError(f"data {src}: no usable prompt/response rows")
            return self._pairs(pairs)

        return self._cached(f"{src}:sft", build)

    def batcher(self, mix, st: StageConfig, seed: int):
        """A stage's batch stream: train/store.py's StoreMixture when its sources are token stores (each rank
        reads only its own rows, nothing held in memory), else the in-memory Batcher."""
        srcs = [d.source for d in mix]
        rank, world = dist_info()
        if data_plan.reads_run_stores(self.rec, st.name):  # [data] build_stores: <run>/store, built once
            m = data_plan.mixture(self.rec, st, self.run, self.tok, self.root, seed, rank, world)
            if rank == 0:
                for line in data_plan.plan_lines(self.rec, st, self.run):
                    print(f"[{st.name}] {line}", file=sys.stderr)
            return m
        if tstore.stage_uses_stores(srcs, [d.is_chat for d in mix], st.name):
            rank, world = dist_info()
            return tstore.StoreMixture(tstore.open_stores(srcs, self.tok), [d.mix_weight for d in mix], st.seq_len,
                                       st.global_batch, seed, names=srcs, rank=rank, world=world)
        return Batcher([self.source(d.as_dict()) for d in mix], [d.mix_weight for d in mix], st.seq_len,
                       st.global_batch, seed)

    def source(self, spec: dict):
        is_chat = spec["source"] in ("shakespeare:sft", "shakespeare:sft_heldout") or spec.get("format") == "chat"
        if is_chat:
            d = self.sft(spec)
            return SFTSource([(i.tolist(), m.tolist()) for i, m in zip(d["ids"], d["masks"])])
        return LMSource(self.lm(spec).long())


def chat_pair(row) -> tuple[str, str] | None:
    """A prompt/response pair from a chat row: {"messages": [{"role", "content"}...]} (first user turn and the
    assistant reply after it) or {"prompt", "response"}. None = malformed."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return row["prompt"], row["response"]
    msgs = row.get("messages") if isinstance(row, dict) else row
    if not isinstance(msgs, list):
        return None
    for a, b in zip(msgs, msgs[1:]):
        if (isinstance(a, dict) and isinstance(b, dict) and a.get("role") == "user" and b.get("role") == "assistant"
                and isinstance(a.get("content"), str) and isinstance(b.get("content"), str)):
            return a["content"], b["content"]
    return None


# ------------------------------------------------------------------------------------------------------
# model helpers
def build_model(mcfg, device):
    from model.model import MobileMoE  # noqa: PLC0415

    return MobileMoE(mcfg).to(device)


def wrap_fsdp(model, policy=None):
    _, world = dist_info()
    if world == 1:
        return model
    return shard_model(model, policy)


def shard_model(model, policy=None):
    """FSDP2 per block + root under the precision policy (model/precision.py). Mixed precision: blocks are
    all-gathered in the compute dtype and reduce-scattered in the reduce dtype; each block's router and norm
    gains (and the final norm) form their own fp32 group, so the router reads fp32 weights as on one device."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    if policy is None or not policy.mixed:
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    mp, fp32 = policy.fsdp_mp_policy(), policy.fsdp_fp32_policy()
    for layer in model.layers:
        keep = [layer.attn_norm, layer.ffn_norm] + ([layer.moe.router] if layer.is_moe else [])
        fully_shard(keep, mp_policy=fp32)
        fully_shard(layer, mp_policy=mp)
    fully_shard(model.norm, mp_policy=fp32)
    fully_shard(model, mp_policy=mp)
    return model


def plain_copy(model, mcfg):
    """A plain (unsharded, CPU) model holding the full weights of a possibly FSDP-wrapped model.
    Collective under FSDP: every rank must call it; only rank 0's copy is complete."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    from model.model import MobileMoE  # noqa: PLC0415

    _, world = dist_info()
    if world == 1 and next(model.parameters()).device.type == "cpu":
        return model
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    m = MobileMoE(mcfg)
    if sd:
        m.load_state_dict(sd, strict=False)
    m.set_qat(bool(getattr(model, "qat", False)))
    return m


def eval_suite(rec: Recipe, data: DataCache, mcfg, device, micro_batch: int):
    """-> eval_fn(model) giving heldout_loss, unigram (and sft_loss, sft_unigram when configured)."""
    ev = rec.eval
    T = ev.seq_len
    hx, hm = eval_windows(data.lm({"source": ev.heldout, "max_tokens": ev.max_tokens + 1}).long(), T, ev.max_tokens)
    uni = unigram_entropy(hx, hm, mcfg.vocab_size)
    sx = sm = None
    if ev.heldout_sft:
        d = data.sft({"source": ev.heldout_sft})
        sx, sm = eval_pairs([(i.tolist(), m.tolist()) for i, m in zip(d["ids"], d["masks"])], T,
                            data.eos)
        s_uni = unigram_entropy(sx, sm, mcfg.vocab_size)

    def fn(model, sft: bool = True) -> dict:
        out = dict(heldout_loss=evaluate(model, hx, hm, micro_batch, device), unigram=uni)
        if sx is not None and sft:
            out.update(sft_loss=evaluate(model, sx, sm, micro_batch, device), sft_unigram=s_uni)
        return out

    return fn


# ------------------------------------------------------------------------------------------------------
def run(args) -> int:
    rec = load_recipe(args.size, args.config)
    mcfg, stages, seed = rec.model, rec.stages, rec.seed
    run_dir = Path(args.out)
    # every check that reads only the command line, the recipe and the run folder happens here, before
    # anything runs or is written, so a dry run reports the same mistakes a real run would
    only = check_stages_arg(rec, args.stages, run_dir)
    resume_stage = check_resume(rec, args.resume, run_dir)
    if args.dry_run:
        print_plan(rec, mcfg, stages, str(run_dir))
        return 0
    device = check_hardware(rec, mcfg, stages)
    rank, world = dist_info()
    if world == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import datetime  # noqa: PLC0415

        import torch.distributed as dist  # noqa: PLC0415

        # a stuck collective should fail within minutes, not hang for the default 30
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=int(os.environ.get("MMOE_DIST_TIMEOUT_MIN", 10))))
        rank, world = dist_info()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    ep = rec.hardware.ep
    ep_mesh = dp_mesh = world_mesh = None
    if ep > 1:
        if world % ep:
            raise UsageError(f"{rec.path}: [hardware] ep: {ep} does not divide the world size {world}")
        from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

        # experts: Shard(0) over ep, FSDP over dp_shard (same parent mesh); everything else FSDP over all ranks
        mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp_shard", "ep"))
        world_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("world",))
        ep_mesh, dp_mesh = mesh["ep"], mesh["dp_shard"]
        if rank == 0:
            print(f"expert parallel: mesh dp_shard {world // ep} x ep {ep}, {mcfg.n_experts // ep} experts per rank",
                  file=sys.stderr)
    for i, st in enumerate(stages, 1):
        if st.global_batch % (st.micro_batch * world):
            raise UsageError(f"{rec.path}: [stages.{i}] global_batch: {st.global_batch} is not a multiple of "
                             f"micro_batch {st.micro_batch} x world size {world}")
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    t_run = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    tok, tok_path = prepare_tokenizer(rec, run_dir, args.data_root)
    if tok.get_vocab_size() > mcfg.vocab_size:
        raise UsageError(f"tokenizer has {tok.get_vocab_size()} tokens > model vocab_size {mcfg.vocab_size}")
    data = DataCache(rec, run_dir, tok, args.data_root)
    eval_fn = eval_suite(rec, data, mcfg, device, max(s.micro_batch for s in stages))
    policy = policy_for(device)  # the one precision policy: training, evaluation and FSDP
    if rank == 0:
        print(f"precision: {policy.describe()}", file=sys.stderr)
    from model.io import load_model_dir, save_model_dir  # noqa: PLC0415
    from train.tracking import Tracker  # noqa: PLC0415

    results = []
    prev_model_dir = None
    resume_ck = Path(args.resume) if args.resume else None
    float_eval = ptq_eval = None
    for st in stages:
        sdir = run_dir / st.name
        fp = stage_fingerprint(rec, st, tok.get_vocab_size())
        done = sdir / "summary.json"
        if done.is_file() and (sdir / "model" / "config.json").is_file() and resume_stage != st.name:
            summ = json.loads(done.read_text())
            if summ.get("fingerprint") != fp:
                raise UsageError(f"{sdir} was trained with a different config; use a new --out (or delete it)")
            if rank == 0:
                print(f"[{st.name}] already done ({summ['steps']} steps), skipping", file=sys.stderr)
            results.append(summ)
            prev_model_dir = sdir / "model"
            continue
        if only is not None and st.name not in only:
            # check_stages_arg made sure no selected stage comes after this one: the selection is done
            if rank == 0:
                print(f"[{st.name}] not selected by --stages; stopping here (re-run without --stages to go on)",
                      file=sys.stderr)
            return 0
        # start from the previous stage's model (a checkpoint, when resuming, overrides these weights)
        if prev_model_dir is None:
            model = build_model(mcfg, device)
        else:
            model, _ = load_model_dir(prev_model_dir, device)
            model.train()
        model.set_qat(bool(st.qat))
        model.set_precision(policy)
        if ep_mesh is not None:
            model.set_expert_parallel(ep_mesh)
        if st.qat and results:
            # (a) = the previous (float) stage's held-out metrics; (b) PTQ = its weights under the INT4 / int8
            # fake quant with no training (round-to-nearest, the same format); (c) = the QAT result below
            float_eval = results[-1].get("eval", {})
            ptq_eval = eval_fn(model)
        if ep_mesh is not None:
            from model.expert_parallel import shard_model_ep  # noqa: PLC0415

            model = shard_model_ep(model, world_mesh, dp_mesh, policy)
        else:
            model = wrap_fsdp(model, policy)
        mix = rec.mixture(st.name)
        batcher = data.batcher(mix, st, seed + len(results))
        tracker = None
        if rank == 0:
            tracker = Tracker(run_dir, group=run_dir.name, stage=st.name,
                              config=dict(stage=stage_dict(st), model=mcfg.to_dict(), recipe=rec.path, world=world))
        try:
            # the SFT-pair held-out loss is measured from the SFT stage on (it means little before)
            stage_eval = (lambda m, _sft=st.kind in ("sft", "qat"): eval_fn(m, sft=_sft))
            res = train_stage(model, st, batcher, stage_dir=sdir, eval_fn=stage_eval, tracker=tracker,
                              resume=resume_ck if resume_stage == st.name else "auto", fingerprint=fp,
                              tokenizer_json=tok_path, progress=rank == 0, device=device, seed=seed,
                              max_steps=args.max_steps, precision=policy)
        except BaseException:
            if tracker is not None:
                tracker.finish()
            raise
        if args.max_steps is not None and res.heldout_loss is None:
            if tracker is not None:
                tracker.finish()
            print(f"[{st.name}] stopped after --max-steps {args.max_steps} (resume by re-running)", file=sys.stderr)
            return 0
        full = plain_copy(model, mcfg)
        summ = dict(stage=st.name, steps=res.steps, tokens=res.tokens, seconds=round(res.seconds, 1),
                    train_loss=res.train_loss, eval=res.extra, fingerprint=fp)
        if st.qat:
            summ["ptq_eval"], summ["float_eval"] = ptq_eval, float_eval
        if rank == 0:
            save_model_dir(full, sdir / "model", tok_path, extra=dict(stage=st.name))
            _atomic_write(done, json.dumps(summ, indent=1))
            if tracker is not None:
                tracker.summary({f"final/{k}": v for k, v in res.extra.items()})
                tracker.finish()
        results.append(summ)
        prev_model_dir = sdir / "model"
        if world > 1:
            import torch.distributed as dist  # noqa: PLC0415

            dist.barrier()
    if rank == 0:
        final = results[-1]
        last_dir = run_dir / stages[-1].name / "model"
        fm, _ = load_model_dir(last_dir)
        save_model_dir(fm, run_dir / "final", tok_path, extra=dict(stage="final"))
        print_summary(results, time.time() - t_run)
        _atomic_write(run_dir / "summary.json", json.dumps(dict(stages=results, seconds=time.time() - t_run), indent=1))
        if not args.no_generate:
            generate_sample(run_dir, fm, tok)
        del final
    return 0


def prepare_tokenizer(rec: Recipe, run_dir: Path, data_root: str):
    from train.tokenizer import load_tokenizer, save_tokenizer, train_bpe  # noqa: PLC0415

    path = run_dir / "tokenizer.json"
    tk = rec.tokenizer
    if path.is_file():
        return load_tokenizer(path), path
    # every rank builds the (deterministic, identical) tokenizer itself and writes it atomically: no collective
    # here (a gloo barrier at this point was seen to hang intermittently)
    if tk.kind == "bpe":
        if tk.train_on == "shakespeare:train":
            texts = shakespeare_splits(data_root)[0]
        else:
            texts = take_chars(iter_source(tk.train_on))  # a bounded prefix of a (maybe endless) stream
        save_tokenizer(train_bpe(texts, tk.vocab_size, SPECIAL_TOKENS), path)
    else:  # "pretrained" (recipe_config admits no other kind)
        if tk.file:
            t = load_tokenizer(tk.file)
        else:
            from tokenizers import Tokenizer  # noqa: PLC0415

            try:
                t = Tokenizer.from_pretrained(tk.name)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"pretrained tokenizer {tk.name} is unreachable: {cli.one_line(e)}") from e
        t.add_special_tokens(list(SPECIAL_TOKENS))
        save_tokenizer(t, path)
    tok = load_tokenizer(path)
    special_ids(tok)
    return tok, path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def print_summary(results: list[dict], seconds: float) -> None:
    print("\n=== per-stage summary (held-out = whole held-out plays; nats/token) ===")
    print(f"{'stage':<9} {'steps':>6} {'tokens':>10} {'time s':>7} {'train':>7} {'held-out':>9} {'unigram':>8} "
          f"{'below uni':>9} {'sft held-out':>12}")
    for r in results:
        ev = r.get("eval", {})
        h, u = ev.get("heldout_loss"), ev.get("unigram")
        print(f"{r['stage']:<9} {r['steps']:>6} {r['tokens']:>10,} {r['seconds']:>7.0f} {r['train_loss']:>7.3f} "
              f"{h:>9.3f} {u:>8.3f} {u - h:>9.3f} " + (f"{ev['sft_loss']:>12.3f}" if "sft_loss" in ev else ""))
    q = next((r for r in results if r.get("ptq_eval")), None)
    if q is not None and q.get("float_eval"):
        a, b, c = q["float_eval"], q["ptq_eval"], q["eval"]
        print("\n=== INT4 g32 weights + int8 per-token activations: float vs PTQ vs QAT (held-out, nats/token) ===")
        print(f"{'model':<28} {'held-out':>9} {'gap':>8} {'sft held-out':>13} {'gap':>8}")
        for name, e in (("(a) float SFT", a), ("(b) PTQ INT4 of (a)", b), ("(c) QAT INT4", c)):
            print(f"{name:<28} {e['heldout_loss']:>9.4f} {e['heldout_loss'] - a['heldout_loss']:>+8.4f} "
                  f"{e.get('sft_loss', float('nan')):>13.4f} {e.get('sft_loss', 0) - a.get('sft_loss', 0):>+8.4f}")
        closer = abs(c["heldout_loss"] - a["heldout_loss"]) < abs(b["heldout_loss"] - a["heldout_loss"])
        print(f"QAT closer to float than PTQ: {'yes' if closer else 'NO'}")
    print(f"total time {seconds:.0f} s")


def generate_sample(run_dir: Path, model, tok) -> None:
    prompt = GEN_PROMPT
    mobile_main = Path(__file__).resolve().parent.parent / "mobile" / "__main__.py"
    print(f"\n=== generation (prompt: {prompt!r}) ===")
    if mobile_main.is_file():
        out = run_dir / "model.mmoe"
        py = sys.executable
        r = subprocess.run([py, "-m", "mobile", "export", "--ckpt", str(run_dir / "final"), "--out", str(out)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            g = subprocess.run([py, "-m", "mobile", "generate", "--model", str(out), "--prompt", prompt, "--chat",
                                "--greedy", "--max-new-tokens", "64"], capture_output=True, text=True)
            if g.returncode == 0:
                print("[phone engine, INT4]")
                print(g.stdout.rstrip())
                return
            print(f"warning: mobile generate failed: {(g.stderr.strip().splitlines() or [''])[-1]}", file=sys.stderr)
        else:
            print(f"warning: mobile export failed: {(r.stderr.strip().splitlines() or [''])[-1]}", file=sys.stderr)
    ids = tok.encode(render_prompt(prompt), add_special_tokens=False).ids
    sp = special_ids(tok)
    new = model.generate(ids, 64, temperature=0.0, eos_id=sp[SPECIAL_TOKENS[3]])
    print("[PyTorch QAT model (fake-quant INT4); the phone engine is not available here]")
    print(tok.decode(new, skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    """The CLI; expected failures raise (model.cli.run prints them as one line, exit 2)."""
    p = cli.parser("python -m train", __doc__)
    p.add_argument("--size", type=cli.one_of(SIZES), default=None, metavar=cli.choices(SIZES).replace(" ", ""),
                   help="run train/configs/<size>.toml; tiny when neither --size nor --config is given")
    p.add_argument("--config", default=None, metavar="TOML", help="a recipe file instead of a size's (not with --size)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory; unset: runs/<size> or runs/<config stem>")
    p.add_argument("--dry-run", action="store_true",
                   help="check the recipe and arguments, print the plan and exit (no data, no network, no writes)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="resume from this checkpoint folder, <run>/<stage>/ckpt/step_N; unset: the unfinished "
                        "stage's latest checkpoint, automatically")
    p.add_argument("--stages", default=None, metavar="A,B",
                   help="comma-separated stages to run; unset: all (earlier stages must be done or selected)")
    p.add_argument("--data-root", default="data/shakespeare", metavar="DIR", help="the offline corpus (make data)")
    p.add_argument("--no-generate", action="store_true", help="skip the export + generation at the end")
    p.add_argument("--threads", type=cli.positive_int, default=None, metavar="N",
                   help="CPU threads for torch; unset: torch's choice (OMP_WAIT_POLICY defaults to PASSIVE "
                        "so they degrade gracefully on shared cores: README, Training)")
    p.add_argument("--max-steps", type=cli.positive_int, default=None, metavar="N",
                   help="stop after N (>= 1) steps of the current stage (testing); unset: run to the end")
    a = p.parse_args(argv)
    if a.size is not None and a.config is not None:
        raise UsageError("give --size or --config, not both")
    if a.config is None and a.size is None:
        a.size = "tiny"
    if a.out is None:
        a.out = f"runs/{a.size if a.config is None else Path(a.config).stem}"
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    try:
        return run(a)
    except (DataError, ck.CheckpointError, TrainingDiverged) as e:  # expected failures of the data / run
        raise cli.BadInput(str(e)) from e


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run(main, argv)
