"""The recipe file schema (train/configs/<size>.toml): every section parsed into a typed dataclass, checked
before anything runs (`--dry-run` included).

Sections and keys (anything else is an error, with a "did you mean"):
    size = "S"            a name for the run (and the model preset when [model] has no `preset`)
    seed = 0              >= 0
    [model]               preset = <model.config PRESETS> + any ModelConfig field as an override
    [tokenizer]           kind = "bpe" (vocab_size, train_on) | "pretrained" (name or file)
    [eval]                heldout (LM source, required), heldout_sft (chat source), max_tokens, seq_len
    [hardware]            device = "cpu" | "cuda" | "auto" (cuda when available), gpus (planning figure),
                          ep (expert-parallel group size: divides n_experts and gpus; 1 = no EP)
    [data]                max_epochs (dry-run / run warning above it; default 4), build_stores (true: the
                          all-text stages' shakespeare / local-file sources are tokenized into <run>/store/<name>
                          once the run's tokenizer exists, and read through train/store.py's StoreMixture),
                          doc_mask (true: attention within documents of the packed rows, RoPE positions
                          restarting at each; default false)
                          store_root (where `store = NAME` sources live, <store_root>/<NAME>; default
                          "stores", relative to the working directory)
    [[stages]]            the train.loop.StageConfig fields, and its mixture:
    [[stages.data]]       source, weight, text_field, format = "text" | "chat", split, max_tokens, max_rows,
                          tokens (the source's size in tokens, a planning figure for the dry run's epochs),
                          store (a text source's prepared token store, <[data] store_root>/<store>, built from
                          `source` by `python -m train.data prepare`; a stage reads stores for all its sources
                          or for none)

Sources: "shakespeare:<part>" (the offline corpus: train, heldout, quality for text; sft, sft_heldout for
chat pairs), "hf:<org>/<name>[:<config>]" (a hub dataset, streamed), or a local .txt / .jsonl / .json /
.parquet file or folder (checked to exist here, paths relative to the working directory).

Every problem is one RecipeError line naming the file, the section (stages and their data counted from 1, as
the TOML reads top to bottom) and the key:
    train/configs/x.toml: [stages.1] lr: must be > 0, got -0.004
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.cli import BadInput, choices
from model.config import PRESETS, ModelConfig, get_config
from train.loop import StageConfig
from train.store import DEFAULT_MAX_EPOCHS, is_store

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DEVICES = ("cpu", "cuda", "auto")
TOKENIZER_KINDS = ("bpe", "pretrained")
STAGE_KINDS = ("pretrain", "midtrain", "sft", "qat")
SCHEDULES = ("wsd", "cosine", "constant", "linear")
FORMATS = ("text", "chat")
SHAKESPEARE_TEXT = ("shakespeare:train", "shakespeare:heldout", "shakespeare:quality")
SHAKESPEARE_CHAT = ("shakespeare:sft", "shakespeare:sft_heldout")
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
BPE_MIN_VOCAB = 256 + 4 + 1  # byte alphabet + the chat special tokens + at least one merge (train/tokenizer.py)


class RecipeError(BadInput):
    """An invalid recipe: one line, 'file: [section] key: what is wrong'."""


# ------------------------------------------------------------------------------------------------------
# typed sections
@dataclass(frozen=True)
class DataSource:
    """One entry of a mixture (or an eval / tokenizer source). None = not given in the file (so the stage
    fingerprint, which hashes the mixture as written, does not change when a default is spelled out here)."""
    source: str
    weight: float | None = None
    text_field: str | None = None
    format: str | None = None
    split: str | None = None
    max_tokens: int | None = None
    max_rows: int | None = None
    tokens: int | None = None  # declared size (dry-run planning only: not hashed, not read by the loaders)
    store: str | None = None  # the prepared store of this source: [data] store_root / store (train/data_plan.py)

    @property
    def mix_weight(self) -> float:
        return 1.0 if self.weight is None else self.weight

    @property
    def is_chat(self) -> bool:
        return self.source in SHAKESPEARE_CHAT or self.format == "chat"

    def as_dict(self) -> dict:
        """What the loaders read and the stage fingerprint hashes: a planning figure (tokens) is left out, so
        stating a source's size does not invalidate a run's checkpoints."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "tokens"}


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str
    vocab_size: int | None = None  # bpe
    train_on: str | None = None  # bpe
    name: str | None = None  # pretrained: a hub tokenizer
    file: str | None = None  # pretrained: a local tokenizer.json


@dataclass(frozen=True)
class EvalConfig:
    heldout: str
    heldout_sft: str | None = None
    max_tokens: int = 32768
    seq_len: int = 128


@dataclass(frozen=True)
class HardwareConfig:
    device: str = "cpu"
    gpus: int = 1
    ep: int = 1  # expert parallelism: routed experts sharded over groups of ep ranks (model/expert_parallel.py)


@dataclass(frozen=True)
class DataConfig:
    max_epochs: float = DEFAULT_MAX_EPOCHS  # a stage repeating a source more often than this is warned
    build_stores: bool = False  # tokenize local text sources into <run>/store/ (train/data_plan.py)
    store_root: str = "stores"  # where `store = NAME` sources live (relative: to the working directory)
    doc_mask: bool = False  # document-masked attention over packed rows (train/batches.py RankBatch.doc)


@dataclass
class Recipe:
    path: str  # as shown in messages
    size: str
    seed: int
    model: ModelConfig
    tokenizer: TokenizerConfig
    eval: EvalConfig
    hardware: HardwareConfig
    stages: list[StageConfig]  # StageConfig.data: each source's as_dict() (what the fingerprint hashes)
    mixtures: dict[str, list[DataSource]] = field(default_factory=dict)  # stage name -> its typed mixture
    data: DataConfig = field(default_factory=DataConfig)

    def mixture(self, stage: str) -> list[DataSource]:
        return self.mixtures[stage]

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]


# ------------------------------------------------------------------------------------------------------
# readers
def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)


def _toml_type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def did_you_mean(word: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    listed = f"expected one of {choices(sorted(known))}"
    if not close:
        return listed
    # a short list is worth showing beside the guess (the guess can be wrong: 'tpu' is not a typo of 'cpu')
    return f"did you mean {close[0]!r}?" + (f" {listed}" if len(known) <= 6 else "")


class _Table:
    """One TOML table being read: typed getters that raise RecipeError naming file, section and key, and a
    final check that no key was left unread (unknown keys)."""

    def __init__(self, path: str, where: str, table: Any, known: list[str] | tuple[str, ...]):
        self.path, self.where, self.known = path, where, list(known)
        if not isinstance(table, dict):
            raise RecipeError(f"{path}: {where}: must be a table, got {_toml_type(table)}")
        self.t = table
        for k in table:
            if k not in self.known:
                raise self.err(k, f"unknown key ({did_you_mean(k, self.known)})")

    def err(self, key: str | None, msg: str) -> RecipeError:
        loc = self.where if key is None else (f"{self.where} {key}" if self.where else key)
        return RecipeError(f"{self.path}: {loc}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.t

    def _get(self, key: str, default, required: bool):
        if key not in self.t:
            if required:
                raise self.err(key, "missing (required)")
            return default
        return self.t[key]

    def text(self, key: str, default=None, *, required: bool = False, allowed: tuple[str, ...] | None = None):
        v = self._get(key, default, required)
        if key not in self.t:
            return v
        if not isinstance(v, str):
            raise self.err(key, f"expected a string, got {_show(v)} ({_toml_type(v)})")
        if not v.strip():
            raise self.err(key, "must not be empty")
        if allowed is not None and v not in allowed:
            raise self.err(key, f"unknown value {v!r} ({did_you_mean(v, allowed)})")
        return v

    def integer(self, key: str, default=None, *, lo: int | None = None, hi: int | None = None, required: bool = False):
        v = self._get(key, default, required)
        if key not in self.t:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.err(key, f"expected an integer, got {_show(v)} ({_toml_type(v)})")
        if lo is not None and v < lo:
            raise self.err(key, f"must be {'> 0' if lo == 1 else f'>= {lo}'}, got {v}")
        if hi is not None and v > hi:
            raise self.err(key, f"must be <= {hi}, got {v}")
        return v

    def number(self, key: str, default=None, *, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False, hi_open: bool = False, required: bool = False):
        v = self._get(key, default, required)
        if key not in self.t:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(key, f"expected a number, got {_show(v)} ({_toml_type(v)})")
        v = float(v)
        if not math.isfinite(v):
            raise self.err(key, f"must be finite, got {v}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self.err(key, f"must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise self.err(key, f"must be {'<' if hi_open else '<='} {hi:g}, got {v:g}")
        return v

    def flag(self, key: str, default=None):
        v = self._get(key, default, False)
        if key in self.t and not isinstance(v, bool):
            raise self.err(key, f"expected true or false, got {_show(v)} ({_toml_type(v)})")
        return v

    def array(self, key: str, default=None, *, item: str, length: int | None = None):
        v = self._get(key, default, False)
        if key not in self.t:
            return v
        if not isinstance(v, list):
            raise self.err(key, f"expected an array, got {_show(v)} ({_toml_type(v)})")
        if length is not None and len(v) != length:
            raise self.err(key, f"expected {length} values, got {len(v)}")
        for x in v:
            ok = (not isinstance(x, bool)) and (isinstance(x, int) if item == "int" else isinstance(x, (int, float)))
            if not ok:
                raise self.err(key, f"expected an array of {'integers' if item == 'int' else 'numbers'}, "
                                    f"got {_show(v)}")
            if item == "float" and not math.isfinite(float(x)):
                raise self.err(key, f"values must be finite, got {_show(v)}")
        return [int(x) for x in v] if item == "int" else [float(x) for x in v]


# ------------------------------------------------------------------------------------------------------
# sources
def check_source(tb: _Table, key: str, src: str, *, want: str, root: Path | None = None) -> None:
    """want: 'text' (LM tokens), 'chat' (prompt/response pairs) or 'any' (a mixture entry: either)."""
    if src.startswith("shakespeare:"):
        text_ok = src in SHAKESPEARE_TEXT and want in ("text", "any")
        chat_ok = src in SHAKESPEARE_CHAT and want in ("chat", "any")
        if not (text_ok or chat_ok):
            ok = {"text": SHAKESPEARE_TEXT, "chat": SHAKESPEARE_CHAT}.get(want, SHAKESPEARE_TEXT + SHAKESPEARE_CHAT)
            if src in SHAKESPEARE_TEXT + SHAKESPEARE_CHAT:
                raise tb.err(key, f"{src!r} is not a {want} source here (use {choices(ok)})")
            raise tb.err(key, f"unknown source {src!r} ({did_you_mean(src, ok)})")
        return
    if src.startswith("hf:"):
        name = src[3:].partition(":")[0]
        if not name or any(c.isspace() for c in src) or name.startswith("/") or name.endswith("/"):
            raise tb.err(key, f"malformed hub source {src!r} (expected hf:<org>/<name>[:<config>])")
        return
    if ":" in src.split("/")[0] and not Path(src).exists():
        prefix = src.split(":")[0]
        close = difflib.get_close_matches(prefix, ["shakespeare", "hf"], n=1, cutoff=0.6)
        hint = f"did you mean {close[0] + ':'!r}?" if close else \
            "expected shakespeare:<part> | hf:<org>/<name>[:<config>] | a local file"
        raise tb.err(key, f"unknown source kind {prefix + ':'!r} in {src!r} ({hint})")
    p = Path(src) if root is None else root / src
    if not p.exists():
        raise tb.err(key, f"data file not found: {src}")
    if p.is_file() and p.suffix.lower() not in DATA_SUFFIXES:
        raise tb.err(key, f"unsupported data file type {p.suffix!r} in {src} (use {choices(DATA_SUFFIXES)})")


def _data_source(path: str, where: str, t: Any) -> DataSource:
    tb = _Table(path, where, t, [f.name for f in dataclasses.fields(DataSource)])
    src = tb.text("source", required=True)
    fmt = tb.text("format", allowed=FORMATS)
    ds = DataSource(source=src, weight=tb.number("weight", lo=0.0), text_field=tb.text("text_field"), format=fmt,
                    split=tb.text("split"), max_tokens=tb.integer("max_tokens", lo=1), max_rows=tb.integer("max_rows", lo=1),
                    tokens=tb.integer("tokens", lo=1), store=tb.text("store"))
    if ds.store is not None:
        if src.startswith("shakespeare:"):
            raise tb.err("store", f"not for {src!r} (its tokens depend on the run's tokenizer: [data] build_stores)")
        if ds.is_chat:
            raise tb.err("store", "only for text sources (a token store holds LM text; chat pairs stay in memory)")
        if is_store(src):
            raise tb.err("store", f"{src} is already a token store: name it as the source, without store")
        if Path(ds.store).name in ("", ".", ".."):
            raise tb.err("store", f"{ds.store!r}: name a folder (under [data] store_root, or an absolute path)")
    if tb.has("tokens") and src.startswith("shakespeare:"):
        raise tb.err("tokens", f"only for file / hub sources; the size of {src!r} depends on the run's tokenizer")
    if tb.has("tokens") and is_store(src):
        raise tb.err("tokens", f"{src} is a token store: its size is read from its manifest")
    if src.startswith("shakespeare:"):
        check_source(tb, "source", src, want="chat" if fmt == "chat" else "any")
        if fmt == "text" and src in SHAKESPEARE_CHAT:
            raise tb.err("format", f"{src!r} is a chat source (prompt/response pairs); drop format = \"text\"")
        for k in ("text_field", "split", "max_tokens", "max_rows"):
            if tb.has(k):
                raise tb.err(k, f"only for file / hub sources, not {src!r}")
    else:
        # a local file need not exist any more once it is tokenized into its store (`prepare` checks it)
        if not (ds.store and not src.startswith("hf:") and ":" not in src.split("/")[0]):
            check_source(tb, "source", src, want="any")
        if ds.is_chat and tb.has("max_tokens"):
            raise tb.err("max_tokens", "only for text sources (a chat source is capped by max_rows)")
        if not ds.is_chat and tb.has("max_rows"):
            raise tb.err("max_rows", "only for chat sources (format = \"chat\"); a text source is capped by "
                                     "max_tokens")
    return ds


# ------------------------------------------------------------------------------------------------------
# sections
_MODEL_POS_INT = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "quant_group")
_MODEL_POS_FLOAT = ("rope_theta", "norm_eps", "init_std")
_MODEL_CHOICES = {"router_score": ("softmax", "sigmoid"), "moe_backend": ("auto", "triton", "reference", "megablocks")}
_MODEL_FIELD_RE = re.compile(r"^ModelConfig\.(\w+): (.*)$")


def _model(path: str, t: Any, size: str | None) -> ModelConfig:
    fields = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig) if f.name != "name"}
    tb = _Table(path, "[model]", t, ["preset", *fields])
    preset = tb.text("preset", allowed=tuple(PRESETS))
    if preset is None:
        if size is None:
            raise tb.err("preset", f"missing: name a model preset ({choices(list(PRESETS))}) or set size")
        if size not in PRESETS:
            raise tb.err("preset", f"missing, and size {size!r} is not a model preset "
                                   f"({did_you_mean(size, list(PRESETS))})")
        preset = size
    over: dict = {}
    for k, typ in fields.items():
        if not tb.has(k):
            continue
        if k in _MODEL_CHOICES:
            over[k] = tb.text(k, allowed=_MODEL_CHOICES[k])
        elif typ == "str":
            over[k] = tb.text(k)
        elif typ == "bool":
            over[k] = tb.flag(k)
        elif typ == "int":
            over[k] = tb.integer(k, lo=1 if k in _MODEL_POS_INT else 0)
        elif typ == "float":
            over[k] = tb.number(k, lo=0.0, lo_open=k in _MODEL_POS_FLOAT)
        elif typ.startswith("tuple[int"):
            over[k] = tuple(tb.array(k, item="int"))
        else:  # a new ModelConfig field this reader does not know how to type: fail loudly, not silently
            raise tb.err(k, f"no recipe type for ModelConfig field type {typ!r} (extend train/recipe_config.py)")
    try:
        return get_config(preset, **over)
    except ValueError as e:
        m = _MODEL_FIELD_RE.match(str(e))
        if m:
            raise tb.err(m.group(1), m.group(2)) from None
        raise tb.err(None, str(e)) from None


def _tokenizer(path: str, t: Any) -> TokenizerConfig:
    tb = _Table(path, "[tokenizer]", t, [f.name for f in dataclasses.fields(TokenizerConfig)])
    kind = tb.text("kind", required=True, allowed=TOKENIZER_KINDS)
    if kind == "bpe":
        for k in ("name", "file"):
            if tb.has(k):
                raise tb.err(k, "only for kind = \"pretrained\" (a bpe tokenizer is trained from train_on)")
        vs = tb.integer("vocab_size", 2048, lo=BPE_MIN_VOCAB)
        train_on = tb.text("train_on", "shakespeare:train")
        check_source(tb, "train_on", train_on, want="text")
        return TokenizerConfig(kind=kind, vocab_size=vs, train_on=train_on)
    for k in ("vocab_size", "train_on"):
        if tb.has(k):
            raise tb.err(k, "only for kind = \"bpe\" (a pretrained tokenizer has its own vocabulary)")
    name, file = tb.text("name"), tb.text("file")
    if name is None and file is None:
        raise tb.err("name", "missing: a pretrained tokenizer needs name (hub) or file (local tokenizer.json)")
    if name is not None and file is not None:
        raise tb.err("file", "give name or file, not both")
    if file is not None and not Path(file).is_file():
        raise tb.err("file", f"tokenizer file not found: {file}")
    return TokenizerConfig(kind=kind, name=name, file=file)


def _eval(path: str, t: Any, mcfg: ModelConfig) -> EvalConfig:
    tb = _Table(path, "[eval]", t, [f.name for f in dataclasses.fields(EvalConfig)])
    held = tb.text("heldout", required=True)
    check_source(tb, "heldout", held, want="text")
    sft = tb.text("heldout_sft")
    if sft is not None:
        check_source(tb, "heldout_sft", sft, want="chat")
    seq = tb.integer("seq_len", 128, lo=1)
    if seq > mcfg.max_seq_len:
        raise tb.err("seq_len", f"{seq} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    return EvalConfig(heldout=held, heldout_sft=sft, max_tokens=tb.integer("max_tokens", 32768, lo=1), seq_len=seq)


def _hardware(path: str, t: Any, mcfg: ModelConfig) -> HardwareConfig:
    tb = _Table(path, "[hardware]", t, [f.name for f in dataclasses.fields(HardwareConfig)])
    dev = tb.text("device", "cpu", allowed=DEVICES)
    gpus = tb.integer("gpus", 1, lo=1)
    if dev == "cpu" and gpus != 1:
        raise tb.err("gpus", f"is a planning figure for device = \"cuda\"; got {gpus} with device = \"cpu\"")
    ep = tb.integer("ep", 1, lo=1)
    if ep > 1:
        if mcfg.n_experts == 0:
            raise tb.err("ep", f"{ep}: expert parallelism needs routed experts; [model] has n_experts = 0")
        if mcfg.n_experts % ep:
            raise tb.err("ep", f"{ep} does not divide [model] n_experts {mcfg.n_experts} (each rank owns "
                               f"n_experts / ep experts)")
        if dev != "cpu" and gpus % ep:
            raise tb.err("ep", f"{ep} does not divide [hardware] gpus {gpus} (the world is dp_shard x ep)")
    return HardwareConfig(device=dev, gpus=gpus, ep=ep)


_STAGE_KEYS = [f.name for f in dataclasses.fields(StageConfig)]


def _stage(path: str, i: int, t: Any, mcfg: ModelConfig, hw: HardwareConfig) -> tuple[StageConfig, list[DataSource]]:
    where = f"[stages.{i}]"
    tb = _Table(path, where, t, _STAGE_KEYS)
    d = StageConfig()  # the defaults
    name = tb.text("name", required=True)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise tb.err("name", f"{name!r}: use letters, digits, '_', '-', '.' (it names the stage's folder)")
    kw = dict(
        name=name,
        kind=tb.text("kind", d.kind, allowed=STAGE_KINDS),
        tokens=tb.integer("tokens", d.tokens, lo=1),
        seq_len=tb.integer("seq_len", d.seq_len, lo=1),
        global_batch=tb.integer("global_batch", d.global_batch, lo=1),
        micro_batch=tb.integer("micro_batch", d.micro_batch, lo=1),
        lr=tb.number("lr", d.lr, lo=0.0, lo_open=True),
        min_lr=tb.number("min_lr", d.min_lr, lo=0.0),
        schedule=tb.text("schedule", d.schedule, allowed=SCHEDULES),
        warmup_frac=tb.number("warmup_frac", d.warmup_frac, lo=0.0, hi=1.0),
        decay_frac=tb.number("decay_frac", d.decay_frac, lo=0.0, hi=1.0),
        betas=tuple(tb.array("betas", list(d.betas), item="float", length=2)),
        eps=tb.number("eps", d.eps, lo=0.0, lo_open=True),
        weight_decay=tb.number("weight_decay", d.weight_decay, lo=0.0),
        grad_clip=tb.number("grad_clip", d.grad_clip, lo=0.0),  # 0: no clipping
        lb_loss_weight=tb.number("lb_loss_weight", d.lb_loss_weight, lo=0.0),
        z_loss_weight=tb.number("z_loss_weight", d.z_loss_weight, lo=0.0),
        qat=tb.flag("qat", d.qat),
        eval_every=tb.integer("eval_every", d.eval_every, lo=0),
        ckpt_every=tb.integer("ckpt_every", d.ckpt_every, lo=1),
        log_every=tb.integer("log_every", d.log_every, lo=1),
    )
    for b in kw["betas"]:
        if not 0.0 <= b < 1.0:
            raise tb.err("betas", f"each must be in [0, 1), got {_show(list(kw['betas']))}")
    if kw["min_lr"] > kw["lr"]:
        raise tb.err("min_lr", f"{kw['min_lr']:g} is above lr {kw['lr']:g}")
    if kw["global_batch"] % kw["micro_batch"]:
        raise tb.err("micro_batch", f"{kw['micro_batch']} does not divide global_batch {kw['global_batch']}")
    if hw.device != "cpu" and kw["global_batch"] % (kw["micro_batch"] * hw.gpus):
        raise tb.err("global_batch", f"{kw['global_batch']} is not a multiple of micro_batch {kw['micro_batch']} "
                                     f"x [hardware] gpus {hw.gpus}")
    if kw["seq_len"] > mcfg.max_seq_len:
        raise tb.err("seq_len", f"{kw['seq_len']} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    if kw["schedule"] == "wsd" and kw["warmup_frac"] + kw["decay_frac"] > 1.0:
        raise tb.err("decay_frac", f"warmup_frac {kw['warmup_frac']:g} + decay_frac {kw['decay_frac']:g} "
                                   "exceeds 1 (wsd)")
    if kw["schedule"] != "wsd" and tb.has("decay_frac"):
        raise tb.err("decay_frac", f"only for schedule = \"wsd\" (this stage's is {kw['schedule']!r})")
    if kw["kind"] == "qat" and not kw["qat"]:
        raise tb.err("qat", "a stage of kind \"qat\" needs qat = true")
    raw = tb.t.get("data")
    if raw is None:
        raise tb.err("data", "missing: give the mixture as [[stages.data]] tables (source, weight)")
    if not isinstance(raw, list) or not raw:
        raise tb.err("data", "expected one or more [[stages.data]] tables")
    mix = [_data_source(path, f"[stages.{i}.data.{j}]", t) for j, t in enumerate(raw, 1)]
    if sum(s.mix_weight for s in mix) <= 0:
        raise tb.err("data", "the mixture weights are all 0")
    if any(s.store for s in mix) and not all(s.store for s in mix):
        j = next(j for j, s in enumerate(mix, 1) if not s.store)
        raise RecipeError(f"{path}: [stages.{i}.data.{j}] store: missing: the stage's other sources read token "
                          f"stores, and one stage reads through one loader (give every source a store, or none)")
    kw["data"] = [s.as_dict() for s in mix]
    try:
        return StageConfig(**kw), mix
    except ValueError as e:  # StageConfig's own checks (kept in train/loop.py) as a last line of defence
        raise tb.err(None, str(e)) from None


def _data(path: str, t: Any, mixtures: dict[str, list[DataSource]]) -> DataConfig:
    tb = _Table(path, "[data]", t, [f.name for f in dataclasses.fields(DataConfig)])
    cfg = DataConfig(max_epochs=tb.number("max_epochs", DEFAULT_MAX_EPOCHS, lo=0.0, lo_open=True),
                     build_stores=tb.flag("build_stores", False),
                     store_root=tb.text("store_root", "stores"), doc_mask=tb.flag("doc_mask", False))
    built_from: dict[str, tuple] = {}  # one store, one source: a store named twice must be built the same way
    for i, mix in enumerate(mixtures.values(), 1):
        for j, d in enumerate(mix, 1):
            if d.store is None:
                continue
            what = (d.source, d.text_field or "text", d.split or "train", d.max_tokens)
            if built_from.setdefault(d.store, what) != what:
                raise RecipeError(f"{path}: [stages.{i}.data.{j}] store: {d.store!r} is built from "
                                  f"{built_from[d.store][0]!r} (with its text_field / split / max_tokens) "
                                  f"in an earlier stage; name another store for this source")
    if cfg.build_stores:
        for i, mix in enumerate(mixtures.values(), 1):
            for j, d in enumerate(mix, 1):
                if d.source == "shakespeare:heldout":
                    raise RecipeError(f"{path}: [stages.{i}.data.{j}] source: 'shakespeare:heldout' with [data] "
                                      f"build_stores = true: the held-out plays are never built into a training "
                                      f"store")
    return cfg


TOP_KEYS = ("size", "seed", "model", "tokenizer", "eval", "hardware", "data", "stages")


def parse_recipe(text: str, path: str) -> Recipe:
    """Parse and check a recipe's TOML text; `path` is how messages name the file."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML ({' '.join(str(e).split())})") from None
    for k, v in raw.items():
        if k not in TOP_KEYS:
            label = f"section [{k}]" if isinstance(v, (dict, list)) else f"key {k!r}"
            raise RecipeError(f"{path}: unknown {label} ({did_you_mean(k, TOP_KEYS)})")
    top = _Table(path, "", {k: v for k, v in raw.items() if k in ("size", "seed")}, ["size", "seed"])
    size = top.text("size")
    seed = top.integer("seed", 0, lo=0)
    mcfg = _model(path, raw.get("model", {}), size)
    for sec in ("tokenizer", "eval"):
        if sec not in raw:
            raise RecipeError(f"{path}: [{sec}]: missing section (required)")
    tok = _tokenizer(path, raw["tokenizer"])
    ev = _eval(path, raw["eval"], mcfg)
    hw = _hardware(path, raw.get("hardware", {}), mcfg)
    if tok.kind == "bpe" and tok.vocab_size > mcfg.vocab_size:
        raise RecipeError(f"{path}: [tokenizer] vocab_size: {tok.vocab_size} exceeds [model] vocab_size "
                          f"{mcfg.vocab_size} (the embedding has a row per token)")
    st_raw = raw.get("stages")
    if not isinstance(st_raw, list) or not st_raw or not all(isinstance(s, dict) for s in st_raw):
        raise RecipeError(f"{path}: [[stages]]: missing (give one [[stages]] table per stage)")
    stages, mixtures = [], {}
    for i, t in enumerate(st_raw, 1):
        st, mix = _stage(path, i, t, mcfg, hw)
        if st.name in mixtures:
            raise RecipeError(f"{path}: [stages.{i}] name: duplicate stage name {st.name!r}")
        stages.append(st)
        mixtures[st.name] = mix
    return Recipe(path=path, size=size or mcfg.name, seed=seed, model=mcfg, tokenizer=tok, eval=ev, hardware=hw,
                  stages=stages, mixtures=mixtures, data=_data(path, raw.get("data", {}), mixtures))


def display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def load_recipe_file(path: str | Path) -> Recipe:
    p = Path(path)
    shown = display_path(p)
    if not p.exists():
        raise RecipeError(f"{shown}: recipe file not found")
    if not p.is_file():
        raise RecipeError(f"{shown}: not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_recipe(text, shown)
