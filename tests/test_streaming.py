"""Running a model larger than its memory budget (mmoe-run --mem-budget, Engine(mem_budget_mb=)): the routed
experts stay in the file and are read on demand into an expert cache (mobile/c/cache.c).

Checked here: logits and greedy tokens are bit-identical to the all-resident engine for every cache policy, with
and without next-layer prefetch, with budgets that force misses, evictions and multi-wave prefill; the C CLI stays within its budget (VmHWM of a 171 MB
model under 60 MB: the C process, so no Python baseline is hidden in the figure); the static aarch64 build under
qemu gives the x86 resident tokens with a budget; bad budgets are one-line errors (exit 2); the ASan + UBSan build
runs the streaming path clean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests._mobile_util import BUILD, ROOT, build_engine

PROMPT = [11, 200, 37, 1500, 9, 640, 3, 77, 1024, 5, 300, 2047, 42, 7, 99, 1234, 18, 555, 60, 1999]
POLICIES = ("lru", "lfu", "pin")
# 12 layers x 64 experts of 256 x 512: 171 MB, of which 9 MB resident (everything but the routed experts)
BIG = dict(init_std=0.3, d_model=512, n_layers=12, n_heads=8, n_kv_heads=2, n_experts=64, top_k=4,
           expert_ffn_dim=256, shared_ffn_dim=256)
# 4 layers x 32 experts of 128 x 256: 7.8 MB; a record is 54 KiB, so a few MB of budget decide the slot count
MID = dict(init_std=0.3, d_model=256, n_heads=4, n_kv_heads=2, n_experts=32, top_k=4, expert_ffn_dim=128)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mobile.export import export_random

    build_engine()
    d = tmp_path_factory.mktemp("stream")
    return dict(tiny=export_random("tiny", d / "tiny.mmoe", seed=3, init_std=0.3),
                mid=export_random("tiny", d / "mid.mmoe", seed=2, **MID),
                big=export_random("tiny", d / "big.mmoe", seed=1, **BIG))


def _run(exe, model, *args, prefix=(), env=None, timeout=300):
    cmd = [*prefix, str(exe), str(model), "--prompt-ids", ",".join(map(str, PROMPT)), "--greedy", "--ids",
           "--ignore-eos", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _ids(r) -> list[int]:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return [int(t) for t in r.stdout.strip().split(",")]


def _cache_line(stderr: str) -> dict:
    m = re.search(r"(\d+) slots a layer.*\n.*hits (\d+) misses (\d+).*evictions (\d+)", stderr)
    assert m, stderr
    return dict(zip(("slots", "hits", "misses", "evictions"), map(int, m.groups())))


def _min_mb(exe, model, prefix=(), env=None) -> float:
    """the minimum budget the engine reports for this run (one token under a budget that fits everything)"""
    r = _run(exe, model, "-n", 1, "--mem-budget", 100000, prefix=prefix, env=env)
    assert r.returncode == 0, r.stderr
    return float(re.search(r"min ([\d.]+) MB", r.stderr).group(1))


def _engine_trace(path, **kw):
    """all-logits of the prompt (multi-wave prefill under a small budget), then 12 greedy decode steps' logits"""
    from mobile.engine import Engine

    with Engine(path, **kw) as eng:
        pre = eng.eval(PROMPT, all_logits=True)
        steps, tok = [], int(np.argmax(pre[-1]))
        for _ in range(12):
            lg = eng.eval([tok])
            steps.append(lg)
            tok = int(np.argmax(lg))
        g = eng.generate(PROMPT, 16, greedy=True, stop_at_eos=False)
        return pre, np.stack(steps), g.ids, eng.cache_stats()


@pytest.mark.parametrize("name", ["tiny", "mid"])
def test_engine_bit_identical_under_budget(models, name):
    from mobile.engine import Engine

    path = models[name]
    ref_pre, ref_steps, ref_ids, ref_cs = _engine_trace(path)
    assert ref_cs == {}
    assert len(set(ref_ids)) >= 4, f"greedy output too repetitive to compare: {ref_ids}"
    n_experts = Engine(path).n_experts
    # near the minimum (top_k slots a layer), a few more slots, and everything fitting
    for extra in (0.3, 0.8, 4096):
        for pol in POLICIES:
            for pf in (False, True):
                # the minimum includes this process's RSS at open, which drifts as Python allocates: probe it
                # right before
                with Engine(path, mem_budget_mb=4096) as probe:
                    base = probe.min_budget_mb()
                pre, steps, ids, cs = _engine_trace(path, mem_budget_mb=base + extra, cache_policy=pol, prefetch=pf)
                case = (name, extra, pol, pf)
                assert np.array_equal(pre, ref_pre) and np.array_equal(steps, ref_steps), case
                assert ids == ref_ids, case
                assert cs["policy"] == pol and cs["hits"] + cs["misses"] > 0 and cs["prefetch"] == pf
                if extra < 1:
                    assert cs["slots_per_layer"] < n_experts and cs["misses"] > 0 and cs["evictions"] > 0, cs
                else:
                    assert cs["slots_per_layer"] == n_experts and cs["evictions"] == 0, cs
                pf_counts = [cs[k] for k in ("prefetch_issued", "prefetch_used", "prefetch_wasted",
                                             "prefetch_cancelled")]
                if not pf:
                    assert pf_counts == [0, 0, 0, 0], cs
                elif extra < 1:  # the guesses are read, and some are what the routing then picks
                    assert cs["prefetch_issued"] > 0 and cs["prefetch_used"] > 0, cs
                    assert cs["prefetch_used"] <= cs["prefetch_issued"] + cs["slots_per_layer"] * 4, cs


def test_engine_prefetch_needs_budget(models):
    from mobile.engine import Engine

    with pytest.raises(ValueError, match="prefetch .*mem_budget_mb"):
        Engine(models["tiny"], prefetch=True)


def test_bench_prefetch_smoke(models, tmp_path):
    """bench.prefetch: interleaved off/on rows with exact slot counts and the same decoded tokens (it raises
    otherwise); the prefetch rows count issued and used reads, the others none."""
    import json

    from bench import prefetch

    out = tmp_path / "rows.json"
    assert prefetch.main(["--model", str(models["mid"]), "--slots", "6", "--random-ids", "--prompt-tokens", "8",
                          "--decode-tokens", "8", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["prefetch"] for r in rows] == [False, True] and all(r["slots"] == 6 for r in rows)
    assert rows[0]["issued"] == 0 and rows[1]["issued"] > 0 and rows[1]["used"] > 0, rows


def test_cli_tokens_and_budget_vmhwm(models):
    """mmoe-run on the 171 MB model: the same tokens resident, under 60 MB (each policy, O_DIRECT and the
    pread + DONTNEED fallback) and under its minimum; VmHWM (the whole C process) within the budget."""
    exe = BUILD / "mmoe-run"
    big = models["big"]
    assert big.stat().st_size > 150 * 2**20
    ref = _run(exe, big, "-n", 24)
    ref_ids = _ids(ref)
    hwm_ref = float(re.search(r"peak RSS: ([\d.]+) MB \(VmHWM\)", ref.stderr).group(1))
    assert hwm_ref > 150, ref.stderr  # resident: the whole file ends up mapped in
    runs = [(pol, 1, {}, ()) for pol in POLICIES] + [("lru", 2, {"MMOE_NO_DIRECT": "1"}, ()),
                                                      ("lfu", 2, {}, ("--prefetch",))]
    for pol, threads, extra_env, more in runs:
        env = dict(os.environ, **extra_env)
        r = _run(exe, big, "-n", 24, "-t", threads, "--mem-budget", 60, "--cache-policy", pol, *more, env=env)
        assert _ids(r) == ref_ids, (pol, extra_env, r.stderr)
        hwm = float(re.search(r"peak RSS: ([\d.]+) MB \(VmHWM\)", r.stderr).group(1))
        assert hwm <= 60.0, f"VmHWM {hwm} MB over the 60 MB budget ({pol}):\n{r.stderr}"
        cs = _cache_line(r.stderr)
        assert cs["slots"] < 64 and cs["misses"] > cs["hits"] / 10 and cs["evictions"] > 0, cs
        assert ("O_DIRECT" in r.stderr) != bool(extra_env), r.stderr
        pf = re.search(r"prefetch: issued (\d+) used (\d+)", r.stderr)
        assert bool(pf) == bool(more), r.stderr
        if pf:
            assert int(pf.group(1)) > 0 and int(pf.group(2)) > 0, r.stderr
    # the minimum budget (top_k slots a layer): still exact, still within
    m = re.search(r"min ([\d.]+) MB", r.stderr)
    lo = int(np.ceil(float(m.group(1))))
    r = _run(exe, big, "-n", 8, "--mem-budget", lo)
    assert _ids(r) == ref_ids[:8], r.stderr
    hwm = float(re.search(r"peak RSS: ([\d.]+) MB \(VmHWM\)", r.stderr).group(1))
    assert hwm <= lo, r.stderr
    assert _cache_line(r.stderr)["slots"] <= 5, r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--mem-budget", "1"], "below the minimum"),
    (["--mem-budget", "-5"], "--mem-budget must be an integer"),
    (["--mem-budget", "0"], "--mem-budget must be an integer in [1, "),
    (["--mem-budget", "12x"], "--mem-budget must be an integer"),
    (["--mem-budget", "60", "--cache-policy", "fifo"], "--cache-policy must be lru, lfu or pin"),
    (["--mem-budget", "60", "--io-threads", "0"], "--io-threads must be an integer"),
    (["--cache-policy", "pin"], "--cache-policy configures the expert cache of --mem-budget"),
    (["--prefetch"], "--prefetch configures the expert cache of --mem-budget"),
])
def test_cli_bad_budget(models, args, msg):
    r = _run(BUILD / "mmoe-run", models["big"], "-n", 4, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and lines[0].startswith("error: "), r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--mem-budget", "1"], "--mem-budget 1: memory budget 1.0 MB is below the minimum"),
    (["--mem-budget", "0"], "--mem-budget"),
    (["--mem-budget", "nan"], "--mem-budget"),
    (["--cache-policy", "lru"], "give --mem-budget too"),
    (["--mem-budget", "100", "--cache-policy", "mru"], "--cache-policy"),
    (["--prefetch"], "--prefetch fills the expert cache of --mem-budget: give --mem-budget too"),
])
def test_python_bad_budget(models, args, msg):
    cmd = [sys.executable, "-m", "mobile", "generate", "--model", str(models["tiny"]), "--prompt-ids", "1,2,3",
           "--max-new-tokens", "4", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_python_generate_with_budget(models):
    cmd = [sys.executable, "-m", "mobile", "generate", "--model", str(models["mid"]), "--prompt-ids",
           ",".join(map(str, PROMPT)), "--max-new-tokens", "16", "--greedy", "--ids"]
    ref = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    r = subprocess.run(cmd + ["--mem-budget", "400", "--cache-policy", "pin"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert ref.returncode == 0 and r.returncode == 0, r.stderr
    assert r.stdout == ref.stdout
    assert "-- expert cache: policy pin" in r.stderr and "-- prefetch" not in r.stderr, r.stderr
    r = subprocess.run(cmd + ["--mem-budget", "400", "--prefetch"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0 and r.stdout == ref.stdout, r.stderr
    assert re.search(r"-- prefetch: issued \d+ used \d+ \(accuracy", r.stderr), r.stderr


def test_python_generate_vmhwm_within_budget(models):
    """The Python front end's budget covers the whole process, the interpreter's ~35 MB included: the minimum it
    names (from a refused budget) plus 8 MB runs the 171 MB model with this process's VmHWM within it."""
    cmd = [sys.executable, "-m", "mobile", "generate", "--model", str(models["big"]), "--prompt-ids",
           ",".join(map(str, PROMPT)), "--max-new-tokens", "12", "--greedy", "--ids"]
    r = subprocess.run(cmd + ["--mem-budget", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    budget = int(np.ceil(float(re.search(r"below the minimum ([\d.]+) MB", r.stderr).group(1)))) + 8
    ref = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    r = subprocess.run(cmd + ["--mem-budget", str(budget)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and ref.returncode == 0, r.stderr
    assert r.stdout == ref.stdout
    peak = float(re.search(r"-- peak RSS: ([\d.]+) MB", r.stderr).group(1))
    assert peak <= budget < 150, (peak, budget, r.stderr)
    assert "hits" in r.stderr and "misses 0 " not in r.stderr, r.stderr


def test_truncated_file_is_an_eval_error(models, tmp_path):
    """The expert bytes are read after open: a file cut short under a running engine is an error naming the
    read, and the engine stays usable for what it can still read (here: nothing routed, so it keeps failing)."""
    from mobile.engine import Engine

    path = tmp_path / "cut.mmoe"
    shutil.copyfile(models["mid"], path)
    with Engine(path, mem_budget_mb=4096) as eng:
        os.truncate(path, path.stat().st_size // 2)
        with pytest.raises(ValueError, match=r"eval: expert read at offset \d+ failed .*truncated"):
            eng.eval(PROMPT)
        with pytest.raises(ValueError, match="expert read"):
            eng.eval([1])
    with pytest.raises(ValueError, match="cut.mmoe"):  # and the loader rejects it from now on
        Engine(path, mem_budget_mb=4096)


def test_arm_qemu_budget_tokens_equal_x86(models):
    for tool in ("aarch64-linux-gnu-gcc", "qemu-aarch64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (run mobile/install_toolchain.sh as root)")
    build_engine("CROSS=aarch64-linux-gnu-")  # static, into mobile/build/aarch64 (incremental)
    arm = BUILD / "aarch64"
    mid = models["mid"]
    ref_ids = _ids(_run(BUILD / "mmoe-run", mid, "-n", 24))
    r = _run(arm / "mmoe-run", mid, "-n", 24, prefix=["qemu-aarch64", "-cpu", "max"])
    assert _ids(r) == ref_ids
    # under qemu the process's RSS includes the emulator's, which raises the minimum: 2 MB above it is a
    # handful of slots of the 32 experts a layer
    qemu = ["qemu-aarch64", "-cpu", "cortex-a76"]
    budget = int(np.ceil(_min_mb(arm / "mmoe-run", mid, prefix=qemu))) + 2
    for pol, threads, more in (("lru", 1, ()), ("pin", 2, ("--prefetch",))):
        r = _run(arm / "mmoe-run", mid, "-n", 24, "--mem-budget", budget, "--cache-policy", pol, "-t", threads,
                 *more, prefix=qemu)
        assert _ids(r) == ref_ids, r.stderr
        assert ("prefetch: issued" in r.stderr) == bool(more), r.stderr
        cs = _cache_line(r.stderr)
        assert cs["slots"] < 32 and cs["misses"] > 0 and cs["evictions"] > 0, r.stderr


def test_sanitizers_clean_on_streaming(models):
    """ASan + UBSan mmoe-run with a budget forcing multi-wave prefill and evictions, and with a refused budget
    (tests/test_mobile_fuzz.py covers the loader under the same build)."""
    build_engine("SANITIZE=1")
    exe = BUILD / "san" / "mmoe-run"
    ref_ids = _ids(_run(BUILD / "mmoe-run", models["mid"], "-n", 12))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=86",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87")
    budget = int(np.ceil(_min_mb(exe, models["mid"], env=env))) + 1  # ASan's shadow memory raises the minimum
    for pol, more in [(p, ()) for p in POLICIES] + [("lfu", ("--prefetch",))]:
        r = _run(exe, models["mid"], "-n", 12, "-t", 2, "--mem-budget", budget, "--cache-policy", pol, *more,
                 env=env)
        assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr
        assert _ids(r) == ref_ids, r.stderr
        cs = _cache_line(r.stderr)
        assert cs["slots"] < 32 and cs["evictions"] > 0, r.stderr
    r = _run(exe, models["mid"], "-n", 4, "--mem-budget", 1, env=env)
    assert r.returncode == 2 and "AddressSanitizer" not in r.stderr, r.stderr
