"""bench/llama_bench.py without llama.cpp, a compiler or the network: the llama-bench JSON parser on a canned
output, the command line of every shape, the binary lookup and its errors, the aggregation and the report."""

from __future__ import annotations

import json
import math

import pytest

from bench import llama_bench as lb
from model import cli

# trimmed from a real `llama-bench -o json` of this llama.cpp (llama-cpp-python 0.3.36's vendored copy)
CANNED = """[
  {
    "build_commit": "llama-cpp-python-0.3.36",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "backends": "CPU",
    "model_filename": "/tmp/mmoe-bench/S-random-q4_0.gguf",
    "model_type": "glm4moe ?B Q4_0",
    "model_size": 775000000,
    "n_batch": 512,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "flash_attn": -1,
    "n_prompt": 0,
    "n_gen": 64,
    "n_depth": 1024,
    "test_time": "2026-12-01T22:40:00Z",
    "avg_ns": 2000000000,
    "stddev_ns": 10000000,
    "avg_ts": 32.0,
    "stddev_ts": 0.2,
    "samples_ns": [ 1990000000, 2010000000 ],
    "samples_ts": [ 32.16, 31.84 ]
  }
]
"""


def test_parse_canned_llama_bench_json():
    (t,) = lb.parse_bench_json(CANNED)
    assert (t["n_prompt"], t["n_gen"], t["n_depth"], t["threads"]) == (0, 64, 1024, 2)
    assert t["samples_ts"] == [32.16, 31.84] and t["avg_ts"] == 32.0
    assert t["build_commit"] == "llama-cpp-python-0.3.36" and t["model_type"].startswith("glm4moe")


@pytest.mark.parametrize("text,match", [
    ("llama-bench: error: failed to load model", "not JSON"),
    ("[]", "non-empty JSON array"),
    ('[{"n_prompt": 0, "n_gen": 64}]', "lacks a usable"),
    (json.dumps([dict(json.loads(CANNED)[0], samples_ts=[])]), "no samples"),
])
def test_parse_rejects_bad_output(text, match):
    with pytest.raises(ValueError, match=match):
        lb.parse_bench_json(text)


def test_command_line_of_each_shape(tmp_path):
    exe, model = tmp_path / "llama-bench", tmp_path / "m.gguf"

    def opts(cmd):
        assert cmd[0] == str(exe)
        return dict(zip(cmd[1::2], cmd[2::2]))

    want = {"pp128": ("128", "0", "0"), "pp512": ("512", "0", "0"), "tg64": ("0", "64", "0"),
            "tg64@d1024": ("0", "64", "1024")}
    assert {s.name for s in lb.SHAPES} == set(want)
    for s in lb.SHAPES:
        o = opts(lb.bench_cmd(exe, model, 2, s, 3))
        assert (o["-p"], o["-n"], o["-d"]) == want[s.name]
        assert o["-m"] == str(model) and o["-t"] == "2" and o["-r"] == "3" and o["-o"] == "json"
        assert o["-b"] == o["-ub"] == "512" and o["-fa"] == "auto"  # the driver's batch; both sides' fa default
    o = opts(lb.bench_cmd(exe, model, 1, lb.FA_OFF, 1))
    assert (o["-p"], o["-n"], o["-d"], o["-fa"]) == ("0", "64", "1024", "off")
    # each shape names the driver measurement it is compared with (the fa-off run has none)
    assert [s.driver_key() for s in lb.SHAPES] == [("prefill", "128"), ("prefill", "512"), ("decode", "0"),
                                                    ("decode", "1024")]
    assert lb.FA_OFF.driver_key() is None
    plan = lb.driver_plan(1000, 7)
    assert plan["prompts"] == [128, 512] and plan["decode_contexts"] == [0, 1024] and plan["decode_tokens"] == 64


def test_driver_tps_from_a_worker_line():
    # the JSON line bench.mobile's worker prints: seconds per prefill length and per decode context
    res = {"engine": "ours", "prefill": {"128": 2.0, "512": 8.0}, "decode": {"0": 1.0, "1024": 4.0}}
    tps = {s.name: lb.driver_tps(res, s) for s in lb.SHAPES}
    assert tps == {"pp128": 64.0, "pp512": 64.0, "tg64": 64.0, "tg64@d1024": 16.0}


def test_missing_binary_and_missing_tools_are_one_line_errors(tmp_path):
    with pytest.raises(cli.BadInput, match="not an executable file"):
        lb.locate_or_build(tmp_path, "0.3.36", print, exe=str(tmp_path / "nope"))
    with pytest.raises(cli.BadInput, match="cmake and a C\\+\\+ compiler .* not found on PATH"):
        lb.locate_or_build(tmp_path, "0.3.36", print, which=lambda name: None)
    with pytest.raises(cli.BadInput, match="^cannot build llama-bench: cmake not found"):
        lb.locate_or_build(tmp_path, "0.3.36", print, which=lambda name: None if name == "cmake" else "/usr/bin/x")
    # a cached build is found without looking for tools
    exe = lb.binary_path(tmp_path, "0.3.36")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    assert lb.locate_or_build(tmp_path, "0.3.36", print, which=lambda name: None) == exe


def test_cli_missing_binary_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lb, "llama_cpp_python_version", lambda: "0.3.36")
    assert lb.main(["--llama-bench", str(tmp_path / "absent"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent" in err[0] and "not an executable" in err[0]
    assert not (tmp_path / "llama_bench.md").exists()


def _rows():
    rows = []
    for rep, k in enumerate((1.0, 2.0)):  # the second repeat twice as fast for everyone: ratios must not move
        for m, f in (("llama-bench", 1.0), ("llama.cpp driver", 0.8), ("ours driver", 1.6)):
            tps = {s.name: 10 * k * f for s in lb.SHAPES}
            if m == "llama-bench":
                tps[lb.FA_OFF.name] = tps["tg64@d1024"] * 2.5
            rows.append(dict(size="S", threads=1, rep=rep, method=m, tps=tps))
    return rows


def test_aggregate_pairs_ratios_and_report():
    med, ratio = lb.aggregate(_rows())
    assert med[("S", 1, "llama-bench", "pp128")] == 15.0
    assert math.isclose(ratio[("S", 1, "pp128", "ours/lb")], 1.6)
    assert math.isclose(ratio[("S", 1, "tg64", "ours/drv")], 2.0)
    assert math.isclose(ratio[("S", 1, "tg64@d1024", "drv/lb")], 0.8)
    assert math.isclose(ratio[("S", 1, lb.FA_OFF.name, "off/auto")], 2.5)
    md = lb.report_text(med, ratio, ["S"], [1], 2, 1, {"cpu": "x"}, {"head": "abc", "mobile_c_dirty": False},
                        "llama-cpp-python-0.3.36", "0.3.36", "now", 60.0, ("0", "0"))
    line = next(ln for ln in md.splitlines() if ln.startswith("| S | 1 | pp128 |"))
    assert line.split("|")[7:11] == [" 0.80 ", " 1.60 ", " 2.00 ", " -20% "]
    assert "abc (mobile/c clean)" in md and "| S | 1 | 15.0 | 15.0 | 37.5 | 1.00 | 2.50 |" in md
