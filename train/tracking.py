"""wandb tracking: one wandb run per stage, grouped by the training run.

Mode: WANDB_MODE is honoured when set (online | offline | disabled); otherwise online when WANDB_API_KEY is
set, offline when not (the run directory then holds <run>/wandb/offline-run-*; `wandb sync` uploads it later).
Logged: the stage + model config; every log_every steps loss, CE, aux, LR, grad norm, tokens/s, MFU estimate,
router entropy and per-layer expert load (each expert's token fraction as expert_load/layer{i}/e{j} when
n_layers x n_experts <= 512, plus the per-layer max/mean imbalance always); at each evaluation the held-out
metrics and an expert-load heatmap (layer x expert) as an image and as a table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PER_EXPERT_LIMIT = 512


def wandb_mode() -> str:
    m = os.environ.get("WANDB_MODE", "").strip().lower()
    if m in ("online", "offline", "disabled"):
        return m
    if m == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    def __init__(self, run_dir: str | os.PathLike, group: str, stage: str, config: dict, project: str = "mobilemoe"):
        self.run = None
        self.load_sum = None
        self.load_n = 0
        mode = wandb_mode()
        if mode == "disabled":
            return
        import wandb  # noqa: PLC0415

        d = Path(run_dir)
        d.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), group=group, name=stage,
                                  job_type=stage, config=config, dir=str(d), mode=mode, reinit="finish_previous",
                                  settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:  # noqa: BLE001  (a tracking outage must not stop training)
            print(f"warning: wandb init failed ({type(e).__name__}: {e}); continuing without wandb", file=sys.stderr)
            self.run = None

    @property
    def dir(self) -> str | None:
        return None if self.run is None else self.run.dir

    def log_step(self, rec: dict, step: int) -> None:
        load = rec.get("expert_load")
        if load is not None:
            import torch  # noqa: PLC0415

            t = torch.tensor(load, dtype=torch.float64)
            self.load_sum = t if self.load_sum is None else self.load_sum + t
            self.load_n += 1
        if self.run is None:
            return
        out = {f"train/{k}": v for k, v in rec.items() if k not in ("expert_load", "step") and isinstance(v, (int, float))}
        if load is not None:
            n_l, n_e = len(load), len(load[0])
            for i, row in enumerate(load):
                mean = sum(row) / n_e
                out[f"expert_load/layer{i}/max_over_mean"] = max(row) / mean if mean > 0 else 0.0
                if n_l * n_e <= PER_EXPERT_LIMIT:
                    for j, v in enumerate(row):
                        out[f"expert_load/layer{i}/e{j}"] = v
        self.run.log(out, step=step)

    def log_eval(self, ev: dict, step: int) -> None:
        if self.run is None:
            return
        import wandb  # noqa: PLC0415

        out = {f"eval/{k}": v for k, v in ev.items() if isinstance(v, (int, float))}
        if self.load_sum is not None:
            load = (self.load_sum / max(1, self.load_n)).tolist()
            table = wandb.Table(columns=["layer", "expert", "load_fraction"],
                                data=[[i, j, v] for i, row in enumerate(load) for j, v in enumerate(row)])
            out["expert_load/table"] = table
            img = _heatmap(load)
            if img is not None:
                out["expert_load/heatmap"] = wandb.Image(img)
        self.run.log(out, step=step)

    def summary(self, d: dict) -> None:
        if self.run is not None:
            for k, v in d.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _heatmap(load):
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415
    except Exception:  # noqa: BLE001
        return None
    a = np.asarray(load, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(max(4, a.shape[1] * 0.25), max(2, a.shape[0] * 0.35)))
    im = ax.imshow(a, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("expert load (token fraction)")
    fig.colorbar(im, ax=ax)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def read_offline_run(run_file: str | os.PathLike) -> dict:
    """Parse a wandb run file (run-*.wandb: LevelDB-style log of protobuf Records) without network:
    -> {"run": {"group", "name", "job_type"}, "config": {key: json}, "history": [{key: value_json}, ...]}.
    Used by the tests to check what an offline run holds."""
    import struct  # noqa: PLC0415

    from wandb.proto import wandb_internal_pb2 as pb  # noqa: PLC0415

    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file}: not a wandb run file")
    block, pos, buf = 32768, 7, b""
    out: dict = {"run": {}, "config": {}, "history": []}
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:
            pos += left
            continue
        _crc, ln, typ = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk = data[pos:pos + ln]
        pos += ln
        if typ == 1:
            rec = chunk
        elif typ == 2:
            buf = chunk
            continue
        elif typ == 3:
            buf += chunk
            continue
        elif typ == 4:
            rec = buf + chunk
        else:
            continue
        r = pb.Record()
        r.ParseFromString(rec)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = dict(group=r.run.run_group, name=r.run.display_name, job_type=r.run.job_type)
            out["config"].update({u.key: u.value_json for u in r.run.config.update})
        elif kind == "history":
            out["history"].append({(it.key or "/".join(it.nested_key)): it.value_json for it in r.history.item})
    return out
