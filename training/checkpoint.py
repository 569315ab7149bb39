"""Atomic, resumable checkpoints and a metrics log that stays consistent across resumes.

``<run>/checkpoint-<step>/`` holds ``trainable.safetensors`` (never frozen weights such as a base
LLM) or DeepSpeed's files, ``training_state.pt`` (optimizer, scheduler, RNG, step, extras) and
``config.yaml``; renamed into place, then named by ``<run>/latest``, so a killed run leaves the
previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from encoder.errors import UserError
from encoder.files import atomic_dir, atomic_write_text

WEIGHTS = "trainable.safetensors"
STATE = "training_state.pt"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of `model`: its state dict without the frozen parameters."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in frozen}


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders of a run, oldest first."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(run_dir: Path, step: int, *, weights: dict[str, torch.Tensor] | None = None,
                    optimizer=None, scheduler=None, config_yaml: str | None = None,
                    extra: dict[str, Any] | None = None, keep: int = 2, write_files=None) -> Path:
    """Write ``checkpoint-<step>`` atomically, point ``latest`` at it, keep the newest `keep` (0: all).
    weights: e.g. `trainable_state(model)`; `write_files(tmp_dir)` may add files (DeepSpeed's state)."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with atomic_dir(final) as tmp:
        if weights is not None:
            save_file(weights, str(tmp / WEIGHTS))
        torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng, "extra": extra or {}}, tmp / STATE)
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        if write_files is not None:
            write_files(tmp)
    atomic_write_text(run_dir / "latest", final.name + "\n")
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise UserError(f"'{pointer}' names '{path.name}', which is missing or incomplete; "
                        f"delete '{pointer}' to start over or point it at an existing checkpoint")
    return path


def load_checkpoint(path: Path, *, model: torch.nn.Module | None = None, optimizer=None,
                    scheduler=None) -> dict[str, Any]:
    """Load a `save_checkpoint` into `model`, `optimizer`, `scheduler`, the RNGs; ``{"step", "extra"}``."""
    path = Path(path)
    if model is not None:
        missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        missing = [k for k in missing if k not in frozen]
        if missing or unexpected:
            raise UserError(f"checkpoint '{path}' does not match this model (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}); resume with the config it was written with")
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return {"step": state["step"], "extra": state["extra"]}


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step. On resume from step k, lines past k are
    dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
