"""bench.mobile's measuring side: the random-weight model files, the trained checkpoints (their GGUF twins and
the real text they are fed), the worker (one fresh process per engine, model and thread count, printing one JSON
line) and the interleaved repeat loop that starts the workers.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import mobile_runners as runners
from bench.machine import loadavg, run_cmd
from model.atomic import atomic_write
from model.config import ModelConfig, get_config

MODEL_FORMAT = 4  # bump when the random models change: 4 = model/init.py's balanced random init


# ================================================================================================
# Worker side: one fresh process per (engine, model, threads); prints one JSON line.
# ================================================================================================
def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _runner(engine: str, model: str, threads: int):
    # looked up on the module at call time, so a test can stand a fake engine in for either
    return runners.OursRunner(model, threads) if engine == "ours" else runners.LlamaRunner(model, threads)


class _TextIds:
    """Teacher-forced ids of a real text (plan["ids_file"], a JSON list), read forward from plan["text_offset"]:
    within one cache every eval continues the text, so each cached context and decoded token is the text's own next
    token and a trained model routes them as it routes real text; each timed phase reads text no earlier phase
    read (after a reset the cache restarts mid-text, as a prompt may)."""

    def __init__(self, path: str, offset: int):
        self.ids = [int(x) for x in json.loads(Path(path).read_text())]
        self.start = self.cur = offset

    def take(self, n: int) -> list[int]:
        if self.cur + n > len(self.ids):
            raise ValueError(f"the text has {len(self.ids)} tokens, the plan needs {self.cur + n}")
        out, self.cur = self.ids[self.cur:self.cur + n], self.cur + n
        return out


def worker(engine: str, model: str, threads: int, plan: dict) -> dict:
    rng = np.random.default_rng(plan["seed"])
    t0 = time.perf_counter()
    r = _runner(engine, model, threads)
    out: dict = dict(engine=engine, threads=threads, load_s=time.perf_counter() - t0, kernels=r.kernels,
                     prefill={}, decode={}, profile={}, routing={"prefill": {}, "decode": {}})
    lo, hi = plan["id_range"]
    text = _TextIds(plan["ids_file"], plan.get("text_offset", 0)) if plan.get("ids_file") else None

    def ids_for(n: int) -> list[int]:
        return text.take(n) if text else [int(x) for x in rng.integers(lo, hi, n)]

    # warm-up: first-touch of the code paths and mmap'd weights
    r.eval(text.ids[text.start:text.start + 1] if text else [int(rng.integers(lo, hi))])
    prompts = sorted(plan["prompts"])
    for n in prompts:
        r.reset()
        ids = ids_for(n)
        r.routing_reset()
        t = time.perf_counter()
        r.eval(ids)
        out["prefill"][str(n)] = time.perf_counter() - t
        out["routing"]["prefill"][str(n)] = r.routing()
    # The cache now holds the longest prompt (pos = prompts[-1]). The first decode context at least that long
    # starts from it and prefills only the rest, untimed: the same state as a fresh prefill of ctx random ids,
    # and on the largest models it saves a third of the worker's prompt tokens.
    pos, reuse = (prompts[-1], True) if prompts else (0, False)
    for ctx in sorted(plan["decode_contexts"], key=lambda c: (c < pos, c)):
        if not (reuse and pos <= ctx):
            r.reset()
            pos = 0
        reuse = False  # only the first context may start from the prompt's cache
        if ctx > pos:
            r.eval(ids_for(ctx - pos))
        ids = ids_for(plan["decode_tokens"])
        r.profile_reset()
        r.routing_reset()
        t = time.perf_counter()
        for tok in ids:
            r.eval([tok])
        out["decode"][str(ctx)] = time.perf_counter() - t
        out["profile"][str(ctx)] = r.profile()
        out["routing"]["decode"][str(ctx)] = r.routing()
    out["peak_rss_mb"] = _peak_rss_mb()
    r.close()
    return out


# ================================================================================================
# Driver side
# ================================================================================================
def model_paths(size: str, work: Path) -> dict[str, Path]:
    return {"ours": work / f"{size}-random.mmoe", "llama.cpp": work / f"{size}-random-q4_0.gguf"}


def _read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):  # absent, or torn by a killed run: the models are rebuilt
        return None


def prepare_models(sizes: list[str], work: Path, seed: int, log, gguf: bool = True) -> dict[str, dict[str, Path]]:
    """{size: {"ours": .mmoe, "llama.cpp": .gguf}}; reuses a .mmoe whose stamp (size, seed, format and the
    preset's whole config, so an edited preset is never measured from a stale file) matches.
    The .gguf is derived from that .mmoe, so it is deleted whenever the .mmoe is rebuilt, and (gguf=False, a
    run without llama.cpp) only made when asked for."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in sizes:
        paths = model_paths(s, work)
        mm, gg = paths["ours"], paths["llama.cpp"]
        stamp = work / f"{s}.stamp.json"
        want = dict(size=s, seed=seed, format=MODEL_FORMAT, config=get_config(s).to_dict())
        if not (_read_stamp(stamp) == want and mm.is_file()):
            stamp.unlink(missing_ok=True)
            gg.unlink(missing_ok=True)
            t = time.time()
            run_cmd([sys.executable, "-m", "mobile", "export", "--random-init", "--size", s, "--seed", str(seed),
                     "--out", str(mm)])
            log(f"  exported {mm.name} ({mm.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f} s")
            stamp.write_text(json.dumps(want))
        if gguf and not gg.is_file():
            from mobile.gguf_export import mmoe_to_gguf  # noqa: PLC0415  (imports torch: only when needed)

            t = time.time()
            mmoe_to_gguf(mm, gg)  # the same INT4 weights, re-laid out as Q4_0: both engines run one model
            log(f"  exported {gg.name} ({gg.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f} s")
        out[s] = paths
    return out


# ---- trained checkpoints: timed like the random sizes, fed real held-out text --------------------------------
def mmoe_config(path: Path) -> ModelConfig:
    """The ModelConfig a .mmoe file was exported with (its header's config JSON); ValueError if not a .mmoe."""
    from mobile.format import read_header  # noqa: PLC0415

    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
        try:
            h = read_header(head)
            fh.seek(h["config_json_offset"])
            return ModelConfig.from_dict(json.loads(fh.read(h["config_json_size"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a .mmoe file this engine reads ({e})") from None


def heldout_text(repo: Path, text_file: str = "") -> tuple[str, str]:
    """(text, where it came from) for the trained rows: text_file when given, else the held-out Shakespeare plays
    (data/shakespeare, which `make data` / `make train` fetch; train.data.HELDOUT_PLAYS, never trained on), else
    the held-out documents of the offline corpus (data/corpus, train.corpus). ValueError when none exists."""
    if text_file:
        return Path(text_file).read_text(encoding="utf-8", errors="replace"), f"{text_file} (--trained-text)"
    from train.data import HELDOUT_PLAYS, DataError, shakespeare_splits  # noqa: PLC0415

    try:
        return "\n".join(shakespeare_splits(repo / "data" / "shakespeare")[1]), (
            f"the held-out Shakespeare plays ({', '.join(HELDOUT_PLAYS)}; data/shakespeare, never trained on)")
    except DataError:
        pass
    heldout = repo / "data" / "corpus" / "docs" / "heldout.jsonl"
    if heldout.is_file():
        docs = [json.loads(ln)["text"] for ln in heldout.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return "\n".join(docs), ("the held-out documents of data/corpus/docs/heldout.jsonl (data/shakespeare is "
                                  "absent: `make data` fetches it)")
    raise ValueError("no held-out text for the trained rows: data/shakespeare and data/corpus are absent "
                     "(run `make data`, or pass --trained-text FILE)")


def text_span(prompts: list[int], contexts: list[int], decode_tokens: int) -> int:
    """Tokens one worker reads from the text (the warm-up token is re-read, not consumed): every prompt, then every
    context's prefill and decode (an upper bound: the first context may continue from the longest prompt)."""
    return sum(prompts) + sum(c + decode_tokens for c in contexts) + 1


def trained_label(cfg: ModelConfig, taken: set[str]) -> str:
    label, i = f"{cfg.name} (trained)", 2
    while label in taken:
        label, i = f"{cfg.name} (trained #{i})", i + 1
    return label


def prepare_trained(paths: list[Path], work: Path, log, prompts: list[int], contexts: list[int],
                    decode_tokens: int, text: tuple[str, str], max_ctx: int, gguf: bool = True,
                    taken: set[str] = frozenset()) -> tuple[dict, dict]:
    """({label: {"ours": .mmoe, "llama.cpp": .gguf}}, {label: plan}) for trained .mmoe checkpoints. Each one is
    converted to GGUF Q4_0 (mmoe_to_gguf, cached by the .mmoe's size and mtime) and its tokenizer.json (beside
    the .mmoe: the run's tokenizer) encodes `text`; the plan keeps the prompts and decode contexts that fit the
    model's context (the others are listed as skipped) and gives each repeat its own stretch of the text."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    work.mkdir(parents=True, exist_ok=True)
    models, plans, taken = {}, {}, set(taken)
    for path in paths:
        cfg = mmoe_config(path)
        label = trained_label(cfg, taken)
        taken.add(label)
        tok_json = path.parent / "tokenizer.json"
        if not tok_json.is_file():
            raise ValueError(f"{path}: no tokenizer.json beside it (the run's tokenizer encodes the trained rows' text)")
        ids = Tokenizer.from_file(str(tok_json)).encode(text[0]).ids
        if ids and max(ids) >= cfg.vocab_size:
            raise ValueError(f"{tok_json}: token id {max(ids)} >= the model's vocab_size {cfg.vocab_size}")
        limit = min(max_ctx, cfg.max_seq_len)
        fit_p = [p for p in prompts if p <= limit]
        fit_c = [c for c in contexts if c + decode_tokens + 1 <= limit]
        span = text_span(fit_p, fit_c, decode_tokens)
        if len(ids) < span + 1:
            raise ValueError(f"the trained rows' text is {len(ids)} tokens, {label} needs {span + 1}")
        stem = f"trained-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]}"
        ids_file, gg, stamp = work / f"{stem}-ids.json", work / f"{stem}-q4_0.gguf", work / f"{stem}.stamp.json"
        atomic_write(ids_file, json.dumps(ids))
        st = path.stat()
        want = dict(source=str(path.resolve()), bytes=st.st_size, mtime_ns=st.st_mtime_ns)
        if gguf and not (_read_stamp(stamp) == want and gg.is_file()):
            from mobile.gguf_export import mmoe_to_gguf  # noqa: PLC0415  (imports torch: only when needed)

            stamp.unlink(missing_ok=True)
            mmoe_to_gguf(path, gg, force=True)
            atomic_write(stamp, json.dumps(want))
            log(f"  exported {gg.name} from {path} ({gg.stat().st_size / 1e6:.1f} MB)")
        models[label] = {"ours": path, "llama.cpp": gg}
        plans[label] = dict(prompts=fit_p, contexts=fit_c, vocab_size=cfg.vocab_size, ids_file=str(ids_file),
                            span=span, offsets=len(ids) - span,
                            meta=dict(source=str(path), gguf=str(gg) if gguf else "", config=cfg.to_dict(), text=text[1], text_tokens=len(ids),
                                      tokenizer=str(tok_json),
                                      skipped=[f"prefill {p}" for p in prompts if p not in fit_p]
                                      + [f"decode @ctx {c}" for c in contexts if c not in fit_c],
                                      context_limit=limit))
    return models, plans


def run_matrix(models: dict, sizes: list[str], threads: list[int], repeats: dict[str, int], plan_base: dict,
               decode_tokens: dict[str, int], engines: list[str], log, timeout: float,
               on_row: Callable[[list[dict]], None] | None = None, commit: dict | None = None,
               trained: dict[str, dict] | None = None) -> list[dict]:
    """Every (size, threads, engine) once per repeat, engines in alternating order; on_row(rows so far) after
    each worker (so an interrupted run keeps its rows). Each row records `commit`, the engine's git state.
    trained: prepare_trained's plans, for the trained checkpoints among `sizes` (their labels); their rows carry
    the checkpoint's record under "trained"."""
    from model.config import get_config  # noqa: PLC0415

    trained = trained or {}
    rows = []
    for rep in range(max(repeats[s] for s in sizes)):
        for s in sizes:
            if rep >= repeats[s]:
                continue
            if s in trained:  # real text: each repeat its own stretch of it, the same for both engines
                tp = trained[s]
                plan = dict(plan_base, prompts=tp["prompts"], decode_contexts=tp["contexts"],
                            decode_tokens=decode_tokens[s], id_range=[0, tp["vocab_size"]],
                            seed=plan_base["seed"] + rep, ids_file=tp["ids_file"],
                            text_offset=(rep * tp["span"]) % (tp["offsets"] + 1))
            else:
                cfg = get_config(s)
                plan = dict(plan_base, decode_tokens=decode_tokens[s], id_range=[0, cfg.vocab_size],
                            seed=plan_base["seed"] + rep)
            for t in threads:
                order = engines if rep % 2 == 0 else list(reversed(engines))
                for e in order:
                    cmd = [sys.executable, "-m", "bench.mobile", "worker", "--engine", e, "--model",
                           str(models[s][e]), "--threads", str(t), "--plan", json.dumps(plan)]
                    t0 = time.time()
                    res = json.loads(run_cmd(cmd, timeout=timeout).strip().splitlines()[-1])
                    res.update(size=s, rep=rep, decode_tokens=plan["decode_tokens"], loadavg=loadavg(),
                               engine_commit=commit)
                    if s in trained:
                        res["trained"] = trained[s]["meta"]
                    rows.append(res)
                    if on_row is not None:
                        on_row(rows)
                    d0 = res["decode"].get("0")
                    pl = max(plan["prompts"], default=0)
                    pre = pl / res["prefill"][str(pl)] if pl else float("nan")
                    log(f"  rep {rep} {s:>8} t{t} {e:>9}: prefill{pl} {pre:7.1f} tok/s"
                        f"  decode {plan['decode_tokens'] / d0 if d0 else float('nan'):6.2f} tok/s"
                        f"  rss {res['peak_rss_mb']:.0f} MB  ({time.time() - t0:.0f} s, load {loadavg()})")
    return rows
