"""Atomic, resumable checkpoints and a metrics log that stays consistent across resumes.

A checkpoint is a directory ``<run>/checkpoint-<step>/`` holding ``model.safetensors`` (or the
files a caller writes itself), ``training_state.pt`` (optimizer, scheduler, RNG states, step, any
extras) and ``config.yaml``. It is written under a temporary name and renamed into place, and
``<run>/latest`` (a one-line file naming it) is replaced atomically last, so a run killed at any
moment leaves either the previous checkpoint or the new one — never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from encoder.errors import UserError
from encoder.files import atomic_dir, atomic_write_text  # noqa: F401  (re-exported for the recipes)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module | None = None,
                    optimizer=None, scheduler=None, config_yaml: str | None = None,
                    extra: dict[str, Any] | None = None, keep: int = 2, write_files=None) -> Path:
    """Write ``checkpoint-<step>`` atomically, point ``latest`` at it, keep the newest `keep`.

    `write_files(tmp_dir)` may write further files (e.g. a peft adapter or accelerate state).
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        if model is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
        torch.save({
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": extra or {},
        }, tmp / "training_state.pt")
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        if write_files is not None:
            write_files(tmp)
    atomic_write_text(run_dir / "latest", final.name + "\n")
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not (path / "training_state.pt").is_file():
        raise UserError(f"'{pointer}' names '{path.name}', which is missing or incomplete; "
                        f"delete '{pointer}' to start over or point it at an existing checkpoint")
    return path


def load_checkpoint(path: Path, *, model: torch.nn.Module | None = None, optimizer=None,
                    scheduler=None, restore_rng: bool = True) -> dict[str, Any]:
    """Load what `save_checkpoint` wrote; returns ``{"step", "extra"}``."""
    from safetensors.torch import load_file

    path = Path(path)
    if model is not None:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
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
