"""Bad input to every phone / bench / interop command line ends the same way (model/cli.py's convention): exit
status 2, exactly one line on stderr ("error: ..." naming the option or file), no traceback, nothing on stdout
and nothing written. One table row per case; the CLIs: `python -m mobile generate | info | export` (export
--format gguf included), `python -m model.hf`, `python -m bench.eval` and the C `mmoe-run`.

Also: `mobile info` rejects exactly what the C loader rejects (it calls it), both front ends treat a prompt as
bytes (invalid UTF-8 included) and share one context rule, and every option has help text with its default."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mobile import format as fmt
from tests._mobile_util import BUILD, ROOT, build_engine

PY = [sys.executable, "-m"]
CMD = {
    "generate": [*PY, "mobile", "generate"],
    "info": [*PY, "mobile", "info"],
    "export": [*PY, "mobile", "export"],
    "gguf": [*PY, "mobile", "export", "--format", "gguf"],
    "hf": [*PY, "model.hf"],
    "eval": [*PY, "bench.eval"],
    "mmoe-run": [str(BUILD / "mmoe-run")],
}


def _set_header(buf: bytearray, field: str, value: int) -> None:
    off, code = fmt.header_field_offset(field)
    struct.pack_into("<" + code, buf, off, value)


def _cut_in_table(b: bytes) -> bytearray:
    """The header plus half of the tensor table, file_size patched to match: only the table check can catch it."""
    buf = bytearray(b[:fmt.HEADER_SIZE + 3 * fmt.ENTRY_SIZE // 2])
    _set_header(buf, "file_size", len(buf))
    return buf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files: a valid tiny .mmoe and corrupted copies (edited as tests/test_mobile_loader.py does)."""
    build_engine()
    from mobile.export import export_random

    d = tmp_path_factory.mktemp("inputs")
    tiny = d / "tiny.mmoe"
    export_random("tiny", tiny, seed=3, n_layers=2)
    b = tiny.read_bytes()

    def edited(name, data):
        (d / name).write_bytes(bytes(data))

    edited("truncated.mmoe", b[:-100])
    edited("cut_in_table.mmoe", _cut_in_table(b))
    edited("cut_in_table_raw.mmoe", b[:fmt.HEADER_SIZE + 100])
    for name, field, value in (("absurd_layers.mmoe", "n_layers", 10**6), ("absurd_vocab.mmoe", "vocab_size", 2**32 - 1),
                               ("absurd_d_model.mmoe", "d_model", 0), ("absurd_tensors.mmoe", "n_tensors", 10**5),
                               ("absurd_data_off.mmoe", "data_offset", 2**63)):
        buf = bytearray(b)
        _set_header(buf, field, value)
        edited(name, buf)
    edited("wrong_magic.mmoe", b"GGUF\0\0\0\0" + b[8:])
    edited("empty.mmoe", b"")
    (d / "not_json.json").write_text("this is not JSON {")
    (d / "list.json").write_text("[1, 2]")
    (d / "a_dir.mmoe").mkdir()
    hf_bad = d / "hf_bad"
    hf_bad.mkdir()
    (hf_bad / "config.json").write_text("{nope")
    hf_list = d / "hf_list"
    hf_list.mkdir()
    (hf_list / "config.json").write_text("[1]")
    return d


T, N = "{d}/tiny.mmoe", "{d}/nope.mmoe"  # a valid model, a missing one
# (cli, case id, arguments ({d} = the inputs folder; outputs go to the empty working folder), text the line holds)
ROWS = [
    # ---- python -m mobile generate ----
    ("generate", "temperature_negative", ["--model", T, "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    ("generate", "temperature_nan", ["--model", T, "--prompt", "hi", "--temperature", "nan"], "finite"),
    ("generate", "temperature_inf", ["--model", T, "--prompt", "hi", "--temperature", "inf"], "finite"),
    ("generate", "temperature_garbage", ["--model", T, "--prompt", "hi", "--temperature", "0.5x"], "--temperature"),
    ("generate", "top_p_above_1", ["--model", T, "--prompt", "hi", "--top-p", "2"], "--top-p"),
    ("generate", "top_p_zero", ["--model", T, "--prompt", "hi", "--top-p", "0"], "--top-p"),
    ("generate", "top_p_nan", ["--model", T, "--prompt", "hi", "--top-p", "nan"], "--top-p"),
    ("generate", "prompt_and_prompt_ids", ["--model", T, "--prompt", "hi", "--prompt-ids", "1,2"], "not both"),
    ("generate", "chat_without_prompt", ["--model", T, "--chat"], "empty prompt"),
    ("generate", "no_prompt", ["--model", T], "empty prompt"),
    ("generate", "empty_prompt", ["--model", T, "--prompt", ""], "empty prompt"),
    ("generate", "chat_with_prompt_ids", ["--model", T, "--prompt-ids", "1,2", "--chat"], "--chat"),
    ("generate", "max_new_tokens_past_context", ["--model", T, "--prompt", "hi", "--max-new-tokens", "100000"],
     "exceed the context"),
    ("generate", "max_new_tokens_zero", ["--model", T, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate", "max_new_tokens_garbage", ["--model", T, "--prompt", "hi", "--max-new-tokens", "12abc"],
     "--max-new-tokens"),
    ("generate", "threads_zero", ["--model", T, "--prompt", "hi", "--threads", "0"], "--threads"),
    ("generate", "seed_negative", ["--model", T, "--prompt", "hi", "--seed", "-1"], "--seed"),
    ("generate", "prompt_ids_empty_entry", ["--model", T, "--prompt-ids", "1,,2"], "--prompt-ids"),
    ("generate", "prompt_ids_negative", ["--model", T, "--prompt-ids", "1,-2"], "--prompt-ids"),
    ("generate", "prompt_ids_out_of_vocab", ["--model", T, "--prompt-ids", "1,99999"], "out of range"),
    ("generate", "model_missing", ["--model", N, "--prompt", "hi"], "nope.mmoe"),
    ("generate", "model_truncated", ["--model", "{d}/truncated.mmoe", "--prompt", "hi"], "truncated.mmoe"),
    ("generate", "model_is_a_folder", ["--model", "{d}/a_dir.mmoe", "--prompt", "hi"], "a_dir.mmoe"),
    ("generate", "unknown_option", ["--model", T, "--prompt", "hi", "--bogus"], "--bogus"),
    ("generate", "no_model", ["--prompt", "hi"], "--model"),
    # ---- python -m mobile info: the C loader's verdict, naming the file ----
    ("info", "truncated", ["--model", "{d}/truncated.mmoe"], "truncated.mmoe: file is"),
    ("info", "cut_in_table", ["--model", "{d}/cut_in_table.mmoe"], "cut_in_table.mmoe: tensor table out of range"),
    ("info", "cut_in_table_raw", ["--model", "{d}/cut_in_table_raw.mmoe"], "cut_in_table_raw.mmoe:"),
    ("info", "absurd_n_layers", ["--model", "{d}/absurd_layers.mmoe"], "absurd_layers.mmoe: n_layers"),
    ("info", "absurd_vocab_size", ["--model", "{d}/absurd_vocab.mmoe"], "absurd_vocab.mmoe:"),
    ("info", "absurd_d_model", ["--model", "{d}/absurd_d_model.mmoe"], "absurd_d_model.mmoe:"),
    ("info", "absurd_n_tensors", ["--model", "{d}/absurd_tensors.mmoe"], "absurd_tensors.mmoe: n_tensors"),
    ("info", "absurd_data_offset", ["--model", "{d}/absurd_data_off.mmoe"], "absurd_data_off.mmoe: data_offset"),
    ("info", "wrong_magic", ["--model", "{d}/wrong_magic.mmoe"], "wrong_magic.mmoe: bad magic"),
    ("info", "empty_file", ["--model", "{d}/empty.mmoe"], "empty.mmoe: file too small"),
    ("info", "missing_file", ["--model", N], "nope.mmoe"),
    ("info", "folder", ["--model", "{d}/a_dir.mmoe"], "a_dir.mmoe: not a regular file"),
    ("info", "no_model", [], "--model"),
    # ---- python -m mobile export (.mmoe and --format gguf) ----
    ("export", "tokenizer_not_json", ["--random-init", "--tokenizer", "{d}/not_json.json", "--out", "o.mmoe"],
     "not_json.json"),
    ("export", "tokenizer_not_object", ["--random-init", "--tokenizer", "{d}/list.json", "--out", "o.mmoe"], "list.json"),
    ("export", "tokenizer_missing", ["--random-init", "--tokenizer", "{d}/nope.json", "--out", "o.mmoe"], "nope.json"),
    ("export", "size_unknown", ["--random-init", "--size", "zz", "--out", "o.mmoe"], "--size"),
    ("export", "seed_negative", ["--random-init", "--seed", "-1", "--out", "o.mmoe"], "--seed"),
    ("export", "ckpt_and_random_init", ["--random-init", "--ckpt", "{d}", "--out", "o.mmoe"], "not both"),
    ("export", "no_source", ["--out", "o.mmoe"], "--ckpt"),
    ("export", "ckpt_missing", ["--ckpt", "{d}/nope", "--out", "o.mmoe"], "nope"),
    ("export", "no_out", ["--random-init"], "--out"),
    ("export", "format_unknown", ["--format", "onnx", "--random-init", "--out", "o.mmoe"], "--format"),
    ("export", "format_without_value", ["--random-init", "--out", "o.mmoe", "--format"], "--format"),
    ("gguf", "type_unknown", ["--random-init", "--type", "q8", "--out", "o.gguf"], "--type"),
    ("gguf", "size_unknown", ["--random-init", "--size", "zz", "--out", "o.gguf"], "--size"),
    ("gguf", "seed_negative", ["--random-init", "--seed", "-1", "--out", "o.gguf"], "--seed"),
    ("gguf", "no_source", ["--out", "o.gguf"], "--random-init"),
    ("gguf", "from_mmoe_not_q4_0", ["--from-mmoe", T, "--out", "o.gguf"], "q4_0"),
    ("gguf", "from_mmoe_truncated", ["--from-mmoe", "{d}/truncated.mmoe", "--type", "q4_0", "--out", "o.gguf"],
     "truncated.mmoe"),
    ("gguf", "from_mmoe_missing", ["--from-mmoe", N, "--type", "q4_0", "--out", "o.gguf"], "nope.mmoe"),
    ("gguf", "ckpt_missing", ["--ckpt", "{d}/nope", "--out", "o.gguf"], "nope"),
    # ---- python -m model.hf ----
    ("hf", "no_command", [], "export | import"),
    ("hf", "unknown_command", ["frob"], "frob"),
    ("hf", "export_missing_hf_dir", ["export", "{d}"], "hf_dir"),
    ("hf", "export_not_a_model_dir", ["export", "{d}/nope", "out_hf"], "nope"),
    ("hf", "import_missing", ["import", "{d}/nope", "out_model"], "nope"),
    ("hf", "import_config_not_json", ["import", "{d}/hf_bad", "out_model"], "hf_bad/config.json"),
    ("hf", "import_config_not_object", ["import", "{d}/hf_list", "out_model"], "hf_list/config.json"),
    # ---- python -m bench.eval ----
    ("eval", "ckpt_empty", ["--ckpt", "", "--out", "ev"], "--ckpt"),
    ("eval", "ckpt_only_commas", ["--ckpt", ",", "--out", "ev"], "--ckpt"),
    ("eval", "ckpt_missing_option", ["--out", "ev"], "--ckpt"),
    ("eval", "limit_negative", ["--ckpt", "{d}", "--limit", "-5", "--out", "ev"], "--limit"),
    ("eval", "limit_zero", ["--ckpt", "{d}", "--limit", "0", "--out", "ev"], "--limit"),
    ("eval", "limit_not_whole", ["--ckpt", "{d}", "--limit", "1.5", "--out", "ev"], "--limit"),
    ("eval", "limit_nan", ["--ckpt", "{d}", "--limit", "nan", "--out", "ev"], "--limit"),
    ("eval", "suite_unknown", ["--ckpt", "{d}", "--suite", "huge", "--out", "ev"], "--suite"),
    ("eval", "engine_unknown", ["--ckpt", "{d}", "--engine", "gpu", "--out", "ev"], "--engine"),
    ("eval", "engine_empty", ["--ckpt", "{d}", "--engine", ",", "--out", "ev"], "--engine"),
    ("eval", "threads_zero", ["--ckpt", "{d}", "--threads", "0", "--out", "ev"], "--threads"),
    ("eval", "batch_size_zero", ["--ckpt", "{d}", "--batch-size", "0", "--out", "ev"], "--batch-size"),
    ("eval", "ckpt_not_a_model", ["--ckpt", "{d}/nope", "--out", "ev"], "nope"),
    # ---- mmoe-run (C) ----
    ("mmoe-run", "no_arguments", [], "no model file"),
    ("mmoe-run", "no_prompt", [T], "empty prompt"),
    ("mmoe-run", "empty_prompt", [T, "-p", ""], "empty prompt"),
    ("mmoe-run", "prompt_and_prompt_ids", [T, "-p", "hi", "--prompt-ids", "1"], "not both"),
    ("mmoe-run", "n_zero", [T, "-p", "hi", "-n", "0"], "-n"),
    ("mmoe-run", "n_garbage", [T, "-p", "hi", "-n", "5x"], "-n"),
    ("mmoe-run", "n_overflow", [T, "-p", "hi", "-n", "99999999999999999999999"], "-n"),
    ("mmoe-run", "n_past_context", [T, "-p", "hi", "-n", "100000"], "exceed the context"),
    ("mmoe-run", "threads_zero", [T, "-p", "hi", "-t", "0"], "-t"),
    ("mmoe-run", "threads_too_many", [T, "-p", "hi", "--threads", "257"], "--threads"),
    ("mmoe-run", "seed_negative", [T, "-p", "hi", "--seed", "-1"], "--seed"),
    ("mmoe-run", "temp_nan", [T, "-p", "hi", "--temp", "nan"], "--temp"),
    ("mmoe-run", "temp_negative", [T, "-p", "hi", "--temp", "-1"], "--temp"),
    ("mmoe-run", "temp_inf", [T, "-p", "hi", "--temp", "inf"], "--temp"),
    ("mmoe-run", "temp_garbage", [T, "-p", "hi", "--temp", "0.5x"], "--temp"),
    ("mmoe-run", "top_p_zero", [T, "-p", "hi", "--top-p", "0"], "--top-p"),
    ("mmoe-run", "top_p_above_1", [T, "-p", "hi", "--top-p", "1.5"], "--top-p"),
    ("mmoe-run", "top_p_nan", [T, "-p", "hi", "--top-p", "nan"], "--top-p"),
    ("mmoe-run", "ctx_zero", [T, "-p", "hi", "--ctx", "0"], "--ctx"),
    ("mmoe-run", "ctx_past_model", [T, "-p", "hi", "--ctx", "100000"], "--ctx"),
    ("mmoe-run", "ctx_too_small", [T, "-p", "hi", "--ctx", "3"], "--ctx"),
    ("mmoe-run", "prompt_ids_empty_entry", [T, "--prompt-ids", "1,,2"], "--prompt-ids"),
    ("mmoe-run", "prompt_ids_trailing_comma", [T, "--prompt-ids", "1,2,"], "--prompt-ids"),
    ("mmoe-run", "prompt_ids_out_of_vocab", [T, "--prompt-ids", "99999"], "--prompt-ids"),
    ("mmoe-run", "unknown_option", [T, "-p", "hi", "--bogus"], "--bogus"),
    ("mmoe-run", "two_models", [T, T, "-p", "hi"], "unexpected argument"),
    ("mmoe-run", "missing_value", [T, "-p"], "-p needs a value"),
    ("mmoe-run", "model_truncated", ["{d}/truncated.mmoe", "-p", "hi"], "truncated.mmoe"),
    ("mmoe-run", "model_missing", [N, "-p", "hi"], "nope.mmoe"),
    ("mmoe-run", "check_absurd_header", ["{d}/absurd_layers.mmoe", "--check"], "absurd_layers.mmoe: n_layers"),
]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    env.pop("MOBILEMOE_DEBUG", None)
    return env


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("cli,case,args,needle", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_bad_input_is_one_line_exit_2(files, tmp_path, cli, case, args, needle):
    work = tmp_path / "work"
    work.mkdir()
    before = _snapshot(files)
    argv = [*CMD[cli], *(a.format(d=files) for a in args)]
    r = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, errors="replace", timeout=120)
    lines = r.stderr.rstrip("\n").split("\n")
    assert r.returncode == 2, (argv, r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0], (needle, lines[0])
    assert r.stdout == "", r.stdout
    assert list(work.iterdir()) == [], "a rejected command wrote files"
    assert _snapshot(files) == before, "an input file was touched"


def test_table_covers_every_cli():
    counts = {c: sum(r[0] == c for r in ROWS) for c in CMD}
    assert all(n >= 7 for n in counts.values()), counts
    assert len({(r[0], r[1]) for r in ROWS}) == len(ROWS)  # unique ids


# ---- the rules the two front ends share ----------------------------------------------------------------------
def _ids_python(files, prompt_argv: list, n: int) -> subprocess.CompletedProcess:
    return subprocess.run([*CMD["generate"], "--model", str(files / "tiny.mmoe"), *prompt_argv, "--greedy", "--ids",
                           "--max-new-tokens", str(n)], env=_env(), capture_output=True, timeout=120)


def _ids_c(files, prompt_argv: list, n: int) -> subprocess.CompletedProcess:
    return subprocess.run([*CMD["mmoe-run"], str(files / "tiny.mmoe"), *prompt_argv, "--greedy", "--ids", "-n", str(n)],
                          capture_output=True, timeout=120)


def test_invalid_utf8_prompt_is_bytes_in_both(files):
    """The byte-level tokenizer takes any bytes: both CLIs pass the shell's bytes through unchanged (Python gets
    them back from argv's surrogateescape) and so generate the same ids; a different byte changes the prompt."""
    out = {}
    for name, prompt in (("invalid", b"ab\xff\xfe c\x80"), ("other", b"ab\xfd\xfe c\x80")):
        py, c = _ids_python(files, [b"--prompt", prompt], 6), _ids_c(files, [b"-p", prompt], 6)
        assert py.returncode == 0 and c.returncode == 0, (py.stderr, c.stderr)
        assert py.stdout.strip() == c.stdout.strip() != b"", (py.stdout, c.stdout)
        assert b"Traceback" not in py.stderr
        out[name] = py.stdout
    from mobile.engine import Engine

    with Engine(files / "tiny.mmoe") as eng:  # the tokenizer saw the raw bytes, not U+FFFD replacements
        assert eng.tokenize(b"ab\xff\xfe c\x80") != eng.tokenize("ab\ufffd\ufffd c\ufffd")


def test_context_rule_is_the_same_in_both(files):
    """prompt tokens + new tokens <= the model's context: accepted at the limit, rejected one past it, by both."""
    from mobile.engine import Engine

    with Engine(files / "tiny.mmoe") as eng:
        ctx = eng.max_ctx
    ids = ["--prompt-ids", "1,2,3"]
    at_limit = ctx - 3
    for run in (_ids_python, _ids_c):
        ok = run(files, ids, at_limit)
        assert ok.returncode == 0, ok.stderr
        # --ignore-eos is mmoe-run only; a random-init model rarely emits a stop token, so count only <= limit
        assert 1 <= len(ok.stdout.strip().split(b",")) <= at_limit
        bad = run(files, ids, at_limit + 1)
        assert bad.returncode == 2 and b"exceed" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_info_prints_a_valid_file(files):
    r = subprocess.run([*CMD["info"], "--model", str(files / "tiny.mmoe")], env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^n_layers\s+2$", r.stdout, re.M) and "layers.0.attn.wq" in r.stdout


def test_info_without_the_engine_says_so_in_one_line(files, tmp_path):
    env = dict(_env(), MMOE_LIB=str(tmp_path / "libmmoe.so"))
    r = subprocess.run([*CMD["info"], "--model", str(files / "tiny.mmoe")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not built" in lines[0] and "tiny.mmoe" in lines[0], r.stderr


# ---- help: every option documented with its default ----------------------------------------------------------
def _parsers():
    import bench.eval
    import mobile.__main__ as mm
    import mobile.gguf_export
    import model.hf

    top = mm.build_parser()
    sub = next(a for a in top._actions if a.__class__.__name__ == "_SubParsersAction")
    yield from sub.choices.items()
    yield "gguf", mobile.gguf_export.build_parser()
    import argparse

    class Captured(Exception):
        pass

    # bench.eval and model.hf build their parser inside main_impl: capture it at parse time
    for name, fn in (("eval", bench.eval.main_impl), ("hf", model.hf.main_impl)):
        got = {}
        orig = argparse.ArgumentParser.parse_args

        def grab(self, *a, _got=got, **k):
            _got["p"] = self
            raise Captured

        argparse.ArgumentParser.parse_args = grab
        try:
            with pytest.raises(Captured):
                fn([])
        finally:
            argparse.ArgumentParser.parse_args = orig
        p = got["p"]
        subs = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if subs:
            yield from ((f"{name} {k}", v) for k, v in subs[0].choices.items())
        else:
            yield name, p


def test_every_python_option_has_help_and_shows_its_default():
    from model.cli import HelpFormatter

    seen = 0
    for name, p in _parsers():
        assert issubclass(p.formatter_class, HelpFormatter), name
        for a in p._actions:
            if a.__class__.__name__ in ("_HelpAction", "_SubParsersAction"):
                continue
            assert a.help, f"{name}: {a.option_strings or a.dest} has no help"
            seen += 1
        text = p.format_help()
        if any(a.option_strings and a.default not in (None, False) for a in p._actions if a.help):
            assert "(default:" in text, name
    assert seen > 40


def test_mmoe_run_help_documents_every_option(files):
    r = subprocess.run([*CMD["mmoe-run"], "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == ""
    src = (ROOT / "mobile" / "c" / "main.c").read_text()
    opts = sorted(set(re.findall(r'strcmp\(a, "(-[-\w]+)"\)', src)))
    assert len(opts) >= 15, opts
    lines = r.stdout.splitlines()
    for o in opts:
        at = [i for i, ln in enumerate(lines) if re.match(rf"\s+(-\w, )?{re.escape(o)}(?![\w-])", ln)
              or re.match(rf"\s+-\w, {re.escape(o)}(?![\w-])", ln)]
        assert at, f"{o} missing from mmoe-run --help"
        if o in ("-h", "--help"):
            continue
        block = lines[at[0]]
        for ln in lines[at[0] + 1:]:
            if not ln.startswith(" " * 20):
                break
            block += ln
        assert "default" in block, f"{o}: no default in {block!r}"
