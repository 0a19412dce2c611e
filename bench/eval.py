"""Score MobileMoE checkpoints with lm-eval: `python -m bench.eval` (the `make eval` target).

    python -m bench.eval --ckpt runs/tiny --suite local                       # float vs fake-quant vs INT4 engine
    python -m bench.eval --ckpt runs/tiny --stages --suite local --engine float   # stage by stage
    python -m bench.eval --ckpt runs/S/final,runs/M/final --suite paper --allow-code-execution

--ckpt: model directories or run directories (<run>/final is used; --stages adds every <run>/<stage>/model),
comma-separated or repeated. --engine: comma list of torch (as saved: fake quant on for QAT checkpoints),
float (= torch-float), fakequant (= torch-fakequant), int4 (= mobile, the C phone engine), or all.
Suites: local = the offline Shakespeare tasks in bench/tasks (no network); quick = 5 zero-shot commonsense
tasks on 200 items each; paper = the 14 benchmarks of bench/EVAL.md with their few-shot settings.
Results: a markdown + JSON table in <run>/eval/<suite>.{md,json} (or --out), also printed; an existing
<suite>.{md,json} that is not an earlier result of this command is refused (checked before evaluating) unless --force.
Hub suites check the Hugging Face hub before loading anything and fail at once, naming the datasets, when it
is unreachable and they are not cached. humaneval and mbpp EXECUTE model-written code: they run only with
--allow-code-execution.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from model.atomic import atomic_write, check_file_target, check_folder

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
ENGINE_CHOICES = ("torch", "float", "fakequant", "int4", "mobile", "all")
ENGINE_ALIASES = {"torch": "torch", "float": "torch-float", "torch-float": "torch-float",
                  "fakequant": "torch-fakequant", "torch-fakequant": "torch-fakequant",
                  "int4": "mobile", "mobile": "mobile"}
STAGE_ORDER = ("pretrain", "midtrain", "sft", "qat")


@dataclass(frozen=True)
class TaskSpec:
    task: str  # lm-eval task or group name (verified against the installed lm-eval by tests/test_eval_cli.py)
    fewshot: int
    metric: str  # the headline metric key in lm-eval's results ("acc", "acc_norm", "exact_match", ...)
    filter: str  # lm-eval filter name the metric is reported under
    category: str
    datasets: tuple[str, ...]  # hub datasets it downloads (checked when the hub is unreachable)
    executes_code: bool = False
    needs: str = ""  # an importable module the scorer needs (from the `eval` extra)


# The paper's 14 benchmarks. Few-shot settings follow the common small-LM reporting (MobileLLM / Llama style):
# zero-shot commonsense multiple choice (acc_norm where lm-eval defines it: length-normalised), 5-shot MMLU and
# TriviaQA, lm-eval's default 5-shot GSM8K (flexible answer extraction), 4-shot Minerva prompts on MATH-500,
# 0-shot HumanEval pass@1 and 3-shot MBPP pass@1.
PAPER: tuple[TaskSpec, ...] = (
    TaskSpec("arc_easy", 0, "acc_norm", "none", "commonsense/science", ("allenai/ai2_arc",)),
    TaskSpec("arc_challenge", 0, "acc_norm", "none", "commonsense/science", ("allenai/ai2_arc",)),
    TaskSpec("boolq", 0, "acc", "none", "commonsense/reading", ("aps/super_glue",)),
    TaskSpec("piqa", 0, "acc_norm", "none", "commonsense/physical", ("baber/piqa",)),
    TaskSpec("social_iqa", 0, "acc", "none", "commonsense/social", ("lighteval/siqa",)),
    TaskSpec("hellaswag", 0, "acc_norm", "none", "commonsense", ("Rowan/hellaswag",)),
    TaskSpec("openbookqa", 0, "acc_norm", "none", "science", ("allenai/openbookqa",)),
    TaskSpec("winogrande", 0, "acc", "none", "commonsense/reasoning", ("allenai/winogrande",)),
    TaskSpec("mmlu", 5, "acc", "none", "knowledge", ("cais/mmlu",)),
    TaskSpec("triviaqa", 5, "exact_match", "remove_whitespace", "knowledge", ("mandarjoshi/trivia_qa",)),
    TaskSpec("gsm8k", 5, "exact_match", "flexible-extract", "math", ("openai/gsm8k",)),
    TaskSpec("minerva_math500", 4, "math_verify", "none", "math", ("HuggingFaceH4/MATH-500",),
             needs="math_verify"),
    TaskSpec("humaneval", 0, "pass@1", "create_test", "code", ("openai/openai_humaneval",), executes_code=True),
    TaskSpec("mbpp", 3, "pass_at_1", "none", "code", ("google-research-datasets/mbpp",), executes_code=True),
)
QUICK_TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande", "boolq")
QUICK_LIMIT = 200
LOCAL: tuple[TaskSpec, ...] = (
    TaskSpec("shakespeare_nextline", 0, "acc", "none", "in-domain (offline)", ()),
    TaskSpec("shakespeare_cloze", 0, "acc", "none", "in-domain (offline)", ()),
    TaskSpec("shakespeare_order", 0, "acc", "none", "in-domain (offline)", ()),
)


class EvalError(RuntimeError):
    """A user-facing problem: printed as one line, non-zero exit."""


def suite_specs(suite: str) -> tuple[tuple[TaskSpec, ...], int | None]:
    if suite == "local":
        return LOCAL, None
    if suite == "paper":
        return PAPER, None
    if suite == "quick":
        return tuple(s for s in PAPER if s.task in QUICK_TASKS), QUICK_LIMIT
    raise EvalError(f"unknown suite {suite!r}: choose local, quick or paper")


# ----------------------------------------------------------------------------------------------------------
# Pre-flight checks for hub suites: all before any model or dataset is loaded.
def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 5.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "TRUE", "yes"):
        return False
    u = urlparse(hub_endpoint())
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def dataset_cached(name: str) -> bool:
    """A dataset present in the local Hugging Face caches (hub snapshot or `datasets` arrow cache)."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    ds_cache = Path(os.environ.get("HF_DATASETS_CACHE", hf_home / "datasets"))
    return (hub / f"datasets--{name.replace('/', '--')}").is_dir() or (ds_cache / name.replace("/", "___")).is_dir()


def preflight(specs: tuple[TaskSpec, ...], allow_code: bool) -> None:
    code = [s.task for s in specs if s.executes_code]
    if code and not allow_code:
        raise EvalError(f"{', '.join(code)} execute model-written Python code; rerun with --allow-code-execution "
                        f"(make eval ... ALLOW_CODE=1) to accept that, ideally in a sandbox, or --skip-code-tasks")
    datasets_ = sorted({d for s in specs for d in s.datasets})
    if datasets_ and not hub_reachable():
        missing = [d for d in datasets_ if not dataset_cached(d)]
        if missing:
            raise EvalError(f"the Hugging Face hub ({hub_endpoint()}) is unreachable and these datasets are not "
                            f"cached locally: {', '.join(missing)}")
        os.environ["HF_DATASETS_OFFLINE"] = "1"  # everything is cached: do not let `datasets` try the network
        os.environ["HF_HUB_OFFLINE"] = "1"
    for s in specs:
        if s.needs:
            try:
                __import__(s.needs)
            except ImportError as e:
                raise EvalError(f"{s.task} needs the '{s.needs}' package: "
                                f"pip install -c constraints-cpu.txt -e '.[eval]' ({e})") from e


# ----------------------------------------------------------------------------------------------------------
def expand_ckpts(items: list[str], stages: bool) -> list[tuple[str, Path]]:
    """[(label, model dir)] for the given model / run directories."""
    from bench.lm_eval_adapter import resolve_model_dir  # noqa: PLC0415

    out: list[tuple[str, Path]] = []
    for item in items:
        p = Path(item)
        if stages and not (p / "config.json").is_file():
            found = [d for d in sorted(p.glob("*/model")) if (d / "config.json").is_file()]
            rank = {n: i for i, n in enumerate(STAGE_ORDER)}
            found.sort(key=lambda d: (rank.get(d.parent.name, len(rank)), d.parent.name))
            out += [(f"{p.name}/{d.parent.name}", d) for d in found]
        try:
            md = resolve_model_dir(p)
        except FileNotFoundError as e:
            if stages and out:
                continue
            raise EvalError(str(e)) from e
        label = f"{p.name}/{md.name}" if md != p else (f"{p.parent.name}/{p.name}" if p.parent.name else p.name)
        if md not in [d for _, d in out]:
            out.append((label, md))
    return out


def run_dir_of(model_dir: Path) -> Path:
    """Where results go: the run directory that holds the model (<run>/final, <run>/<stage>/model)."""
    if model_dir.name == "final":
        return model_dir.parent
    if model_dir.name == "model" and model_dir.parent.parent.exists():
        return model_dir.parent.parent
    return model_dir


def evaluate_one(lm, specs: tuple[TaskSpec, ...], suite: str, limit: int | float | None, allow_code: bool,
                 task_manager) -> dict[str, dict[str, float]]:
    """{task: {metric: value, metric_stderr: value}} for one model+engine, one simple_evaluate per few-shot."""
    from lm_eval import simple_evaluate  # noqa: PLC0415

    out: dict[str, dict[str, float]] = {}
    by_shots: dict[int, list[TaskSpec]] = {}
    for s in specs:
        by_shots.setdefault(s.fewshot, []).append(s)
    for shots, group in by_shots.items():
        res = simple_evaluate(model=lm, tasks=[s.task for s in group], num_fewshot=shots, limit=limit,
                              task_manager=task_manager, log_samples=False, bootstrap_iters=1000,
                              confirm_run_unsafe_code=allow_code, random_seed=0, numpy_random_seed=1234,
                              torch_random_seed=1234, fewshot_random_seed=1234)
        for s in group:
            r = res["results"].get(s.task, {})
            m = {}
            for k, v in r.items():
                if "," in k and isinstance(v, (int, float)):
                    name, filt = k.split(",", 1)
                    if filt == s.filter:
                        m[name] = float(v)
            if s.metric not in m:
                raise EvalError(f"{s.task}: lm-eval returned no '{s.metric},{s.filter}' (got {sorted(r)})")
            m["n"] = float(res.get("n-samples", {}).get(s.task, {}).get("effective", 0))
            out[s.task] = m
    return out


def markdown_table(suite: str, specs: tuple[TaskSpec, ...], rows: list[dict]) -> str:
    head = "| model | engine | " + " | ".join(f"{s.task} ({s.metric}, {s.fewshot}-shot)" for s in specs)
    head += " | mean |" if len(specs) > 1 else " |"
    sep = "|---|---|" + "---|" * (len(specs) + (1 if len(specs) > 1 else 0))
    lines = [head, sep]
    for r in rows:
        cells, vals = [], []
        for s in specs:
            m = r["metrics"].get(s.task, {})
            v, se = m.get(s.metric), m.get(f"{s.metric}_stderr")
            vals.append(v)
            cells.append("–" if v is None else (f"{100 * v:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * v:.1f}"))
        if len(specs) > 1:
            ok = [v for v in vals if v is not None]
            cells.append(f"{100 * sum(ok) / len(ok):.1f}" if ok else "–")
        lines.append(f"| {r['model']} | {r['engine']} | " + " | ".join(cells) + " |")
    n = {s.task: int(rows[0]["metrics"].get(s.task, {}).get("n", 0)) for s in specs} if rows else {}
    note = f"\nSuite `{suite}`; scores in %, ± = lm-eval's standard error; items per task: " + \
        ", ".join(f"{t} {k}" for t, k in n.items())
    return "\n".join(lines) + "\n" + note + "\n"


def _is_eval_json(p: Path) -> bool:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "suite" in d and "rows" in d


def _is_eval_md(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8", errors="replace") as fh:
            return fh.readline().startswith("| model | engine |")
    except OSError:
        return False


def result_paths(out_dir: Path, suite: str) -> tuple[Path, Path]:
    return out_dir / f"{suite}.json", out_dir / f"{suite}.md"


def check_outputs(out_dir: Path, suite: str, force: bool = False) -> None:
    """Raise TargetExistsError unless both result files may be written: `out_dir` is (or can be made) a folder,
    and each file is new or a previous result of this command (force=True: any file). Nothing else in
    `out_dir` is ever touched. Called before evaluating, so a refusal costs nothing."""
    js, md = result_paths(out_dir, suite)
    check_folder(out_dir)
    check_file_target(js, is_ours=_is_eval_json, what="a bench.eval result (.json)", force=force)
    check_file_target(md, is_ours=_is_eval_md, what="a bench.eval result table (.md)", force=force)


def write_results(out_dir: Path, suite: str, payload: dict, md_text: str, force: bool = False) -> tuple[Path, Path]:
    """Write <out_dir>/<suite>.json and .md, each atomically (model/atomic.py)."""
    check_outputs(out_dir, suite, force)  # both before either: no half-updated pair on a refusal
    js, md = result_paths(out_dir, suite)
    atomic_write(js, json.dumps(payload, indent=2) + "\n", is_ours=_is_eval_json, force=force)
    atomic_write(md, md_text, is_ours=_is_eval_md, force=force)
    return js, md


def parse_list(values: list[str]) -> list[str]:
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


SUITES = ("local", "quick", "paper")


def limit_arg(s: str) -> int | float:
    """--limit: a whole number of items >= 1, or a fraction in (0, 1) (lm-eval's two meanings of `limit`)."""
    from model.cli import positive_float  # noqa: PLC0415

    v = positive_float(s)
    if v >= 1 and v != int(v):
        raise argparse.ArgumentTypeError(f"must be a whole number of items >= 1 or a fraction in (0, 1), got {s!r}")
    return int(v) if v >= 1 else v


def main(argv: list[str] | None = None) -> int:
    from model.cli import run  # noqa: PLC0415

    return run(main_impl, argv)


def main_impl(argv: list[str]) -> int:
    from model.cli import choices, one_of, parser, positive_int  # noqa: PLC0415

    p = parser("python -m bench.eval", __doc__)
    p.add_argument("--ckpt", action="append", required=True, help="model or run directory (repeat or comma list)")
    p.add_argument("--suite", default="local", type=one_of(SUITES), metavar=choices(SUITES), help="task suite")
    p.add_argument("--engine", default="all", help="comma list of " + choices(ENGINE_CHOICES))
    p.add_argument("--stages", action="store_true", help="also score every <run>/<stage>/model")
    p.add_argument("--limit", type=limit_arg, default=None,
                   help="items per task for smoke runs: a count >= 1 or a fraction in (0, 1); default: the suite's")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (torch and the C engine)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="lm-eval batch size")
    p.add_argument("--mmoe", default=None, help="the .mmoe file for engine int4 (one checkpoint only); "
                   "default <model dir>/model.mmoe, exported when missing or older than the weights")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run humaneval/mbpp, which execute model-written code")
    p.add_argument("--skip-code-tasks", action="store_true", help="leave humaneval/mbpp out of the suite")
    p.add_argument("--out", default=None, help="output directory (default <run>/eval)")
    p.add_argument("--force", action="store_true",
                   help="overwrite <out>/<suite>.{json,md} even when they are not earlier bench.eval results")
    p.add_argument("-v", "--verbose", action="store_true", help="log lm-eval's progress")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not a.verbose:
        for name in ("lm_eval", "lm-eval", "datasets", "httpx"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        specs, limit = suite_specs(a.suite)
        if a.skip_code_tasks:
            specs = tuple(s for s in specs if not s.executes_code)
        if a.limit is not None:
            limit = a.limit
        engines = parse_list([a.engine])
        if engines == ["all"]:
            engines = ["torch-float", "torch", "mobile"]
        bad = [e for e in engines if e not in ENGINE_ALIASES]
        if bad or not engines:
            raise EvalError(f"--engine: unknown engine(s) {', '.join(bad) if bad else repr(a.engine)}: choose a comma "
                            f"list of {choices(ENGINE_CHOICES)}")
        engines = list(dict.fromkeys(ENGINE_ALIASES[e] for e in engines))
        items = parse_list(a.ckpt)
        if not items:
            raise EvalError(f"--ckpt: no model or run directory given (got {a.ckpt!r})")
        ckpts = expand_ckpts(items, a.stages)
        if not ckpts:
            raise EvalError(f"--ckpt {', '.join(items)}: no model directory found")
        if a.mmoe and len(ckpts) > 1:
            raise EvalError("--mmoe names one engine file: use it with a single checkpoint")
        out_dir = Path(a.out) if a.out else run_dir_of(ckpts[0][1]) / "eval"
        check_outputs(out_dir, a.suite, a.force)  # before hours of evaluation, not after
        preflight(specs, a.allow_code_execution)
        if a.allow_code_execution:
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # the `evaluate` code_eval metric's own opt-in

        import torch  # noqa: PLC0415
        from lm_eval.tasks import TaskManager  # noqa: PLC0415

        from bench.lm_eval_adapter import MobileMoELM  # noqa: PLC0415

        torch.set_num_threads(max(1, a.threads))
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=a.suite != "local")
        rows = []
        for label, md in ckpts:
            for eng in engines:
                t0 = time.time()
                lm = MobileMoELM(ckpt=str(md), engine=eng, mmoe=a.mmoe, threads=a.threads, batch_size=a.batch_size)
                qat = bool(lm.engine.model.qat) if eng != "mobile" else None
                shown = {"torch-float": "float", "torch-fakequant": "fake-quant INT4 (torch)", "mobile": "INT4 engine"
                         }.get(lm.engine_name, lm.engine_name)
                if eng == "torch":
                    shown = "fake-quant INT4 (torch, as saved)" if qat else "float (torch, as saved)"
                metrics = evaluate_one(lm, specs, a.suite, limit, a.allow_code_execution, tm)
                rows.append(dict(model=label, model_dir=str(md), engine=shown, engine_arg=eng, metrics=metrics,
                                 seconds=round(time.time() - t0, 1)))
                print(f"[eval] {label} · {shown}: " + ", ".join(
                    f"{s.task} {100 * metrics[s.task][s.metric]:.1f}" for s in specs), file=sys.stderr)
        md_text = markdown_table(a.suite, specs, rows)
        import lm_eval  # noqa: PLC0415

        payload = dict(suite=a.suite, limit=limit, lm_eval_version=getattr(lm_eval, "__version__", "?"),
                       created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       tasks=[dict(task=s.task, fewshot=s.fewshot, metric=s.metric, filter=s.filter) for s in specs],
                       rows=rows)
        js, md = write_results(out_dir, a.suite, payload, md_text, a.force)
        print(md_text)
        print(f"wrote {md} and {js}")
    except (EvalError, OSError, ValueError, RuntimeError) as e:  # OSError: FileNotFoundError, unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
