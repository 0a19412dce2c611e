"""bench.mobile (bench/mobile*.py, bench/machine.py): pair-by-pair ratios, medians, routing statistics, the
report, the STREAM triad program, the CLI's errors, and one tiny end-to-end run of the real engine (the smallest
options the CLI allows). The real benchmark is `make bench-mobile`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.mobile import parse_kv_ints, parse_repeats
from bench.mobile_report import goals_text, report_text
from bench.mobile_stats import aggregate

ROOT = Path(__file__).resolve().parents[1]


def _row(size, t, e, rep, pre512, dec0):
    # times for the given tokens/s: prefill 512 tokens, decode 10 tokens
    return dict(size=size, threads=t, engine=e, rep=rep, decode_tokens=10, peak_rss_mb=100.0 + rep,
                prefill={"512": 512 / pre512}, decode={"0": 10 / dec0},
                profile={"0": {"attention": 0.01, "experts": 0.03}} if e == "ours" else {"0": {}})


def test_ratios_are_pair_by_pair_medians():
    rows = []
    # ours/llama per repeat: 2.0, 2.0, 10.0 -> median 2.0 (the ratio of the medians would be 30/10 = 3.0)
    ours_dec, llama_dec = [20.0, 30.0, 100.0], [10.0, 15.0, 10.0]
    for i in range(3):
        rows += [_row("S", 1, "ours", i, 100.0, ours_dec[i]), _row("S", 1, "llama.cpp", i, 50.0, llama_dec[i]),
                 _row("dense-1B", 1, "ours", i, 25.0, ours_dec[i] / 4), _row("dense-1B", 1, "llama.cpp", i, 20.0, 5.0)]
    agg = aggregate(rows, ["S", "dense-1B"], [1], ["ours", "llama.cpp"], [512], [0])
    assert agg["med"][("S", 1, "ours", "decode", "0")] == pytest.approx(30.0)
    assert agg["ratio_eng"][("S", 1, "decode", "0")] == pytest.approx(2.0)
    assert agg["ratio_eng"][("S", 1, "prefill", "512")] == pytest.approx(2.0)
    assert agg["ratio_moe"][("S", "dense-1B", 1, "ours", "decode", "0")] == pytest.approx(4.0)
    assert agg["ratio_moe"][("S", "dense-1B", 1, "ours", "prefill", "512")] == pytest.approx(4.0)
    assert agg["med"][("S", 1, "ours", "profile", "0")]["experts"] == pytest.approx(0.003)
    bw = {1: dict(best_gbs=10.0, median_gbs=9.0)}
    read = {"S": 200_000_000, "dense-1B": 600_000_000}
    goals = goals_text(agg, ["S", "dense-1B"], [1], ["ours", "llama.cpp"], bw, read)
    # ours/llama decode 2.0 >= 1.4 met; prefill 512 2.0 >= 1.2 met (128 not measured); roofline 30 tok/s * 0.2 GB /
    # 10 GB/s = 60% < 75% missed; S / dense-1B 4.0 >= 3.3 met; RSS ratio (101 / 101) = 1.0 > 0.55 missed
    assert "| S | 1 | 2.00x met | — (not measured) | 2.00x met | 60.0% **missed** | 4.00x met | 1.00x **missed** |" \
        in goals
    md = report_text(agg, ["S", "dense-1B"], [1], ["ours", "llama.cpp"], [512], [0], bw, {"cpu": "x"},
                     {"S": 3, "dense-1B": 3}, {"S": 10, "dense-1B": 10}, {"S": 1, "dense-1B": 2}, read,
                     {"S": {"ours": 1, "llama.cpp": 1}, "dense-1B": {"ours": 1, "llama.cpp": 1}}, ["a.png"],
                     "now", 60.0, "1 1 1", "1 1 1")
    assert "| S | 1 | ours | 100.0 | 30.00 | 60.0 | 101 |" in md
    assert "| S | 1 | 2.00 | 2.00 |" in md
    assert "![a.png](a.png)" in md


def test_unpaired_rows_give_no_ratio():
    rows = [_row("S", 1, "ours", 0, 100.0, 20.0), _row("S", 1, "llama.cpp", 1, 50.0, 10.0)]
    agg = aggregate(rows, ["S"], [1], ["ours", "llama.cpp"], [512], [0])
    r = agg["ratio_eng"][("S", 1, "decode", "0")]
    assert r != r  # NaN: repeats 0 and 1 are not a pair


def test_option_parsing():
    assert parse_repeats("4", ["S", "M"]) == {"S": 4, "M": 4}
    assert parse_repeats("S=5,M=3", ["S", "M", "L"]) == {"S": 5, "M": 3, "L": 3}
    assert parse_kv_ints("L=32", ["S", "L"], 128) == {"S": 128, "L": 32}


def test_option_parsing_rejects_bad_specs():
    from model.cli import BadInput

    for spec in ("X=3", "S=0", "S=x", "2,3", "0"):
        with pytest.raises(BadInput, match="--repeats"):
            parse_repeats(spec, ["S", "M"])
    with pytest.raises(BadInput, match="--decode-tokens-by-size"):
        parse_kv_ints("L32", ["S", "L"], 128)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "bench.mobile", *args], capture_output=True, text=True, cwd=ROOT,
                          **kw)


@pytest.mark.parametrize("args,msg", [
    (["--sizes", "XL"], "unknown size"),
    (["--engines", "ours,foo"], "--engines"),
    (["--threads", "0"], "--threads"),
    (["--prompts", "a,b"], "--prompts"),
    (["--sizes", "tiny", "--engines", "ours", "--prompts", "600"], "512-token context of tiny"),
    (["--sizes", "S", "--repeats", "M=2"], "--repeats"),
])
def test_cli_bad_input_is_one_line_error(args, msg):
    p = _cli(*args)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and msg in p.stderr and p.stderr.startswith("error:")


def test_cli_parse_time_range_errors_exit_2():
    p = _cli("--stream-mib", "4")  # below bench/stream.c's minimum array size: refused before anything runs
    assert p.returncode == 2 and "--stream-mib" in p.stderr and "Traceback" not in p.stderr


def test_cli_help_shows_every_option_with_its_default():
    from bench.mobile import build_parser

    p = _cli("--help")
    assert p.returncode == 0
    lines = p.stdout.split("options:", 1)[1].splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("  -")]  # each option's help entry begins here
    entries = {" ".join(lines[i].split()[:1]): " ".join(" ".join(lines[i:j]).split())
               for i, j in zip(starts, starts[1:] + [len(lines)])}
    actions = [a for a in build_parser()._actions if "--help" not in a.option_strings]
    assert sorted(entries) == sorted(["-h,"] + [a.option_strings[0] for a in actions])
    for a in actions:
        default = "none" if a.default == "" else str(a.default)  # "" shows as "none" (see bench/mobile.py)
        assert f"(default: {default})" in entries[a.option_strings[0]], a.option_strings[0]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc missing")
def test_stream_triad_runs_and_checks(tmp_path):
    exe = tmp_path / "stream"
    src = Path(__file__).resolve().parents[1] / "bench" / "stream.c"
    subprocess.run(["gcc", "-O2", "-fopenmp", str(src), "-o", str(exe)], check=True)
    out = json.loads(subprocess.run([str(exe), "1", "8", "3"], capture_output=True, text=True, check=True).stdout)
    assert out["threads"] == 1 and out["best_gbs"] > 0 and out["best_gbs"] >= out["median_gbs"]
    bad = subprocess.run([str(exe), "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


class _FakeRunner:
    """Stands in for an engine: records the cache length each timed phase starts from."""

    log: list = []

    def __init__(self, path, threads):
        self.kernels, self.pos = "fake", 0
        _FakeRunner.log = []

    def reset(self):
        self.pos = 0

    def eval(self, ids):
        _FakeRunner.log.append((self.pos, len(ids)))
        self.pos += len(ids)

    def profile_reset(self):
        _FakeRunner.log.append(("decode", self.pos))

    def profile(self):
        return {}

    def routing_reset(self):
        _FakeRunner.log.append(("routing", self.pos))

    def routing(self):
        return {"since": _FakeRunner.log[-1]}

    def close(self):
        pass


@pytest.mark.parametrize("prompts,contexts", [([512, 128], [0, 1024]), ([128], [0, 64]), ([], [1024, 0])])
def test_worker_decodes_at_exactly_the_asked_context(monkeypatch, prompts, contexts):
    import bench.mobile_driver as driver
    import bench.mobile_runners as runners

    monkeypatch.setattr(runners, "OursRunner", _FakeRunner)
    plan = dict(seed=0, id_range=[1, 200], prompts=prompts, decode_contexts=contexts, decode_tokens=3)
    out = driver.worker("ours", "unused", 1, plan)
    starts = [e[1] for e in _FakeRunner.log if e[0] == "decode"]
    assert sorted(starts) == sorted(contexts)  # every decode starts with exactly ctx tokens cached
    assert sorted(out["decode"]) == sorted(map(str, contexts))
    prefills = [e for e in _FakeRunner.log if e[0] == 0 and e[1] in prompts]
    assert sorted(n for _, n in prefills) == sorted(prompts)  # each timed prompt from an empty cache
    # routing is counted over each timed phase alone: reset right before it, read right after it
    assert sorted(out["routing"]["prefill"]) == sorted(map(str, prompts))
    assert sorted(out["routing"]["decode"]) == sorted(map(str, contexts))
    for n in prompts:
        assert out["routing"]["prefill"][str(n)]["since"] == (0, n)  # the prompt's eval, from an empty cache
    for c in contexts:
        assert out["routing"]["decode"][str(c)]["since"] == (c + 2, 1)  # the last of 3 decode evals


def _stats(distinct, load):
    return dict(n_experts=16, layers=len(distinct), distinct=distinct, distinct_min=min(distinct),
                distinct_median=sorted(distinct)[len(distinct) // 2], load_max_mean=load,
                load_median=sorted(load)[len(load) // 2], load_worst=max(load))


def test_routing_summary_takes_worst_layers_and_median_runs():
    rows = []
    for rep, (d, ld) in enumerate([([16, 15, 16], [1.5, 2.0, 1.2]), ([16, 12, 16], [1.4, 3.0, 1.3]),
                                   ([16, 16, 16], [1.1, 1.2, 1.0])]):
        r = _row("S", 1, "ours", rep, 100.0, 20.0)
        r["routing"] = {"prefill": {"512": _stats(d, ld)}, "decode": {"0": _stats(d, ld)}}
        rows += [r, _row("S", 1, "llama.cpp", rep, 50.0, 10.0)]
    rows.append(_row("S", 2, "ours", 0, 100.0, 20.0))  # a row from before the counters: skipped, no error
    agg = aggregate(rows, ["S"], [1, 2], ["ours", "llama.cpp"], [512], [0])
    r = agg["routing"][("S", "prefill", "512")]
    assert r["runs"] == 3 and r["tokens"] == 512 and r["n_experts"] == 16 and r["layers"] == 3
    assert r["distinct_min"] == 12  # the worst layer of any run
    assert r["distinct_median"] == 16 and r["load_median"] == pytest.approx(1.4)  # medians over runs (of 1.5, 1.4, 1.1)
    assert r["load_worst"] == pytest.approx(3.0)
    assert agg["routing"][("S", "decode", "0")]["tokens"] == 10  # the row's decode_tokens
    bw = {1: dict(best_gbs=10.0, median_gbs=9.0), 2: dict(best_gbs=12.0, median_gbs=11.0)}
    commit = dict(head="abc123", mobile_c_dirty=True)
    md = report_text(agg, ["S"], [1, 2], ["ours", "llama.cpp"], [512], [0], bw, {}, {"S": 3}, {"S": 10},
                     {"S": 1}, {"S": 1}, {"S": {"ours": 1, "llama.cpp": 1}}, [], "now", 1.0, "0", "0",
                     commits=[commit])
    assert "| S | prefill 512 | 512 | 16 | 3 | 12 | 16.0 | 1.40 | 3.00 | 3 |" in md
    assert "| S | decode @ctx 0 | 10 | 16 | 3 | 12 | 16.0 | 1.40 | 3.00 | 3 |" in md
    assert "**Engine commit**: abc123 (mobile/c has uncommitted changes)." in md
    md = report_text(agg, ["S"], [1], ["ours"], [512], [0], bw, {}, {"S": 3}, {"S": 10}, {"S": 1}, {"S": 1},
                     {"S": {"ours": 1, "llama.cpp": 1}}, [], "now", 1.0, "0", "0", commits=[None])
    assert "**Engine commit**: not recorded" in md


def _llama_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def test_tiny_end_to_end_run_reports_routing_and_commit(tmp_path):
    """The real CLI, engine and worker processes on the tiny preset with the smallest options it takes: a
    1-token prompt and 1 decoded token, so each MoE layer routes exactly top_k (token, k) slots to top_k
    distinct experts: distinct = k and max / mean load = 1 / (k / E) = E / k, known without running anything."""
    from model.config import get_config
    from tests._mobile_util import build_engine

    build_engine()
    engines = "ours,llama.cpp" if _llama_installed() else "ours"
    out, work = tmp_path / "out", tmp_path / "work"
    p = _cli("--sizes", "tiny", "--threads", "1", "--repeats", "1", "--prompts", "1", "--decode-contexts", "0",
             "--decode-tokens", "1", "--engines", engines, "--stream-mib", "8", "--stream-repeats", "2",
             "--work", str(work), "--out", str(out), "--trained", "none", timeout=300)
    assert p.returncode == 0, p.stderr
    md = (out / "mobile.md").read_text()
    assert "**No trained-checkpoint rows in this run**: none was asked for (--trained none)." in md
    cfg = get_config("tiny")
    k, e, moe_layers = cfg.top_k, cfg.n_experts, cfg.n_moe_layers
    row = f"| {k} | {k}.0 | {e / k:.2f} | {e / k:.2f} | 1 |"
    assert f"| tiny | prefill 1 | 1 | {e} | {moe_layers} {row}" in md
    assert f"| tiny | decode @ctx 0 | 1 | {e} | {moe_layers} {row}" in md
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "mobile/c"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip())
    state = "mobile/c has uncommitted changes" if dirty else "mobile/c clean"
    assert f"**Engine commit**: {head} ({state})." in md
    raw = json.loads((out / "mobile_raw.json").read_text())
    ours = [r for r in raw["rows"] if r["engine"] == "ours"]
    assert len(ours) == 1 and ours[0]["engine_commit"]["head"] == head
    assert ours[0]["routing"]["prefill"]["1"]["distinct"] == [k] * moe_layers
    assert not (out / "mobile_rows.partial.json").exists()
    assert {"mobile_decode.png", "mobile_prefill.png", "mobile_roofline.png", "mobile_profile.png"} <= \
        {f.name for f in out.iterdir()}
    if engines == "ours":
        assert not (work / "tiny-random-q4_0.gguf").exists()  # no GGUF conversion without llama.cpp


def test_cached_random_exports_are_rebuilt_when_the_preset_changes(tmp_path, monkeypatch):
    """The benchmark's cached exports are keyed by the preset's whole config: an edited preset (a vocab change,
    say) is exported again instead of being measured from a stale file under the same name."""
    from bench import mobile_driver
    from model import config

    logs = []
    p1 = mobile_driver.prepare_models(["tiny"], tmp_path, 0, logs.append, gguf=False)["tiny"]["ours"]
    t1 = p1.stat().st_mtime_ns
    mobile_driver.prepare_models(["tiny"], tmp_path, 0, logs.append, gguf=False)
    assert p1.stat().st_mtime_ns == t1 and len([m for m in logs if "exported" in m]) == 1  # reused
    monkeypatch.setitem(config.PRESETS, "tiny", dict(config.PRESETS["tiny"], rope_theta=20000.0))
    mobile_driver.prepare_models(["tiny"], tmp_path, 0, logs.append, gguf=False)
    assert len([m for m in logs if "exported" in m]) == 2  # the stamp no longer matched: rebuilt
