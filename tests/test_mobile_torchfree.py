"""The phone-side runtime needs neither torch nor tokenizers nor train/: `python -m mobile export --random-init`,
`info` and `generate` (plain and --chat), and the `mobile.Engine` binding, each run in a subprocess where
importing those packages fails.

The wrapper blocks them with a meta-path finder rather than deleting them: a finder sees every import attempt,
so an import caught by a `try: ... except ImportError:` fallback (which would still run, silently taking the
fallback path) is recorded and reported too, and the test fails on it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from model.chat_template import render_prompt
from tests._mobile_util import ROOT, build_engine

BLOCKED = ("torch", "tokenizers", "train", "triton")

# argv: -m MODULE [ARGS...] | -c CODE. Prints one "blocked imports attempted: ..." line to stderr at exit.
WRAPPER = r"""
import sys

BLOCKED = __BLOCKED__
attempts = []


class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked by the torch-free test wrapper")
        return None


preloaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
if preloaded:  # a .pth file imported one at startup: blocking now would prove nothing
    sys.exit(f"wrapper: already imported at startup: {preloaded}")
sys.meta_path.insert(0, _Block())
mode, target, *rest = sys.argv[1:]
try:
    if mode == "-m":
        import runpy

        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        exec(compile(target, "<probe>", "exec"), {"__name__": "__main__"})
finally:
    print("blocked imports attempted:", ",".join(attempts) or "none", file=sys.stderr)
""".replace("__BLOCKED__", repr(BLOCKED))



def run_blocked(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def attempted(r: subprocess.CompletedProcess) -> str:
    """The wrapper's record of blocked imports ("none" if there were none); a traceback may follow it."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("blocked imports attempted: ")]
    assert len(lines) == 1, f"the wrapper did not report (exit {r.returncode}):\n{r.stderr}"
    return lines[0].split(": ", 1)[1]


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    msg = f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.returncode == 0, msg
    assert attempted(r) == "none", msg
    return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    build_engine()
    out = tmp_path_factory.mktemp("torchfree") / "tiny.mmoe"
    r = ok(run_blocked("-m", "mobile", "export", "--random-init", "--size", "tiny", "--seed", "1", "--out", str(out)))
    assert out.is_file() and out.stat().st_size > 0
    assert f"wrote {out}" in r.stdout
    return out


def test_wrapper_blocks_torch():
    """The wrapper can make the tests below fail: torch is installed here, yet under the wrapper importing it
    fails, and an import swallowed by an ImportError fallback is still reported."""
    assert importlib.util.find_spec("torch") is not None, "torch is not installed: this check would prove nothing"
    r = run_blocked("-c", "import torch")
    assert r.returncode != 0
    assert "torch is blocked by the torch-free test wrapper" in r.stderr
    assert attempted(r) == "torch"
    # the shape of the old render_chat fallback: it runs fine, but the attempt is on record
    r = run_blocked("-c", "try:\n    import train.chat\nexcept ImportError:\n    print('fallback')")
    assert r.returncode == 0 and r.stdout.strip() == "fallback"
    assert attempted(r) == "train"
    for mod in ("tokenizers", "triton", "model.model"):  # model.model imports torch
        r = run_blocked("-c", f"import {mod}")
        assert r.returncode != 0, mod
        assert attempted(r) != "none", mod


def test_info_torch_free(tiny):
    r = ok(run_blocked("-m", "mobile", "info", "--model", str(tiny)))
    assert "vocab_size           2048" in r.stdout and "layer_kinds" in r.stdout, r.stdout
    assert "  tok_emb " in r.stdout and "q4g32" in r.stdout, r.stdout


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_generate_torch_free(tiny, chat):
    args = ["-m", "mobile", "generate", "--model", str(tiny), "--prompt", "hi", "--max-new-tokens", "4", "--greedy"]
    r = ok(run_blocked(*args, *(["--chat"] if chat else [])))
    text, _, stats = r.stdout.partition("\n-- kernels ")
    assert text.startswith(render_prompt("hi") if chat else "hi"), r.stdout
    if not chat:
        assert not text.startswith(render_prompt("hi"))
    assert "-- decode: " in stats and "tok/s" in stats, r.stdout
    # the export embeds the byte tokenizer (no --tokenizer): one token per prompt byte
    prefill = int(stats.split("-- prefill: ")[1].split()[0])
    assert prefill == len((render_prompt("hi") if chat else "hi").encode()), r.stdout


def test_engine_binding_torch_free(tiny):
    probe = (
        "import mobile\n"
        f"with mobile.engine.Engine({str(tiny)!r}) as eng:\n"
        "    logits = eng.eval([1, 2, 3])\n"
        "    print(logits.shape[0] == eng.info('vocab_size'), bool((logits == logits).all()))\n"
        "    print(mobile.Engine is mobile.engine.Engine)\n"
    )
    r = ok(run_blocked("-c", probe))
    assert r.stdout.split() == ["True", "True", "True"], r.stdout
