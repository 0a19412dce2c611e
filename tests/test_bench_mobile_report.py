"""bench.mobile's report sections beyond the tok/s tables: the goals table with its "why from the profile" lines,
the trained-checkpoint rows (and the worker feeding them real text), and the peers' own runs (llama-bench,
ExecuTorch). Synthetic rows, except the last test: the real CLI on a tiny model standing in for a trained one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.mobile_report import executorch_text, goals_text, llama_bench_text, report_text
from bench.mobile_stats import aggregate

ROOT = Path(__file__).resolve().parents[1]
PROF = {"attention": 0.02, "router": 0.01, "experts": 0.05, "shared": 0.0, "lm_head": 0.02, "other": 0.0}


def _row(size, t, e, rep, tps, rss, profile=None):
    """A worker row whose every phase runs at tps[phase] tok/s; decode of 10 tokens."""
    pre = {k: int(k) / v for k, v in tps.items() if k in ("128", "512")}
    return dict(size=size, threads=t, engine=e, rep=rep, decode_tokens=10, peak_rss_mb=rss, prefill=pre,
                decode={"0": 10 / tps["d0"]}, profile={"0": {k: v * 10 for k, v in (profile or {}).items()}})


def _goal_rows():
    rows = []
    for rep in range(2):
        for t in (1, 2):
            # S at 1 thread meets every goal; S at 2 threads misses decode and RSS; M misses prefill 128
            s_ours = {"128": 130.0, "512": 130.0, "d0": 150.0 if t == 1 else 120.0}
            rows += [_row("S", t, "ours", rep, s_ours, 50.0 if t == 1 else 90.0, PROF),
                     _row("S", t, "llama.cpp", rep, {"128": 100.0, "512": 100.0, "d0": 100.0}, 100.0),
                     _row("M", t, "ours", rep, {"128": 110.0, "512": 130.0, "d0": 150.0}, 50.0, PROF),
                     _row("M", t, "llama.cpp", rep, {"128": 100.0, "512": 100.0, "d0": 100.0}, 100.0),
                     _row("dense-1B", t, "ours", rep, {"128": 30.0, "512": 30.0, "d0": 40.0}, 60.0, PROF),
                     _row("dense-1B", t, "llama.cpp", rep, {"128": 30.0, "512": 30.0, "d0": 30.0}, 120.0)]
    return rows


def test_goals_table_has_a_row_per_size_and_thread_and_explains_every_miss():
    sizes, threads = ["S", "M", "dense-1B"], [1, 2]
    agg = aggregate(_goal_rows(), sizes, threads, ["ours", "llama.cpp"], [128, 512], [0])
    # S reads 0.2 GB a token: 150 tok/s * 0.2 GB / 37.5 GB/s = 80% (met), 120 tok/s at 2 threads: 64% (missed)
    bw = {1: dict(best_gbs=37.5, median_gbs=37.0), 2: dict(best_gbs=37.5, median_gbs=37.0)}
    read = {"S": 200_000_000, "M": 200_000_000, "dense-1B": 600_000_000}
    md = goals_text(agg, sizes, threads, ["ours", "llama.cpp"], bw, read, {"S": {"ours": 7e8}})
    assert "| S | 1 | 1.50x met | 1.30x met | 1.30x met | 80.0% met | 3.75x met | 0.50x met |" in md
    assert "| S | 2 | 1.20x **missed** | 1.30x met | 1.30x met | 64.0% **missed** | 3.00x **missed** | " \
           "0.90x **missed** |" in md
    # M: the MoE / dense ratio is shown, the goal is stated for S only
    assert "| M | 1 | 1.50x met | 1.10x **missed** | 1.30x met | 80.0% met | 3.75x (goal stated for S) | 0.50x met |" in md
    assert "| dense-1B |" not in md  # the goals are stated for S, M and L
    whys = [ln for ln in md.splitlines() if ln.startswith("- **")]
    assert [w.split("**")[1] for w in whys] == ["S, 2 threads", "M, 1 thread", "M, 2 threads"]  # S/1 met all
    s2 = whys[0]
    assert "missed: decode, roofline, moe/dense, rss" in s2
    # the profile's shares (attention 2 / 10 ms) and the bytes per token against the bandwidth
    assert "attention 20%" in s2 and "experts 50%" in s2 and "lm_head 20%" in s2 and "shared 0%" not in s2
    assert "(experts: routed and shared, timed together)" in s2  # S has a shared expert; no timer of its own
    assert "it reads 200 MB a token at 120.00 tok/s = 24.0 GB/s of STREAM's 37.5 GB/s (64%)" in s2
    assert "llama.cpp decodes 100.00 tok/s" in s2
    assert "the bytes-read ratio dense-1B / S = 3.00x" in s2
    assert "peak RSS ours 90 MB (the .mmoe is 700 MB) vs llama.cpp 100 MB" in s2
    assert "prefill 128: ours 110.0 vs llama.cpp 100.0 tok/s" in whys[1]


def test_goals_need_a_goal_size_and_both_engines():
    agg = aggregate(_goal_rows(), ["dense-1B"], [1], ["ours", "llama.cpp"], [128], [0])
    bw = {1: dict(best_gbs=10.0, median_gbs=9.0)}
    assert "No S, M or L size in this run" in goals_text(agg, ["dense-1B"], [1], ["ours", "llama.cpp"], bw,
                                                           {"dense-1B": 1})
    rows = [r for r in _goal_rows() if r["engine"] == "ours"]
    agg = aggregate(rows, ["S"], [1], ["ours"], [128, 512], [0])
    md = goals_text(agg, ["S"], [1], ["ours"], bw, {"S": 200_000_000})
    assert "did not time both engines" in md and "| S | 1 | — (not measured) |" in md


def _trained_meta(skipped=()):
    return dict(source="runs/tiny/model.mmoe", gguf="", config={"name": "tiny", "n_experts": 16, "top_k": 2,
                                                                "router_score": "softmax"},
                text="the held-out plays", text_tokens=1000, tokenizer="runs/tiny/tokenizer.json",
                skipped=list(skipped), context_limit=512)


def _stats(d, ld):
    return dict(n_experts=16, layers=len(d), distinct=d, distinct_min=min(d), distinct_median=sorted(d)[len(d) // 2],
                load_max_mean=ld, load_median=sorted(ld)[len(ld) // 2], load_worst=max(ld))


def _report(agg, sizes, trained, note="", peer_dirs=()):
    labels = sizes + list(trained)
    bw = {1: dict(best_gbs=10.0, median_gbs=9.0)}
    return report_text(agg, sizes, [1], ["ours", "llama.cpp"], [128], [0, 1024], bw, {}, dict.fromkeys(labels, 2),
                       dict.fromkeys(labels, 10), dict.fromkeys(labels, 1e6), dict.fromkeys(labels, 1e6),
                       {s: {"ours": 1e6, "llama.cpp": 1e6} for s in labels}, [], "now", 1.0, "0", "0",
                       trained=trained, trained_note=note, peer_dirs=peer_dirs)


def test_trained_rows_get_their_own_tables_and_routing_but_no_moe_vs_dense_ratio():
    lab = "tiny (trained)"
    meta = _trained_meta(skipped=["decode @ctx 1024"])
    rows = []
    for rep in range(2):
        for size in ("S", "dense-1B", lab):
            o = _row(size, 1, "ours", rep, {"128": 200.0, "d0": 40.0}, 40.0, PROF)
            ll = _row(size, 1, "llama.cpp", rep, {"128": 100.0, "d0": 20.0}, 60.0)
            if size == lab:
                o["trained"] = ll["trained"] = meta
                o["routing"] = {"prefill": {"128": _stats([13, 15, 16], [4.0, 3.0, 5.4])}}
            rows += [o, ll]
    agg = aggregate(rows, ["S", "dense-1B", lab], [1], ["ours", "llama.cpp"], [128], [0, 1024], trained={lab})
    assert not [k for k in agg["ratio_moe"] if k[0] == lab]
    md = _report(agg, ["S", "dense-1B"], {lab: meta})
    sec = md.split("## Trained checkpoints (real routing)", 1)[1].split("## Plots", 1)[0]
    assert "- **tiny (trained)**: `runs/tiny/model.mmoe` (preset tiny: 16 experts, top-2, softmax router); text: the " \
           "held-out plays, 1000 tokens by `runs/tiny/tokenizer.json`; not timed (past its 512-token context): " \
           "decode @ctx 1024." in sec
    assert "| tiny (trained) | 1 | ours | 200.0 | 40.00 | — |" in sec
    assert "| tiny (trained) | 1 | 2.00 | 2.00 | — |" in sec  # ours / llama.cpp, pair by pair
    assert "| tiny (trained) | prefill 128 | 128 | 16 | 3 | 13 | 15.0 | 4.00 | 5.40 | 2 |" in sec
    assert "The paper presets (S) have no trained checkpoint here" in sec
    assert "tiny (trained)" not in md.split("## Results", 1)[1].split("## Trained checkpoints", 1)[0]


def test_absent_trained_checkpoint_is_stated_with_how_to_make_it():
    rows = [_row("S", 1, e, 0, {"128": 100.0, "d0": 10.0}, 10.0) for e in ("ours", "llama.cpp")]
    agg = aggregate(rows, ["S"], [1], ["ours", "llama.cpp"], [128], [0])
    md = _report(agg, ["S"], {}, note="runs/tiny/model.mmoe was absent; `make train` makes it")
    assert "**No trained-checkpoint rows in this run**: runs/tiny/model.mmoe was absent; `make train` makes it." in md
    assert "The paper presets (S) have no trained checkpoint here" in md


def test_llama_bench_section_summarises_its_own_run(tmp_path):
    rows = []
    for rep in range(2):
        lb = {"pp128": 100.0, "pp512": 90.0, "tg64": 40.0, "tg64@d1024": 15.0}
        rows += [dict(size="S", threads=1, rep=rep, method="llama-bench", tps=lb, build_commit="b1234"),
                 dict(size="S", threads=1, rep=rep, method="llama.cpp driver",
                      tps={k: v * (0.9 if k == "pp128" else 1.1) for k, v in lb.items()}),
                 dict(size="S", threads=1, rep=rep, method="ours driver", tps={k: 2 * v for k, v in lb.items()})]
    (tmp_path / "llama_bench_raw.json").write_text(json.dumps(dict(commit=dict(head="abc", mobile_c_dirty=False),
                                                                   llama_cpp_python="0.3.36", rows=rows)))
    (tmp_path / "llama_bench.md").write_text("Generated by `python -m bench.llama_bench` on 2026-12-01 23:55 UTC in 1 min")
    md = llama_bench_text(tmp_path / "llama_bench_raw.json")
    assert "its own run, not this one" in md
    assert "generated 2026-12-01 23:55 UTC; engine commit abc (mobile/c clean); llama.cpp b1234" in md
    assert "llama.cpp driver / llama-bench over every size, thread count and shape: 0.90-1.10x" in md
    assert "| S | 1 | 2.00 | 2.00 | 2.00 | 2.00 | 0.90-1.10x |" in md
    assert "Not run: `make bench-llama`" in llama_bench_text(None)


def test_executorch_section_gives_rows_ratios_and_the_native_failure(tmp_path):
    def et_row(e, rep, pre, dec, rss):
        return dict(size="dense-1B", threads=1, engine=e, rep=rep, decode_tokens=10, peak_rss_mb=rss,
                    prefill={"128": 128 / pre}, decode={"0": 10 / dec},
                    engine_commit=dict(head="def", mobile_c_dirty=False))
    rows = [et_row("ours", i, 60.0, 20.0, 600.0) for i in range(2)] + \
        [et_row("executorch", i, 30.0, 5.0, 1200.0) for i in range(2)]
    err = "RuntimeError: Missing out variants: {'mobilemoe::moe_experts'}"
    exports = [dict(size="dense-1B", form="kvcache", ok=True),
               dict(size="S", form="native", ok=False, failed_step="to_executorch", error=err)]
    raw = tmp_path / "executorch_raw.json"
    raw.write_text(json.dumps(dict(versions={"executorch": "1.5.1", "git": "0123abc"}, rows=rows, exports=exports)))
    md = executorch_text(raw)
    assert "its own run, not this one" in md and "repository at git 0123abc, engine commit def (mobile/c clean)" in md
    assert f"| S | native | **failed at to_executorch**: `{err}` |" in md
    assert "| dense-1B | 1 | ours | 2 | 60.0 | 20.0 | 600 |" in md
    assert "| dense-1B | 1 | executorch | 2 | 30.0 | 5.0 | 1200 |" in md
    assert "| dense-1B | 1 | ours / executorch |  | 2.00 | 4.00 |  |" in md
    assert "No ExecuTorch rows for S, M, L in that run." in md
    raw.write_text(json.dumps(dict(versions={}, rows=[], exports=exports[1:], status="no timed rows yet")))
    md = executorch_text(raw)
    assert "**No timed rows** (its status: no timed rows yet)" in md and "**failed at to_executorch**" in md
    assert "Not run: `make bench-executorch`" in executorch_text(None)


class _IdsRunner:
    """Records the ids of every eval and the cache length it started from."""

    log: list = []

    def __init__(self, path, threads):
        self.kernels, self.pos = "fake", 0
        _IdsRunner.log = []

    def reset(self):
        self.pos = 0

    def eval(self, ids):
        _IdsRunner.log.append((self.pos, list(ids)))
        self.pos += len(ids)

    def profile_reset(self):
        pass

    def profile(self):
        return {}

    def routing_reset(self):
        pass

    def routing(self):
        return {}

    def close(self):
        pass


def test_worker_feeds_a_trained_model_the_text_in_order(tmp_path, monkeypatch):
    import bench.mobile_driver as driver
    import bench.mobile_runners as runners

    monkeypatch.setattr(runners, "OursRunner", _IdsRunner)
    text = list(range(1000, 1400))
    (tmp_path / "ids.json").write_text(json.dumps(text))
    plan = dict(seed=0, id_range=[0, 5000], prompts=[8, 16], decode_contexts=[0, 20], decode_tokens=3,
                ids_file=str(tmp_path / "ids.json"), text_offset=7)
    driver.worker("ours", "unused", 1, plan)
    fed = [ids for _, ids in _IdsRunner.log[1:]]  # after the warm-up token
    assert _IdsRunner.log[0] == (0, [1007])
    flat = [t for ids in fed for t in ids]
    assert flat == text[7:7 + len(flat)]  # every phase reads on in the text, none re-reads it
    # within a cache the text continues: ctx 20 continues prompt 16's cache, then decodes the next 3 tokens
    starts = [(pos, len(ids)) for pos, ids in _IdsRunner.log[1:]]
    assert starts[:4] == [(0, 8), (0, 16), (16, 4), (20, 1)]
    assert len(flat) <= driver.text_span([8, 16], [0, 20], 3)
    with pytest.raises(ValueError, match="the text has 400 tokens"):
        driver.worker("ours", "unused", 1, dict(plan, text_offset=390))


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "bench.mobile", *args], capture_output=True, text=True, cwd=ROOT,
                          **kw)


def test_cli_refuses_unusable_trained_checkpoints(tmp_path):
    p = _cli("--trained", str(tmp_path / "nope.mmoe"))
    assert p.returncode == 2 and p.stderr.startswith("error:") and "no such file" in p.stderr
    (tmp_path / "x.mmoe").write_bytes(b"not a model")
    p = _cli("--trained", str(tmp_path / "x.mmoe"))
    assert p.returncode == 2 and "no tokenizer.json beside it" in p.stderr
    (tmp_path / "tokenizer.json").write_text("{}")
    p = _cli("--trained", str(tmp_path / "x.mmoe"))
    assert p.returncode == 2 and "not a .mmoe file" in p.stderr and p.stderr.count("\n") == 1


def _llama_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def test_trained_checkpoint_end_to_end(tmp_path):
    """The real CLI, engine(s) and workers with a tiny model standing in for a trained checkpoint: its own
    tokenizer.json beside it and a text file; the rows carry the checkpoint's record, the routing table has its
    rows and the prompt past its context is skipped and listed."""
    from tests._mobile_util import build_engine
    from train.tokenizer import train_bpe

    build_engine()
    ck = tmp_path / "ck"
    ck.mkdir()
    subprocess.run([sys.executable, "-m", "mobile", "export", "--random-init", "--size", "tiny", "--out",
                    str(ck / "model.mmoe")], check=True, capture_output=True, cwd=ROOT)
    text = " ".join(f"the {w} of the play is {w}." for w in ("king", "queen", "fool", "ghost", "storm") * 80)
    tok = train_bpe([text], 300)
    tok.save(str(ck / "tokenizer.json"))
    (tmp_path / "text.txt").write_text(text)
    # what does not fit the checkpoint's context is skipped and listed (a random size's run would refuse it)
    from bench import mobile_driver as driver

    models, plans = driver.prepare_trained([ck / "model.mmoe"], tmp_path / "prep", print, [128, 600], [0, 1024],
                                           16, (text, "the text"), 2048, gguf=False, taken={"tiny"})
    pl = plans["tiny (trained)"]
    assert pl["prompts"] == [128] and pl["contexts"] == [0] and pl["meta"]["context_limit"] == 512
    assert pl["meta"]["skipped"] == ["prefill 600", "decode @ctx 1024"]
    assert json.loads(Path(pl["ids_file"]).read_text()) == tok.encode(text).ids
    engines = "ours,llama.cpp" if _llama_installed() else "ours"
    out = tmp_path / "out"
    p = _cli("--sizes", "tiny", "--threads", "1", "--repeats", "1", "--prompts", "16", "--decode-contexts", "0,500",
             "--decode-tokens", "4", "--engines", engines, "--stream-mib", "8", "--stream-repeats", "2",
             "--trained", str(ck / "model.mmoe"), "--trained-text", str(tmp_path / "text.txt"),
             "--work", str(tmp_path / "work"), "--out", str(out), timeout=300)
    assert p.returncode == 0, p.stderr
    md = (out / "mobile.md").read_text()
    sec = md.split("## Trained checkpoints (real routing)", 1)[1].split("## Plots", 1)[0]
    n_tokens = len(tok.encode(text).ids)
    assert f"text: {tmp_path / 'text.txt'} (--trained-text), {n_tokens} tokens by `{ck / 'tokenizer.json'}`" in sec
    assert "| tiny (trained) | 1 | ours | " in sec
    assert "| tiny (trained) | prefill 16 | 16 | 16 | 4 |" in sec and "| tiny (trained) | decode @ctx 0 | 4 |" in sec
    raw = json.loads((out / "mobile_raw.json").read_text())
    tr = [r for r in raw["rows"] if r["size"] == "tiny (trained)"]
    assert {r["engine"] for r in tr} == set(engines.split(","))
    assert all(r["trained"]["source"] == str(ck / "model.mmoe") for r in tr)
    assert raw["trained"]["tiny (trained)"]["text_tokens"] == n_tokens
    # the Method names what reached the kernels: the kernel set each engine's workers reported
    ours_ks = {r["kernels"] for r in raw["rows"] if r["engine"] == "ours"}
    assert len(ours_ks) == 1 and f"kernel set reported: `{ours_ks.pop()}`" in md.split("## Results", 1)[0]
    assert "**Dtypes and kernels that ran:** ours: INT4 g32 weights" in md
    if "llama.cpp" in engines:
        assert "| tiny (trained) | 1 | llama.cpp | " in sec and Path(tr[0]["trained"]["gguf"]).is_file()
    # --from-raw rebuilds the same trained section from the saved rows alone
    p = _cli("--sizes", "tiny", "--threads", "1", "--prompts", "16", "--decode-contexts", "0,500", "--decode-tokens",
             "4", "--engines", engines, "--from-raw", str(out / "mobile_raw.json"), "--work", str(tmp_path / "work"), "--out",
             str(tmp_path / "out2"), timeout=300)
    assert p.returncode == 0, p.stderr
    md2 = (tmp_path / "out2" / "mobile.md").read_text()
    assert md2.split("## Trained checkpoints (real routing)", 1)[1].split("## Plots", 1)[0] == sec
    # ... and describes the machine (and versions, git included) that measured the rows, not the rebuilding one
    machine = lambda m: m.split("## Machine", 1)[1].split("- Load average", 1)[0]  # noqa: E731
    assert machine(md2) == machine(md)
    assert f"at start: {raw['rows'][0]['loadavg']}; at end: {raw['rows'][-1]['loadavg']}" in md2


def test_default_trained_checkpoint_is_best_effort(tmp_path, monkeypatch):
    """--trained auto (the default) times runs/tiny/model.mmoe when usable; absent or unusable, the run goes on
    and the report says why and how to make it. An explicitly named file must be usable."""
    import bench.mobile as bm
    from model.cli import BadInput

    monkeypatch.setattr(bm, "REPO", tmp_path)
    monkeypatch.setattr(bm, "DEFAULT_TRAINED", tmp_path / "runs" / "tiny" / "model.mmoe")
    paths, note = bm._trained_paths("auto")
    assert paths == [] and "runs/tiny/model.mmoe" in note and "absent" in note and "`make train`" in note
    bm.DEFAULT_TRAINED.parent.mkdir(parents=True)
    bm.DEFAULT_TRAINED.write_bytes(b"x")
    paths, note = bm._trained_paths("auto")
    assert paths == [] and "is not usable" in note and "no tokenizer.json" in note
    with pytest.raises(BadInput, match="no tokenizer.json"):
        bm._trained_paths(str(bm.DEFAULT_TRAINED))
    assert bm._trained_paths("none") == ([], "none was asked for (--trained none)")
