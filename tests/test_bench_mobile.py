"""bench/mobile.py bookkeeping (no engine runs): pair-by-pair ratios, medians, the report, and the STREAM
triad program. The real benchmark is `make bench-mobile`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.mobile import aggregate, goals_text, parse_kv_ints, parse_repeats, report_text


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
    # decode 4.0x >= 3.4 met; ours/llama 2.0 >= 1.2 met; roofline 30 tok/s * 0.2 GB / 10 GB/s = 60% missed
    assert "decode 4.00x (goal >= 3.4x: met)" in goals
    assert "decode 2.00x (goal >= 1.2x: met)" in goals
    assert "60.0% of the STREAM roofline (goal >= 80%: missed)" in goals
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


def test_cli_bad_size_is_one_line_error():
    p = subprocess.run([".venv/bin/python" if Path(".venv/bin/python").exists() else "python", "-m", "bench.mobile",
                        "--sizes", "XL"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "unknown size" in p.stderr


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

    def close(self):
        pass


@pytest.mark.parametrize("prompts,contexts", [([512, 128], [0, 1024]), ([128], [0, 64]), ([], [1024, 0])])
def test_worker_decodes_at_exactly_the_asked_context(monkeypatch, prompts, contexts):
    import bench.mobile as bm

    monkeypatch.setattr(bm, "OursRunner", _FakeRunner)
    plan = dict(seed=0, id_range=[1, 200], prompts=prompts, decode_contexts=contexts, decode_tokens=3)
    out = bm.worker("ours", "unused", 1, plan)
    starts = [e[1] for e in _FakeRunner.log if e[0] == "decode"]
    assert sorted(starts) == sorted(contexts)  # every decode starts with exactly ctx tokens cached
    assert sorted(out["decode"]) == sorted(map(str, contexts))
    prefills = [e for e in _FakeRunner.log if e[0] == 0 and e[1] in prompts]
    assert sorted(n for _, n in prefills) == sorted(prompts)  # each timed prompt from an empty cache
