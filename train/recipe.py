"""The four-stage recipe: `python -m train --size tiny|S|M|L --out runs/<size> [--dry-run] [--resume CKPT]`.

The recipe file (train/configs/<size>.toml, or --config) is parsed and checked by train/recipe_config.py before
anything runs (--dry-run too): an unknown key, a wrong type, a value out of range or an impossible combination
is one line naming the file, section and key, exit 2.

Stages (train/configs/<size>.toml): pretrain -> midtrain -> sft -> qat. Each stage starts from the previous
stage's model directory, writes checkpoints to <run>/<stage>/ckpt/, its per-step log to <run>/<stage>/log.jsonl,
and its final model directory to <run>/<stage>/model; the QAT model is also saved as <run>/final (config.json
"qat": true) and the run ends by exporting it with the phone engine and printing a generation.

Re-running the same command resumes: finished stages are skipped, an interrupted stage continues from its
latest checkpoint (or from --resume <checkpoint dir>). Multi-GPU / multi-node: launch with torchrun, e.g.
    torchrun --nproc_per_node=8 -m train --size M --out runs/M
    torchrun --nnodes=2 --node_rank=$R --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=$HEAD:29500 --rdzv_id=mmoe -m train --size M --out runs/M
Each stage's model is FSDP2-sharded (torch.distributed.fsdp.fully_shard per block + root), NCCL on GPUs,
gloo on CPU.

Expert parallelism (model/expert_parallel.py; train/README.md, "Expert parallelism"): `[hardware] ep = 4` in the
recipe shards the routed experts over groups of 4 ranks on a (dp_shard = world / ep) x ep mesh, tokens exchanged
by all_to_all; ep must divide n_experts and the world size (60 experts on 8-GPU nodes: ep = 2 or 4), e.g.
    torchrun --nproc_per_node=8 -m train --config M-ep4.toml --out runs/M-ep4    # [hardware] ep = 4
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from model import cli
from model.atomic import atomic_write
from model.precision import policy_for
from train import ckpt as ck
from train import data_plan
from train.data import DataError
from train.data_cache import DataCache
from train.eval_suite import eval_suite
from train.loop import StageConfig, TrainingDiverged, stage_dict, train_stage
from train.parallel import build_model, ep_meshes, init_distributed, plain_copy, wrap_fsdp
from train.plan import UsageError, check_hardware, print_plan
from train.recipe_config import Recipe, did_you_mean, load_recipe_file
from train.summary import generate_sample, print_summary
from train.tokenizer import prepare_tokenizer

CONFIG_DIR = Path(__file__).parent / "configs"
SIZES = ("tiny", "S", "M", "L")


# ------------------------------------------------------------------------------------------------------
# config
def load_recipe(size: str | None, path: str | None = None) -> Recipe:
    if path is None:
        if size not in SIZES:
            raise UsageError(f"unknown size {size!r}; choose one of {cli.choices(SIZES)}")
        path = str(CONFIG_DIR / f"{size}.toml")
    return load_recipe_file(path)


def is_done(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / "summary.json").is_file() and (run_dir / stage / "model" / "config.json").is_file()


def check_stages_arg(rec: Recipe, arg: str | None, run_dir: Path) -> set[str] | None:
    """--stages: known names, and no selected stage after an unselected one that is not done (it would start
    from a model that does not exist)."""
    if not arg:
        return None
    names = rec.stage_names
    sel = [s.strip() for s in arg.split(",")]
    for s in sel:
        if s not in names:
            raise UsageError(f"--stages: unknown stage {s!r} in {rec.path} ({did_you_mean(s, names)})")
    last = max(names.index(s) for s in sel)
    for s in names[:last]:
        if s not in sel and not is_done(run_dir, s):
            raise UsageError(f"--stages: stage {s!r} comes first and is not done in {run_dir}; "
                             f"add it to --stages")
    return set(sel)


def stage_fingerprint(rec: Recipe, st: StageConfig, n_tokens: int) -> str:
    """What a stage's checkpoints and summary are keyed by: a resumed or skipped stage must match it."""
    fp = dict(model=rec.model.to_dict(), stage=stage_dict(st), seed=rec.seed, tok=n_tokens)
    if data_plan.reads_run_stores(rec, st.name):  # another sample order than the in-memory Batcher's
        fp["data"] = "run-stores"
    if rec.data.doc_mask:  # another attention pattern: a checkpoint of the other setting must not continue
        fp["doc_mask"] = True
    return ck.fingerprint(fp)


def check_resume(rec: Recipe, resume: str | None, run_dir: Path) -> str | None:
    """--resume: an existing, complete checkpoint of one of this recipe's stages, whose earlier stages are done
    in the run folder (the stage's own checkpoint continues it; it never restarts pre-training). Returns the
    checkpoint's stage name. The config fingerprint is compared here when the checkpoint carries its
    tokenizer (train/loop.py saves one with every checkpoint), and again when training loads it."""
    if not resume:
        return None
    p = Path(resume)
    if not p.exists():
        raise UsageError(f"--resume {resume}: no such checkpoint folder")
    if not p.is_dir():
        raise UsageError(f"--resume {resume}: not a checkpoint folder (a file)")
    missing = ck.missing_file(p)  # either layout (train/ckpt.py)
    if missing is not None:
        raise UsageError(f"--resume {resume}: not a complete checkpoint folder (no {missing}; a checkpoint is "
                         f"<run>/<stage>/ckpt/step_N)")
    try:
        state = json.loads((p / "state.json").read_text())
        stage = state["stage"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UsageError(f"--resume {resume}: unreadable state.json ({cli.one_line(e)})") from None
    names = rec.stage_names
    if stage not in names:
        raise UsageError(f"--resume {resume}: a checkpoint of stage {stage!r}, which {rec.path} does not have "
                         f"(it has {cli.choices(names)})")
    st = rec.stages[names.index(stage)]
    tok_file = p / "tokenizer.json"
    if tok_file.is_file():
        from tokenizers import Tokenizer  # noqa: PLC0415

        try:
            n_tok = Tokenizer.from_file(str(tok_file)).get_vocab_size()
        except Exception as e:  # noqa: BLE001  (the tokenizers library raises its own exception type)
            raise UsageError(f"--resume {resume}: unreadable tokenizer.json ({cli.one_line(e)})") from None
        if state.get("fingerprint") != stage_fingerprint(rec, st, n_tok):
            raise UsageError(f"--resume {resume}: written for a different model / stage {stage!r} config than "
                             f"{rec.path} (fingerprint mismatch)")
    missing = [s for s in names[:names.index(stage)] if not is_done(run_dir, s)]
    if missing:
        guess = p.parent.parent.parent if p.parent.name == "ckpt" and p.parent.parent.name == stage else None
        hint = f" (this checkpoint's run folder looks like {guess}: pass --out {guess})" \
            if guess is not None and guess.resolve() != run_dir.resolve() else ""
        raise UsageError(f"--resume {resume}: a checkpoint of stage {stage!r}, but the earlier stage(s) "
                         f"{cli.choices(missing)} are not done in {run_dir}{hint}")
    return stage


# ------------------------------------------------------------------------------------------------------
def run(args) -> int:
    rec = load_recipe(args.size, args.config)
    mcfg, stages, seed = rec.model, rec.stages, rec.seed
    run_dir = Path(args.out)
    # every check that reads only the command line, the recipe and the run folder happens here, before
    # anything runs or is written, so a dry run reports the same mistakes a real run would
    only = check_stages_arg(rec, args.stages, run_dir)
    resume_stage = check_resume(rec, args.resume, run_dir)
    if args.dry_run:
        print_plan(rec, mcfg, stages, str(run_dir))
        return 0
    device = check_hardware(rec, mcfg, stages)
    # a prepared store that is missing (or built from another source) stops the run here, before it writes or
    # loads anything, not when its stage comes
    data_plan.check_prepared_stores(rec, run_dir)
    rank, world, device = init_distributed(device)
    ep = rec.hardware.ep
    if ep > 1 and world % ep:
        raise UsageError(f"{rec.path}: [hardware] ep: {ep} does not divide the world size {world}")
    ep_mesh, dp_mesh, world_mesh = ep_meshes(ep, mcfg.n_experts, device, rank, world)
    for i, st in enumerate(stages, 1):
        if st.global_batch % (st.micro_batch * world):
            raise UsageError(f"{rec.path}: [stages.{i}] global_batch: {st.global_batch} is not a multiple of "
                             f"micro_batch {st.micro_batch} x world size {world}")
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    t_run = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    tok, tok_path = prepare_tokenizer(rec, run_dir, args.data_root)
    if tok.get_vocab_size() > mcfg.vocab_size:
        raise UsageError(f"tokenizer has {tok.get_vocab_size()} tokens > model vocab_size {mcfg.vocab_size}")
    data = DataCache(rec, run_dir, tok, args.data_root)
    eval_fn = eval_suite(rec, data, mcfg, device, max(s.micro_batch for s in stages))
    policy = policy_for(device)  # the one precision policy: training, evaluation and FSDP
    if rank == 0:
        print(f"precision: {policy.describe()}", file=sys.stderr)
    from model.io import load_model_dir, save_model_dir  # noqa: PLC0415
    from train.tracking import Tracker  # noqa: PLC0415

    results = []
    prev_model_dir = None
    resume_ck = Path(args.resume) if args.resume else None
    float_eval = ptq_eval = None
    for st in stages:
        sdir = run_dir / st.name
        fp = stage_fingerprint(rec, st, tok.get_vocab_size())
        done = sdir / "summary.json"
        if done.is_file() and (sdir / "model" / "config.json").is_file() and resume_stage != st.name:
            summ = json.loads(done.read_text())
            if summ.get("fingerprint") != fp:
                raise UsageError(f"{sdir} was trained with a different config; use a new --out (or delete it)")
            if rank == 0:
                print(f"[{st.name}] already done ({summ['steps']} steps), skipping", file=sys.stderr)
            results.append(summ)
            prev_model_dir = sdir / "model"
            continue
        if only is not None and st.name not in only:
            # check_stages_arg made sure no selected stage comes after this one: the selection is done
            if rank == 0:
                print(f"[{st.name}] not selected by --stages; stopping here (re-run without --stages to go on)",
                      file=sys.stderr)
            return 0
        # start from the previous stage's model (a checkpoint, when resuming, overrides these weights)
        if prev_model_dir is None:
            model = build_model(mcfg, device)
        else:
            model, _ = load_model_dir(prev_model_dir, device)
            model.train()
        model.set_qat(bool(st.qat))
        model.set_precision(policy)
        if ep_mesh is not None:
            model.set_expert_parallel(ep_mesh)
        if st.qat and results:
            # (a) = the previous (float) stage's held-out metrics; (b) PTQ = its weights under the INT4 / int8
            # fake quant with no training (round-to-nearest, the same format); (c) = the QAT result below
            float_eval = results[-1].get("eval", {})
            ptq_eval = eval_fn(model)
        if ep_mesh is not None:
            from model.expert_parallel import shard_model_ep  # noqa: PLC0415

            model = shard_model_ep(model, world_mesh, dp_mesh, policy)
        else:
            model = wrap_fsdp(model, policy)
        mix = rec.mixture(st.name)
        batcher = data.batcher(mix, st, seed + len(results))
        batcher.set_doc_mask(rec.data.doc_mask, data.eos)
        tracker = None
        if rank == 0:
            tracker = Tracker(run_dir, group=run_dir.name, stage=st.name,
                              config=dict(stage=stage_dict(st), model=mcfg.to_dict(), recipe=rec.path, world=world))
        try:
            # the SFT-pair held-out loss is measured from the SFT stage on (it means little before)
            stage_eval = (lambda m, _sft=st.kind in ("sft", "qat"): eval_fn(m, sft=_sft))
            res = train_stage(model, st, batcher, stage_dir=sdir, eval_fn=stage_eval, tracker=tracker,
                              resume=resume_ck if resume_stage == st.name else "auto", fingerprint=fp,
                              tokenizer_json=tok_path, progress=rank == 0, device=device, seed=seed,
                              max_steps=args.max_steps, precision=policy)
        except BaseException:
            if tracker is not None:
                tracker.finish()
            raise
        if args.max_steps is not None and res.heldout_loss is None:
            if tracker is not None:
                tracker.finish()
            print(f"[{st.name}] stopped after --max-steps {args.max_steps} (resume by re-running)", file=sys.stderr)
            return 0
        full = plain_copy(model, mcfg)
        summ = dict(stage=st.name, steps=res.steps, tokens=res.tokens, seconds=round(res.seconds, 1),
                    train_loss=res.train_loss, eval=res.extra, fingerprint=fp)
        if st.qat:
            summ["ptq_eval"], summ["float_eval"] = ptq_eval, float_eval
        if rank == 0:
            save_model_dir(full, sdir / "model", tok_path, extra=dict(stage=st.name))
            atomic_write(done, json.dumps(summ, indent=1))
            if tracker is not None:
                tracker.summary({f"final/{k}": v for k, v in res.extra.items()})
                tracker.finish()
        results.append(summ)
        prev_model_dir = sdir / "model"
        if world > 1:
            import torch.distributed as dist  # noqa: PLC0415

            dist.barrier()
    if rank == 0:
        final = results[-1]
        last_dir = run_dir / stages[-1].name / "model"
        fm, _ = load_model_dir(last_dir)
        save_model_dir(fm, run_dir / "final", tok_path, extra=dict(stage="final"))
        print_summary(results, time.time() - t_run)
        atomic_write(run_dir / "summary.json", json.dumps(dict(stages=results, seconds=time.time() - t_run), indent=1))
        if not args.no_generate:
            generate_sample(run_dir, fm, tok)
        del final
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI; expected failures raise (model.cli.run prints them as one line, exit 2)."""
    p = cli.parser("python -m train", __doc__)
    p.add_argument("--size", type=cli.one_of(SIZES), default=None, metavar=cli.choices(SIZES).replace(" ", ""),
                   help="run train/configs/<size>.toml; tiny when neither --size nor --config is given")
    p.add_argument("--config", default=None, metavar="TOML", help="a recipe file instead of a size's (not with --size)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory; unset: runs/<size> or runs/<config stem>")
    p.add_argument("--dry-run", action="store_true",
                   help="check the recipe and arguments, print the plan and exit (no data, no network, no writes)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="resume from this checkpoint folder, <run>/<stage>/ckpt/step_N; unset: the unfinished "
                        "stage's latest checkpoint, automatically")
    p.add_argument("--stages", default=None, metavar="A,B",
                   help="comma-separated stages to run; unset: all (earlier stages must be done or selected)")
    p.add_argument("--data-root", default="data/shakespeare", metavar="DIR", help="the offline corpus (make data)")
    p.add_argument("--no-generate", action="store_true", help="skip the export + generation at the end")
    p.add_argument("--threads", type=cli.positive_int, default=None, metavar="N",
                   help="CPU threads for torch; unset: torch's choice (OMP_WAIT_POLICY defaults to PASSIVE "
                        "so they degrade gracefully on shared cores: README, Training)")
    p.add_argument("--max-steps", type=cli.positive_int, default=None, metavar="N",
                   help="stop after N (>= 1) steps of the current stage (testing); unset: run to the end")
    a = p.parse_args(argv)
    if a.size is not None and a.config is not None:
        raise UsageError("give --size or --config, not both")
    if a.config is None and a.size is None:
        a.size = "tiny"
    if a.out is None:
        a.out = f"runs/{a.size if a.config is None else Path(a.config).stem}"
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    try:
        return run(a)
    except (DataError, ck.CheckpointError, TrainingDiverged) as e:  # expected failures of the data / run
        raise cli.BadInput(str(e)) from e


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run(main, argv)
