"""`python -m bench.eval` (make eval): the paper suite is real lm-eval tasks, pre-flight failures are immediate
one-line errors, and a local run writes and prints the result table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bench.eval import PAPER, main
from model.config import get_config
from model.io import save_model_dir
from model.model import MobileMoE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-init tiny QAT run directory (<run>/final), byte tokenizer (no tokenizer.json)."""
    run = tmp_path_factory.mktemp("run")
    m = MobileMoE(get_config("tiny", vocab_size=256, n_layers=2, max_seq_len=512)).set_qat(True)
    save_model_dir(m, run / "final")
    return run


def _cli(args, env_extra=None, timeout=120):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "bench.eval", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _yaml_cfg(path: Path) -> dict:
    """A task YAML with its `include:` chain merged (lm-eval's rule: the including file wins)."""

    class L(yaml.SafeLoader):
        pass

    L.add_multi_constructor("!", lambda loader, suffix, node: None)  # !function tags: not needed here
    cfg = yaml.load(path.read_text(), Loader=L) or {}
    if "include" in cfg:
        base = _yaml_cfg(path.parent / cfg["include"])
        base.update({k: v for k, v in cfg.items() if k != "include"})
        cfg = base
    return cfg


def test_paper_suite_is_14_real_lm_eval_tasks():
    from lm_eval.tasks import TaskManager

    assert len(PAPER) == 14 and len({s.task for s in PAPER}) == 14
    tm = TaskManager()
    missing = [s.task for s in PAPER if s.task not in tm.all_tasks]
    assert not missing, f"not in the installed lm-eval: {missing}"
    cats = {s.category.split("/")[0] for s in PAPER}
    assert {"commonsense", "knowledge", "math", "code", "science"} <= cats
    for s in PAPER:
        name = "mmlu_abstract_algebra" if s.task == "mmlu" else s.task  # mmlu is a group: check a member
        entry = tm.task_index[name]
        cfg = _yaml_cfg(Path(entry.yaml_path))
        if s.task == "mmlu":
            cfg = {**_yaml_cfg(Path(entry.yaml_path).parent / "_default_template_yaml"), **cfg}
        assert cfg.get("dataset_path") == s.datasets[0], (s.task, cfg.get("dataset_path"))
        metrics = [m["metric"] for m in cfg.get("metric_list", []) if isinstance(m.get("metric"), str)]
        if metrics:  # humaneval/mbpp name their metric through a !function
            assert s.metric in metrics, (s.task, metrics)
        assert bool(cfg.get("unsafe_code", False)) == s.executes_code, s.task


def test_code_tasks_need_explicit_opt_in(model_dir):
    r = _cli(["--ckpt", str(model_dir), "--suite", "paper"])
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert "humaneval" in err[0] and "mbpp" in err[0] and "--allow-code-execution" in err[0]


@pytest.mark.parametrize("suite,flags", [("paper", ["--allow-code-execution"]), ("quick", [])])
def test_unreachable_hub_fails_at_once_naming_datasets(model_dir, tmp_path, suite, flags):
    # a closed local port as the hub and an empty cache: nothing can be fetched
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    for k in ("HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        env[k] = str(tmp_path / "hf" / k)
    r = _cli(["--ckpt", str(model_dir), "--suite", suite, *flags], env, timeout=60)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "unreachable" in err[0], r.stderr[-2000:]
    names = {d for s in PAPER if suite == "paper" or s.task in ("arc_easy", "hellaswag", "piqa", "winogrande",
                                                                "boolq") for d in s.datasets}
    for d in names:
        assert d in err[0], d
    assert not (model_dir / "eval").exists()  # failed before evaluating anything


def test_bad_inputs_are_one_line_errors(model_dir, tmp_path, capsys):
    for args, needle in ((["--ckpt", str(tmp_path / "nope")], "not a model directory"),
                         (["--ckpt", str(model_dir), "--suite", "huge"], "--suite"),
                         (["--ckpt", str(model_dir), "--engine", "gpu"], "unknown engine")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err
    r = _cli(["--ckpt", str(tmp_path / "nope")])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not a model directory" in r.stderr


def test_local_run_writes_and_prints_the_table(model_dir, capsys):
    n = torch.get_num_threads()
    try:
        rc = main(["--ckpt", str(model_dir), "--suite", "local", "--engine", "float,torch", "--limit", "6",
                   "--threads", "1"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    out = capsys.readouterr().out
    md = (model_dir / "eval" / "local.md").read_text()
    assert md in out
    lines = [ln for ln in md.splitlines() if ln.startswith(f"| {model_dir.name}/final |")]
    assert [ln.split("|")[2].strip() for ln in lines] == ["float", "fake-quant INT4 (torch, as saved)"]
    data = json.loads((model_dir / "eval" / "local.json").read_text())
    assert data["suite"] == "local" and len(data["rows"]) == 2
    for row in data["rows"]:
        assert set(row["metrics"]) == {"shakespeare_nextline", "shakespeare_cloze", "shakespeare_order"}
        for m in row["metrics"].values():
            assert m["n"] == 6 and 0.0 <= m["acc"] <= 1.0
