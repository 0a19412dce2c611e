"""bench.executorch_peer's pure-Python parts (no executorch needed): options, worker rows, the export-failure
records, the interleaved loop with fake workers, the report; and bench/executorch_model.KVCacheLM against
MobileMoE.forward on the tiny preset (torch only)."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from bench import executorch_peer as ep
from model import cli


def _opts(tmp_path, *argv):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n")
    return ep.options(ep.build_parser().parse_args(["--et-python", str(fake), "--engines", "executorch", *argv]))


def test_options_threads_and_bad_values(tmp_path):
    o = _opts(tmp_path, "--threads", "2,1", "--sizes", "tiny")
    assert o["threads"] == [2, 1] and o["sizes"] == ["tiny"] and o["engines"] == ["executorch"]
    for bad, msg in ((["--threads", "0"], ">= 1"), (["--threads", "1,x"], "integers"), (["--threads", "1,1"],
                     "repeated"), (["--sizes", "XL"], "unknown size"), (["--prompts", "2048"], "--max-ctx"),
                     (["--engines", "ours,tflite"], "--engines")):
        with pytest.raises(cli.BadInput, match=msg):
            _opts(tmp_path, *bad)
    with pytest.raises(cli.BadInput, match="make bench-executorch"):
        ep.options(ep.build_parser().parse_args(["--et-python", str(tmp_path / "absent"), "--engines", "executorch"]))


def test_cli_bad_input_exits_2(capsys):
    assert ep.main(["--threads", "-1", "--engines", "ours"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --threads")


def test_worker_plan_and_check_row(tmp_path):
    o = _opts(tmp_path, "--prompts", "16,8", "--decode-tokens", "4", "--seed", "5")
    plan = ep.worker_plan(o, 2048, rep=2)
    assert plan == dict(prompts=[16, 8], decode_contexts=[0], decode_tokens=4, id_range=[0, 2048], seed=7)
    row = dict(engine="executorch", threads=1, prefill={"8": 0.1, "16": 0.2}, decode={"0": 1.0}, peak_rss_mb=9.0)
    assert ep.check_row(dict(row), "executorch", [8, 16])["routing"] == {"prefill": {}, "decode": {}}
    with pytest.raises(RuntimeError, match="lacks"):
        ep.check_row({k: v for k, v in row.items() if k != "decode"}, "executorch", [8])
    with pytest.raises(RuntimeError, match="no timing"):
        ep.check_row(dict(row, decode={}), "executorch", [8])
    with pytest.raises(RuntimeError, match="says engine"):
        ep.check_row(dict(row), "ours", [8])


def test_export_record_parses_or_names_the_death():
    ok = ep.export_record('noise\n{"ok": true, "steps": {"build": 1.0}}\n', 0, "")
    assert ok["ok"] and ok["steps"] == {"build": 1.0}
    dead = ep.export_record("partial output\n", 137, "line 1\nKilled\n")
    assert dead["ok"] is False and dead["failed_step"] == "worker process"
    assert "exit status 137" in dead["error"] and "Killed" in dead["error"]


def _fake_python(tmp_path, body: str):
    p = tmp_path / "fake-python"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return p


def test_export_failure_is_recorded_and_stamped(tmp_path):
    rec_line = json.dumps(dict(ok=False, failed_step="to_edge_transform_and_lower", steps={"build": 2.0},
                               error="RuntimeError: mobilemoe.moe_experts.default has no out variant"))
    fake = _fake_python(tmp_path, f"echo '{rec_line}'\nexit 3\n")
    o = ep.options(ep.build_parser().parse_args(["--et-python", str(fake), "--engines", "executorch",
                                                 "--sizes", "tiny"]))
    logs = []
    rec = ep.export_pte(o, "tiny", "native", tmp_path, logs.append, timeout=30)
    assert rec["failed_step"] == "to_edge_transform_and_lower" and "out variant" in rec["error"]
    assert any("FAILED at to_edge_transform_and_lower" in m for m in logs)
    # a second run reuses the recorded failure instead of exporting again (the fake now would say ok)
    _fake_python(tmp_path, "echo '{\"ok\": true, \"steps\": {}}'\n")
    assert ep.export_pte(o, "tiny", "native", tmp_path, logs.append, timeout=30)["ok"] is False
    # a worker that dies without its JSON line (killed for memory) is a failure record too
    _fake_python(tmp_path, "echo boom >&2\nexit 137\n")
    o2 = dict(o, seed=1)  # another seed: no stamp matches, so the (dying) worker runs
    dead = ep.export_pte(o2, "tiny", "kvcache", tmp_path, logs.append, timeout=30)
    assert dead["failed_step"] == "worker process" and "137" in dead["error"] and "boom" in dead["error"]


def test_run_matrix_interleaves_and_rows_have_mobile_keys(tmp_path):
    o = _opts(tmp_path, "--sizes", "tiny,dense-1B", "--threads", "1,2", "--repeats", "2", "--prompts", "8",
              "--decode-tokens", "4")
    o["engines"] = ["ours", "executorch"]
    calls = []

    def fake_run(cmd, timeout=None):
        engine = "ours" if "bench.mobile" in cmd else "executorch"
        threads = int(cmd[cmd.index("--threads") + 1])
        calls.append((engine, threads))
        speed = 2.0 if engine == "ours" else 1.0
        return "log line\n" + json.dumps(dict(engine=engine, threads=threads, load_s=0.1, prefill={"8": 8 / (10 * speed)},
                                              decode={"0": 4 / (2 * speed)}, peak_rss_mb=100.0))

    models = {"tiny": {"ours": tmp_path / "a", "executorch": tmp_path / "b"}, "dense-1B": {"ours": tmp_path / "c"}}
    rows = ep.run_matrix(o, models, lambda m: None, 10, run=fake_run)
    # dense-1B has no .pte (its export failed): only ours runs for it; order alternates per repeat
    assert calls[:2] == [("ours", 1), ("executorch", 1)] and calls[6:8] == [("executorch", 1), ("ours", 1)]
    assert len(rows) == 2 * (2 * 2 + 2)
    assert all(set(ep.ROW_KEYS) <= set(r) for r in rows)
    sm = ep.summarize(rows, ["tiny", "dense-1B"], [1, 2], [8])
    assert sm["med"][("tiny", 1, "ours")]["prefill 8"] == pytest.approx(20.0)
    assert sm["ratio"][("tiny", 2)]["decode 0"] == pytest.approx(2.0)
    assert sm["ratio"][("dense-1B", 1)]["decode 0"] != sm["ratio"][("dense-1B", 1)]["decode 0"]  # NaN: no pair

    exports = {("tiny", "native"): dict(ok=False, failed_step="to_edge_transform_and_lower", steps={"build": 1.0},
                                        error="RuntimeError: no kernel"),
               ("tiny", "kvcache"): dict(ok=True, steps={"build": 1.0}, pte_bytes=5e6,
                                         ops_outside_xnnpack={"aten.topk.default": 4})}
    md = ep.report_text(o, rows, exports, dict(cpu="x", cpus=2, flags=["avx2"]), {"executorch": "1.5.1"},
                        "now", 60, ("1", "2"))
    assert "**failed at to_edge_transform_and_lower**: `RuntimeError: no kernel`" in md
    assert "dense-compute formulation" in md and "| tiny | 2 | " in md and "topk x4" in md
    # the mobile stats module takes these rows as they are
    from bench.mobile_stats import aggregate

    agg = aggregate(rows, ["tiny"], [1, 2], ["ours", "executorch"], [8], [0])
    assert agg["med"][("tiny", 1, "executorch", "decode", "0")] == pytest.approx(2.0)


def test_kvcache_model_matches_mobilemoe_forward():
    from bench.executorch_model import KVCacheLM, random_mobilemoe
    from model.init import random_params

    m = random_mobilemoe("tiny", seed=3)
    p, q4 = next((p, v) for p, v in random_params(m.cfg, seed=3) if p.name == "layers.1.moe.w_down")
    assert torch.equal(dict(m.named_parameters())[p.name], torch.from_numpy(q4.dequantize()))  # the .mmoe weights
    kv = KVCacheLM(m, max_ctx=32).eval()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_TV = m(ids)[0]
        got = [kv(ids[:, :10], torch.arange(10))[0]]  # prefill, then decode one token at a time from the cache
        got += [kv(ids[:, t:t + 1], torch.tensor([t]))[0] for t in range(10, 14)]
    for i, t in enumerate(range(9, 14)):
        torch.testing.assert_close(got[i], ref_TV[t], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCacheLM(m, max_ctx=m.cfg.max_seq_len + 1)
