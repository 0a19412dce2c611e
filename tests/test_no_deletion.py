"""No command deletes what it did not write (model/atomic.py and its callers).

For each writer: (a) a non-empty unrelated folder is refused and left intact, with a one-line error and a
non-zero exit; (b) a regular file where a folder goes (or a folder where a file goes) is refused, even with
--force; (c) writing over its own previous output works; (d) --force replaces an unrelated target; (e) a
failure in the middle of the write leaves the previous output byte-identical and no temporary files behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import model.atomic as atomic
from model.atomic import MARKER, TargetExistsError
from model.config import get_config
from model.model import MobileMoE

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers -------------------------------------------------------------------------------------------------
def tree(p: Path) -> dict[str, bytes]:
    """Every file under `p` (or `p` itself) with its bytes: 'intact' means this is unchanged."""
    if p.is_file():
        return {".": p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def user_dir(p: Path) -> Path:
    (p / "sub").mkdir(parents=True)
    (p / "notes.txt").write_text("my notes\n")
    (p / "sub" / "data.bin").write_bytes(os.urandom(64))
    return p


def user_file(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("precious\n")
    return p


def assert_one_line_refusal(rc: int, err: str, path: Path, force_hint: bool = True) -> None:
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and str(path) in lines[0], err
    assert ("--force" in lines[0]) == force_hint, err


def no_junk(parent: Path) -> None:
    """No temporary siblings (.<name>.tmp-*, .<name>.*.tmp, .<name>.old-*) left in `parent`."""
    assert [f.name for f in parent.iterdir() if f.name.startswith(".")] == []


def fail_fsync(monkeypatch) -> None:
    """A disk-full error after the data is written, while the output is being made durable."""
    def boom(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "fsync", boom)


@pytest.fixture(scope="module")
def tiny_model():
    return MobileMoE(get_config("tiny", n_layers=2)).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    from model.io import save_model_dir

    return save_model_dir(tiny_model, tmp_path_factory.mktemp("md") / "model")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_model):
    from model.hf import export_hf

    return export_hf(tiny_model, tmp_path_factory.mktemp("hf") / "hf")


# ---- model/atomic.py itself ------------------------------------------------------------------------------------
def test_publish_dir_rules(tmp_path):
    out = tmp_path / "out"
    with atomic.publish_dir(out, kind="k1") as t:
        (t / "a").write_text("1")
    assert json.loads((out / MARKER).read_text())["kind"] == "k1"
    with atomic.publish_dir(out, kind="k1") as t:  # own output: replaced
        (t / "a").write_text("2")
    assert (out / "a").read_text() == "2"
    with pytest.raises(TargetExistsError, match="different MobileMoE output"):
        with atomic.publish_dir(out, kind="k2"):
            pass
    (tmp_path / "empty").mkdir()
    with atomic.publish_dir(tmp_path / "empty", kind="k2") as t:  # an empty folder holds nothing to lose
        (t / "b").write_text("x")
    assert (tmp_path / "empty" / "b").read_text() == "x"
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(TargetExistsError, match="symbolic link"):
        with atomic.publish_dir(link, kind="k1", force=True):
            pass
    no_junk(tmp_path)


def test_publish_dir_without_rename_exchange(tmp_path, monkeypatch):
    """The two-rename fallback (no renameat2): same result, previous output gone, nothing left over."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for v in ("1", "2"):
        with atomic.publish_dir(out, kind="k") as t:
            (t / "a").write_text(v)
    assert (out / "a").read_text() == "2" and sorted(p.name for p in out.iterdir()) == [MARKER, "a"]
    no_junk(tmp_path)


def test_file_rules(tmp_path):
    f = tmp_path / "f.bin"
    atomic.atomic_write(f, b"MAGICxyz", magic=b"MAGIC")
    atomic.atomic_write(f, b"MAGICabc", magic=b"MAGIC")
    assert f.read_bytes() == b"MAGICabc"
    other = user_file(tmp_path / "other.bin")
    with pytest.raises(TargetExistsError, match="--force"):
        atomic.atomic_write(other, b"MAGIC", magic=b"MAGIC")
    assert other.read_text() == "precious\n"
    (tmp_path / "empty.bin").touch()
    atomic.atomic_write(tmp_path / "empty.bin", b"MAGIC!", magic=b"MAGIC")
    with pytest.raises(TargetExistsError, match="is a directory"):
        atomic.atomic_write(tmp_path, b"MAGIC", magic=b"MAGIC", force=True)
    with pytest.raises(TargetExistsError, match="is a file, not a directory"):  # parent is a file
        atomic.atomic_write(other / "x", b"MAGIC")
    assert oct(f.stat().st_mode & 0o777) == oct(0o666 & ~atomic._umask())  # not mkstemp's 0600
    no_junk(tmp_path)


def test_torch_free():
    r = subprocess.run([sys.executable, "-c", "import sys, model.atomic, mobile.format; "
                        "assert 'torch' not in sys.modules, 'torch imported'"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---- model/io.py save_model_dir --------------------------------------------------------------------------------
def test_save_model_dir(tmp_path, tiny_model):
    from model.io import load_model_dir, save_model_dir

    foreign = user_dir(tmp_path / "foreign")
    before = tree(foreign)
    with pytest.raises(TargetExistsError) as ei:  # (a)
        save_model_dir(tiny_model, foreign)
    assert "\n" not in str(ei.value) and str(foreign) in str(ei.value) and "--force" in str(ei.value)
    assert tree(foreign) == before
    f = user_file(tmp_path / "file")
    with pytest.raises(TargetExistsError, match="is a file"):  # (b), force or not
        save_model_dir(tiny_model, f, force=True)
    assert f.read_text() == "precious\n"
    out = save_model_dir(tiny_model, tmp_path / "m")  # (c): own output, then a pre-marker one
    save_model_dir(tiny_model, out, extra=dict(step=1))
    (out / MARKER).unlink()
    (out / "model.mmoe").write_bytes(b"MMOEINT4")  # bench/lm_eval_adapter.py exports beside the weights
    save_model_dir(tiny_model, out, extra=dict(step=2))
    assert load_model_dir(out)[1]["step"] == 2
    save_model_dir(tiny_model, foreign, force=True)  # (d)
    assert not (foreign / "notes.txt").exists() and load_model_dir(foreign)[0].cfg.n_layers == 2
    no_junk(tmp_path)


def test_save_model_dir_failure_keeps_previous(tmp_path, tiny_model, monkeypatch):
    import model.io as mio

    out = mio.save_model_dir(tiny_model, tmp_path / "m")
    before = tree(out)

    def half_then_fail(state, path, **kw):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mio, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        mio.save_model_dir(tiny_model, out)
    monkeypatch.undo()
    fail_fsync(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        mio.save_model_dir(tiny_model, out)
    assert tree(out) == before
    no_junk(tmp_path)


# ---- python -m model.hf export / import ------------------------------------------------------------------------
def hf_main(argv, capsys):
    from model.hf import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_hf_export_cli(tmp_path, model_dir, capsys):
    from model.hf import import_hf

    foreign = user_dir(tmp_path / "foreign")
    before = tree(foreign)
    rc, err = hf_main(["export", model_dir, foreign], capsys)  # (a)
    assert_one_line_refusal(rc, err, foreign)
    assert tree(foreign) == before
    f = user_file(tmp_path / "file.txt")
    rc, err = hf_main(["export", model_dir, f, "--force"], capsys)  # (b): never a file by a folder
    assert_one_line_refusal(rc, err, f, force_hint=False)
    assert f.read_text() == "precious\n"
    rc, err = hf_main(["export", model_dir, model_dir], capsys)  # a model dir is not an HF export
    assert_one_line_refusal(rc, err, model_dir)
    assert (model_dir / "config.json").is_file() and "config" in json.loads((model_dir / "config.json").read_text())
    out = tmp_path / "hf"
    assert hf_main(["export", model_dir, out], capsys)[0] == 0
    assert hf_main(["export", model_dir, out], capsys)[0] == 0  # (c)
    (out / MARKER).unlink()  # an export from before the marker: recognised by its files + metadata key
    assert hf_main(["export", model_dir, out], capsys)[0] == 0
    assert hf_main(["export", model_dir, foreign, "--force"], capsys)[0] == 0  # (d)
    assert not (foreign / "notes.txt").exists() and import_hf(foreign).cfg.n_layers == 2
    no_junk(tmp_path)


def test_hf_export_subprocess_refusal(tmp_path, model_dir):
    foreign = user_dir(tmp_path / "run")  # e.g. a whole run directory given as the target
    before = tree(foreign)
    r = subprocess.run([sys.executable, "-m", "model.hf", "export", str(model_dir), str(foreign)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert_one_line_refusal(r.returncode, r.stderr, foreign)
    assert tree(foreign) == before


def test_hf_export_failure_keeps_previous(tmp_path, tiny_model, monkeypatch):
    import model.hf as hf

    out = hf.export_hf(tiny_model, tmp_path / "hf")
    before = tree(out)

    def half_then_fail(state, path, **kw):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hf, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        hf.export_hf(tiny_model, out)
    monkeypatch.undo()
    fail_fsync(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        hf.export_hf(tiny_model, out)
    assert tree(out) == before
    no_junk(tmp_path)


def test_hf_import_cli(tmp_path, hf_dir, capsys, monkeypatch):
    from model.io import load_model_dir

    foreign = user_dir(tmp_path / "foreign")
    before = tree(foreign)
    rc, err = hf_main(["import", hf_dir, foreign], capsys)  # (a)
    assert_one_line_refusal(rc, err, foreign)
    assert tree(foreign) == before
    f = user_file(tmp_path / "file.txt")
    rc, err = hf_main(["import", hf_dir, f, "--force"], capsys)  # (b)
    assert_one_line_refusal(rc, err, f, force_hint=False)
    assert f.read_text() == "precious\n"
    out = tmp_path / "m"
    assert hf_main(["import", hf_dir, out], capsys)[0] == 0
    assert hf_main(["import", hf_dir, out], capsys)[0] == 0  # (c)
    assert hf_main(["import", hf_dir, foreign, "--force"], capsys)[0] == 0  # (d)
    assert not (foreign / "notes.txt").exists() and load_model_dir(foreign)[0].cfg.n_layers == 2
    before = tree(out)  # (e)
    fail_fsync(monkeypatch)
    rc, err = hf_main(["import", hf_dir, out], capsys)
    assert rc == 2 and "No space" in err and len(err.strip().splitlines()) == 1
    assert tree(out) == before
    no_junk(tmp_path)


# ---- python -m mobile export (.mmoe and --format gguf) --------------------------------------------------------
def mobile_main(argv, capsys):
    from mobile.__main__ import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["mmoe", "gguf"])
def test_mobile_export_cli(tmp_path, model_dir, capsys, fmt):
    if fmt == "gguf":
        pytest.importorskip("gguf")
        args, magic = ["--format", "gguf", "--type", "f32"], b"GGUF"
    else:
        args, magic = [], b"MMOEINT4"
    src = ["--random-init", "--size", "tiny", *args]

    foreign = user_dir(tmp_path / "foreign")
    before = tree(foreign)
    for force in ([], ["--force"]):  # (a)/(b): a folder is never replaced by the file
        rc, err = mobile_main(["export", *src, "--out", foreign, *force], capsys)
        assert_one_line_refusal(rc, err, foreign, force_hint=False)
    assert tree(foreign) == before
    f = user_file(tmp_path / f"model.{fmt}")
    rc, err = mobile_main(["export", *src, "--out", f], capsys)  # not one of ours
    assert_one_line_refusal(rc, err, f)
    assert f.read_text() == "precious\n"
    out = tmp_path / f"out.{fmt}"
    assert mobile_main(["export", *src, "--out", out], capsys)[0] == 0
    first = out.read_bytes()
    assert first[:len(magic)] == magic
    rc, err = mobile_main(["export", "--ckpt", model_dir, *args, "--out", out], capsys)  # (c)
    assert rc == 0, err
    assert out.read_bytes() != first and out.read_bytes()[:len(magic)] == magic
    assert mobile_main(["export", *src, "--out", f, "--force"], capsys)[0] == 0  # (d)
    assert f.read_bytes() == first  # same seed, same bytes
    no_junk(tmp_path)


def test_mmoe_failure_keeps_previous(tmp_path):
    from mobile.export import export_random, random_tensors
    from mobile.format import TensorSpec, byte_tokenizer, write_mmoe

    out = export_random("tiny", tmp_path / "m.mmoe")
    before = out.read_bytes()
    cfg = get_config("tiny").to_dict()
    specs = random_tensors(cfg)

    def fail(f):
        f.write(b"\0" * 10)
        raise OSError(28, "No space left on device")
    specs[len(specs) // 2] = TensorSpec(specs[len(specs) // 2].name, specs[len(specs) // 2].dtype,
                                        specs[len(specs) // 2].shape, fail)
    with pytest.raises(OSError, match="No space"):
        write_mmoe(out, cfg, specs, byte_tokenizer())
    assert out.read_bytes() == before
    no_junk(tmp_path)


def test_gguf_failure_keeps_previous(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import mobile.gguf_export as ge

    cfg = get_config("tiny", n_layers=2)
    out = ge.export_random_init(cfg, tmp_path / "m.gguf", "f32")
    before = out.read_bytes()
    calls = []
    real = ge._encode

    def fail_later(t, kind, qtype, *name):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(t, kind, qtype, *name)
    monkeypatch.setattr(ge, "_encode", fail_later)
    with pytest.raises(OSError, match="No space"):
        ge.export_random_init(cfg, out, "f32", seed=1)
    assert len(calls) == 4 and out.read_bytes() == before
    no_junk(tmp_path)


# ---- python -m bench.eval outputs --------------------------------------------------------------------------------
def test_bench_eval_outputs(tmp_path, model_dir, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from bench.eval import main, write_results

    out = tmp_path / "ev"
    out.mkdir()
    (out / "local.json").write_text('{"mine": 1}\n')  # a user's file that happens to have the name
    (out / "keep.txt").write_text("keep\n")
    before = tree(out)
    rc = main(["--ckpt", str(model_dir), "--suite", "local", "--engine", "float", "--out", str(out)])  # (a)
    assert_one_line_refusal(rc, capsys.readouterr().err, out / "local.json")
    assert tree(out) == before
    f = user_file(tmp_path / "file")
    rc = main(["--ckpt", str(model_dir), "--suite", "local", "--engine", "float", "--out", str(f), "--force"])
    assert_one_line_refusal(rc, capsys.readouterr().err, f, force_hint=False)  # (b)
    assert f.read_text() == "precious\n"

    payload = dict(suite="local", rows=[dict(model="m", score=1)])
    md_text = "| model | engine | t |\n|---|---|---|\n| m | float | 1.0 |\n"
    mine = tmp_path / "mine"
    write_results(mine, "local", payload, md_text)
    write_results(mine, "local", dict(payload, rows=[]), md_text)  # (c)
    assert json.loads((mine / "local.json").read_text())["rows"] == []
    with pytest.raises(TargetExistsError):  # the .md refused -> the .json not written either
        (mine / "local.md").write_text("my own notes\n")
        write_results(mine, "local", payload, md_text)
    assert json.loads((mine / "local.json").read_text())["rows"] == []
    write_results(out, "local", payload, md_text, force=True)  # (d)
    assert json.loads((out / "local.json").read_text())["rows"] and (out / "keep.txt").read_text() == "keep\n"
    before = tree(out)  # (e)
    fail_fsync(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        write_results(out, "local", dict(payload, rows=[]), md_text)
    assert tree(out) == before
    no_junk(out)
