"""The one recipe skeleton of pretrain, classify, ground and finetune (as torchtune's recipes: an
explicit loop, the shared parts written once).

A `Recipe` brings its config, ``setup``, ``loss`` per micro-batch and ``save_final``; `run` does the
rest alike for all: refuses a folder that holds a run unless ``resume=true``, seeds, AdamW over
`param_groups` with `lr_schedule`, accumulation, clipping and precision through the `Engine`,
``metrics.jsonl``, atomic checkpoints with exact resume (recipes draw batches as a pure function of
the step) and ``stop_after``, and the final model in ``output_dir/<final_name>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, set_seed
from tqdm import tqdm

from encoder.errors import UserError
from encoder.files import atomic_dir, atomic_write_text
from training.checkpoint import (MetricsLog, checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint,
                                 trainable_state)
from training.config import check, in_range, one_of, to_yaml
from videollm.data.video_sources import SOURCE_HELP, SkipTracker, check_scene, open_video_source

logger = logging.getLogger("training.recipe")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW's, on matrices only (not norms, biases, tagged tables)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    min_lr_ratio: float = 0.0  # the cosine ends at lr × min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping


@dataclass
class RecipeConfig:
    output_dir: str = "runs/recipe"  # the run folder: metrics, config, checkpoints, the final model
    seed: int = 0  # every random draw of the run follows from it
    steps: int = 1000  # optimizer steps; the LR schedule spans them
    stop_after: int | None = None  # end this invocation after this step (time-limited jobs); resume=true continues
    resume: bool = False  # continue the run in output_dir from its latest checkpoint
    keep: int = 2  # checkpoints kept (0: all)
    save_every: int = 100  # checkpoint every this many steps (and at the last step)
    log_every: int = 1  # a metrics line every this many steps
    eval_every: int = 0  # evaluate every this many steps; 0: after the last step only
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 (autocast; the weights stay fp32)
    threads: int = 0  # torch CPU threads; 0: torch's default
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        """Checks the shared keys, then every section that has a ``validate`` (`VideoDataConfig`)."""
        check(self, {**dict.fromkeys(("steps", "batch_size", "grad_accum", "save_every", "log_every"), in_range(1)),
                     **dict.fromkeys(("eval_every", "keep", "threads", "optim.warmup_steps"), in_range(0)),
                     "stop_after": in_range(1, null=True), "precision": one_of("fp32", "bf16"),
                     "optim.min_lr_ratio": in_range(0, 1)})
        for section in vars(self).values():
            if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
                section.validate()


@dataclass
class VideoDataConfig:
    """The video data of the encoder recipes (pretrain, classify)."""

    source: str | None = "synth"  # synth | a folder of videos (labels: sub-folder names) | a list file (path[,label])
    root: str | None = None  # where a list file's relative paths resolve (default: its folder)
    task: str = "motion"  # synthetic task: motion | order | count
    num_frames: int = 16  # frames per clip
    size: int = 64  # frame side in px (resized + centre-cropped)
    max_skipped: int = 10  # distinct undecodable videos tolerated before giving up
    background: str | None = None  # synth motion scene: null = random mix | plain | a synth.BACKGROUNDS name
    distractors: int | None = None  # synth motion scene: null = 0–2 static extra objects at random | n

    def validate(self) -> None:
        if not self.source:
            raise UserError(f"data.source is required: give {SOURCE_HELP}")
        check_scene(self.background, self.distractors, self.task if self.source == "synth" else "")

    def open(self, source: str | None = None, **kw):
        """The clips of `source` (default: ``source``) as `open_video_source` opens them."""
        return open_video_source(source or self.source, self.num_frames, self.size, root=self.root, task=self.task,
                                 background=self.background, distractors=self.distractors, **kw)


def lr_schedule(warmup: int, total: int, min_ratio: float = 0.0):
    """The LR multiplier of scheduler step `step` (0-based): linear from 1/warmup to 1 over `warmup`
    steps, then a cosine from 1 down to `min_ratio` at step `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float,
                 lrs: dict[str, float | None] | None = None) -> list[dict]:
    """AdamW groups over the trainable parameters: weight decay on matrices only (not on 1-D or
    ``_no_weight_decay``-tagged ones), and a name starting with a prefix of `lrs` at its lr (None: `lr`)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group_lr = next((v for k, v in (lrs or {}).items() if name.startswith(k) and v is not None), lr)
        decay = 0.0 if p.ndim <= 1 or getattr(p, "_no_weight_decay", False) else weight_decay
        groups.setdefault((group_lr, decay), []).append(p)
    return [{"params": ps, "lr": group_lr, "weight_decay": decay} for (group_lr, decay), ps in groups.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_environment() -> None:
    """What DeepSpeed needs before it starts. One process started without a launcher (plain
    ``python``, or ``accelerate launch`` with one process) gets the torch.distributed variables of a
    one-process group; without them DeepSpeed looks for an MPI launcher and fails on a missing
    mpi4py. Without CUDA, DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) unless one was chosen.
    ACCELERATE_USE_DEEPSPEED: the process group is DeepSpeed's from the first `PartialState` on."""
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


class Engine:
    """Where the steps run (device, precision, DeepSpeed via accelerate), by how many processes
    (``is_main``, ``rank``, ``world``). The `Accelerator` is made after the model: with a DeepSpeed
    plugin active, transformers would load weights the ZeRO-3 way, unready for edits (``<video>``)."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        # Under torchrun / accelerate launch on machines without CUDA, accelerate joins the processes
        # (gloo) only when told the run is on CPU; otherwise each process runs alone as rank 0 of 1.
        # (Not with DeepSpeed: accelerate then joins them through DeepSpeed, on its CPU accelerator.)
        deepspeed = bool(getattr(cfg, "deepspeed", None))
        self.cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not deepspeed
        if deepspeed:
            deepspeed_environment()
        # DeepSpeed without CUDA: accelerate counts the processes only when it is given a backend.
        # DeepSpeed prints what it builds while joining the processes: kept for --verbose (debug log).
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            state = PartialState(cpu=self.cpu, **({"backend": "gloo"} if deepspeed and not torch.cuda.is_available()
                                                  and int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}))
        for line in printed.getvalue().splitlines():
            logger.debug("%s", line)
        self.is_main, self.rank, self.world = state.is_main_process, state.process_index, state.num_processes
        if not self.is_main:  # one log: the other processes say only what goes wrong
            logging.getLogger().setLevel(logging.WARNING)
        self.device: torch.device = state.device
        self.wait = state.wait_for_everyone
        self.accelerator: Accelerator | None = None
        self.deepspeed = False

    def prepare(self, model, optimizer, *, deepspeed: str | None = None, find_unused_parameters: bool = False):
        """Make the Accelerator and hand it the model and optimizer (not the scheduler: the
        skeleton steps it once per optimizer step, accelerate would step it per process)."""
        plugin = None
        if deepspeed:
            if importlib.util.find_spec("deepspeed") is None:  # optional: only deepspeed=… runs need it
                raise UserError("deepspeed=… needs the deepspeed package: pip install deepspeed")
            plugin = DeepSpeedPlugin(hf_ds_config=str(deepspeed), gradient_accumulation_steps=self.cfg.grad_accum,
                                     gradient_clipping=self.cfg.optim.grad_clip or None, zero3_init_flag=False)
            # Batches come from the recipe (exact resume), so accelerate cannot read the micro-batch off a
            # loader; DeepSpeed checks train_batch_size = micro-batch × grad_accum × processes.
            plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=self.cfg.batch_size,
                                           gradient_accumulation_steps=self.cfg.grad_accum,
                                           train_batch_size=self.cfg.batch_size * self.cfg.grad_accum * self.world)
            self.deepspeed = True
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
        try:
            self.accelerator = Accelerator(cpu=self.cpu, gradient_accumulation_steps=self.cfg.grad_accum,
                                           deepspeed_plugin=plugin, kwargs_handlers=handlers,
                                           mixed_precision="bf16" if self.cfg.precision == "bf16" else "no")
        except ModuleNotFoundError as err:
            if err.name != "mpi4py":
                raise
            raise UserError("DeepSpeed found no launcher's environment and wants MPI (mpi4py is not installed): "
                            "start the processes with torchrun or the deepspeed launcher, or pip install mpi4py "
                            "for an MPI launch") from None
        if plugin is not None:
            # The bucket-size "auto" values accelerate derives from ``model.config.hidden_size`` (a
            # VideoLLM keeps it in ``text_config``), by accelerate's own formulas.
            config = getattr(model, "config", None)
            h = getattr(getattr(config, "text_config", config), "hidden_size", None)
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            if not torch.cuda.is_available():
                # overlap_comm overlaps CUDA streams; on DeepSpeed's CPU accelerator it stalls the first
                # step of a multi-process ZeRO-2 run (docs/finetune.md § 4).
                ds["overlap_comm"] = False
            for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                               ("stage3_param_persistence_threshold", 10 * h)) if h else ():
                if ds.get(key) == "auto":
                    ds[key] = value
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else model

    def mean(self, value: float) -> float:
        """`value` averaged over the processes."""
        if self.world == 1:
            return float(value)
        return float(self.accelerator.reduce(torch.tensor(float(value), device=self.device), "mean"))

    def sum(self, value: float) -> float:
        """`value` summed over the processes."""
        if self.world == 1:
            return float(value)
        return float(self.accelerator.reduce(torch.tensor(float(value), device=self.device), "sum"))

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on one (e.g. a signal that reached only some)."""
        return self.sum(float(bool(flag))) > 0

    def gathered(self, model):
        """Inside: every parameter whole on every rank (ZeRO-3 partitions them); a no-op otherwise."""
        if not (self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.unwrap(model).parameters()), modifier_rank=None)

    def save(self, run_dir: Path, step: int, model, optimizer, scheduler, *, extra: dict, config_yaml: str,
             keep: int) -> None:
        """A checkpoint of the trainable state (DeepSpeed: its own state, frozen weights left out)."""
        if self.deepspeed:
            # Every rank writes its shard into a shared staging folder; the main process moves it
            # into the atomic checkpoint folder.
            staging = run_dir / f".staging-{step}"
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            self.wait()
            self.accelerator.save_state(str(staging / "accelerate"), exclude_frozen_parameters=True)
            self.wait()
            if self.is_main:
                save_checkpoint(run_dir, step, scheduler=scheduler, config_yaml=config_yaml, extra=extra, keep=keep,
                                write_files=lambda d: shutil.move(str(staging / "accelerate"), d))
                shutil.rmtree(staging, ignore_errors=True)
        elif self.is_main:
            save_checkpoint(run_dir, step, weights=trainable_state(self.unwrap(model)), optimizer=optimizer,
                            scheduler=scheduler, config_yaml=config_yaml, extra=extra, keep=keep)
        self.wait()

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        if self.deepspeed:
            if not (path / "accelerate").is_dir():
                raise UserError(f"'{path}' holds no DeepSpeed state; resume it without deepspeed=…")
            # ZeRO splits the optimizer state into one file per process: it resumes with as many.
            shards = len(list((path / "accelerate").rglob("*zero_pp_rank_*_optim_states.pt")))
            if shards and shards != self.world:
                raise UserError(f"'{path}' was written by {shards} DeepSpeed process(es) and ZeRO keeps one shard of the "
                                f"optimizer state per process; resume it with {shards} process(es), not {self.world}")
            # Frozen weights are not in the checkpoint (exclude_frozen_parameters): not strict.
            self.accelerator.load_state(str(path / "accelerate"), load_module_strict=False)
            return load_checkpoint(path, scheduler=scheduler)
        if (path / "accelerate").is_dir():
            raise UserError(f"'{path}' was written with DeepSpeed; resume it with the same deepspeed=…")
        return load_checkpoint(path, model=self.unwrap(model), optimizer=optimizer, scheduler=scheduler)


@dataclass
class Micro:
    """One micro-batch's loss, scalar logs (averaged over the step) and sample count (throughput)."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    samples: int = 0


class Recipe:
    """What a recipe brings to `run`; the defaults do nothing. `run` sets ``engine`` before `setup`."""

    name = "recipe"
    final_name = "final"
    engine: Engine

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.optim = cfg.optim  # what the optimizer, schedule and clipping use (a recipe may adjust it in setup)

    def setup(self, engine: Engine) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        return param_groups(model, self.optim.lr, self.optim.weight_decay)

    def engine_options(self) -> dict:
        """Extra `Engine.prepare` arguments (deepspeed, find_unused_parameters)."""
        return {}

    def before_steps(self, model, resumed: bool) -> None:
        """Runs once before the first step of an invocation (e.g. a warm-up that a resumed run has)."""

    def loss(self, model, step: int, micro: int) -> Micro:
        raise NotImplementedError

    def status(self) -> dict:
        """Counters to put in every metrics line (e.g. skipped videos)."""
        return {}

    def evaluate(self, model, step: int) -> dict:
        """Held-out metrics; must leave the model as training wants it (train mode)."""
        return {}

    def save_final(self, model, directory: Path) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict:
        """What else a resume needs (default: the undecodable-video counts of a recipe with ``skips``)."""
        return {"skips": self.skips.state()} if isinstance(getattr(self, "skips", None), SkipTracker) else {}

    def load_extra_state(self, state: dict) -> None:
        if "skips" in state:
            self.skips = SkipTracker(self.skips.max_skipped, **state["skips"])


def open_run(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start at step 0). A folder that already holds a run is
    refused without ``resume=true``: a new run would overwrite its metrics and config."""
    held = [name for name in ("metrics.jsonl", "config.yaml", "latest") if (run_dir / name).exists()]
    held += [p.name for p in checkpoints(run_dir)] if run_dir.is_dir() else []
    if held and not resume:
        raise UserError(f"'{run_dir}' already holds a run ({held[0]}); pass resume=true to continue it, "
                        "or choose another output_dir")
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        logger.info("resume=true but %s holds no checkpoint; starting at step 0", run_dir)
    return ckpt


def claim_run(engine: Engine, run_dir: Path, resume: bool, config_yaml: str) -> Path | None:
    """`open_run` on every process, then the main one writes the run's config. Every process
    checks the folder before any writes to it: a process that starts late would otherwise find
    the main process's fresh config.yaml and refuse the run as an old one."""
    resume_from = open_run(run_dir, resume)
    engine.wait()
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", config_yaml)
    return resume_from


class Progress:
    """A tqdm bar on a terminal, else (a log file) a log line with the ETA at every logged step."""

    def __init__(self, name: str, start: int, stop: int, total: int, enabled: bool):
        self.name, self.start, self.stop, self.total, self.enabled = name, start, stop, total, enabled
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True) \
            if enabled and sys.stderr.isatty() else None

    def update(self, record: dict, logged: bool) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                  if k in ("loss", "eval_loss", "top1") and isinstance(v, float)})
        if not self.enabled or self.bar is not None or not logged:
            return
        step = record["step"]
        per_step = (time.perf_counter() - self.t0) / max(1, step - self.start)
        eta = per_step * (self.stop - step)
        eta = f"{eta:.0f} s" if eta < 90 else f"{eta / 60:.0f} min" if eta < 5400 else f"{eta / 3600:.1f} h"
        values = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                           if k not in ("step", "sec_per_step", "lr") and isinstance(v, float))
        logger.info("%s step %d/%d  %s  lr %.3g  %.2f s/step  ETA %s", self.name, step, self.total, values,
                    record.get("lr", 0.0), per_step, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


REPEAT_GRACE = 3.0  # seconds


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (what a scheduler sends before it kills a job) and SIGINT (Ctrl+C) set the flag this
    yields instead of killing the process: the loop finishes its step, writes a checkpoint and ends.
    Only the main thread can install handlers; elsewhere the flag never sets."""
    asked: list[str] = []
    names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return
    before = {sig: signal.getsignal(sig) for sig in names}

    first: list[float] = []

    def ask(sig, frame):
        # A second signal stops at once; one within REPEAT_GRACE of the first is the same request
        # (Ctrl+C reaches torchrun and its workers, and torchrun passes it on to them again).
        if asked:
            if time.monotonic() - first[0] > REPEAT_GRACE:
                raise KeyboardInterrupt
            return
        first.append(time.monotonic())
        asked.append(names[sig])
        logger.warning("%s: finishing this step, writing a checkpoint and stopping (again to stop at once)",
                       names[sig])

    for sig in names:
        signal.signal(sig, ask)
    try:
        yield asked
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def run(recipe: Recipe) -> dict[str, Any]:
    """Train `recipe` (or continue it): the last metrics record with ``output_dir`` and ``final``
    (the final model's folder; None when ``stop_after`` or a SIGTERM/SIGINT ended it early, which
    ``interrupted`` then names)."""
    with stop_signals() as asked:
        return _run(recipe, asked)


def _run(recipe: Recipe, asked: list[str]) -> dict[str, Any]:
    cfg = recipe.cfg
    cfg.validate()
    run_dir = Path(cfg.output_dir)
    recipe.engine = engine = Engine(cfg)
    config_yaml = to_yaml(cfg) + f"# world_size: {engine.world} (processes; the global batch is batch_size × " \
                                 f"world_size × grad_accum)\n"
    resume_from = claim_run(engine, run_dir, cfg.resume, config_yaml)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)  # random, numpy, torch

    model = recipe.setup(engine)
    optim = recipe.optim
    optimizer = torch.optim.AdamW(recipe.param_groups(model), lr=optim.lr, betas=tuple(optim.betas))
    schedule = lr_schedule(optim.warmup_steps, cfg.steps, optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer = engine.prepare(model, optimizer, **recipe.engine_options())
    accelerator = engine.accelerator

    start = 0
    if resume_from is not None:
        info = engine.load(resume_from, model, optimizer, scheduler)
        start = info["step"]
        recipe.load_extra_state(info["extra"])
        logger.info("resumed from %s (step %d)", resume_from, start)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if resume_from else None) \
        if engine.is_main else None
    recipe.before_steps(model, resumed=resume_from is not None)

    stop = min(cfg.steps, cfg.stop_after or cfg.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    progress = Progress(recipe.name, start, stop, cfg.steps, engine.is_main)
    record: dict[str, Any] = {"step": start}
    for step in range(start + 1, stop + 1):
        t0 = time.perf_counter()
        losses, logs, samples, grad_norm = [], {}, 0, None
        for micro in range(cfg.grad_accum):
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    out = recipe.loss(model, step, micro)
                accelerator.backward(out.loss)  # divided by grad_accum (DeepSpeed: accumulates and steps itself)
                losses.append(float(out.loss.detach()))
                for k, v in out.logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
                samples += out.samples
                if accelerator.sync_gradients:  # the step's last micro-batch
                    # The global norm before clipping (None with DeepSpeed, which clips itself).
                    norm = accelerator.clip_grad_norm_(params, optim.grad_clip) if optim.grad_clip > 0 else None
                    grad_norm = None if norm is None else float(norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        dt = time.perf_counter() - t0
        loss = engine.mean(sum(losses) / len(losses))
        logs = {k: engine.mean(v) for k, v in logs.items()}  # every process's share of the batch
        if not math.isfinite(loss):
            raise UserError(f"the loss is {loss} at step {step}; lower optim.lr or check the data")
        record = {"step": step, "loss": loss, **logs, "lr": optim.lr * schedule(step - 1), **recipe.status(),
                  "world_size": engine.world}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if samples:
            record["samples_per_s"] = round(samples * engine.world / dt, 3)
        record["sec_per_step"] = round(dt, 4)
        evaluated = step == stop == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
        if evaluated:
            record.update(recipe.evaluate(model, step))
        logged = evaluated or step % cfg.log_every == 0 or step == stop
        if metrics is not None and logged:
            metrics.log(record)
        progress.update(record, logged)
        # Every process stops after the same step: a scheduler's SIGTERM reaches the processes at
        # slightly different times, and one that went on alone would wait for the others forever.
        stopping = engine.any(bool(asked))
        if step % cfg.save_every == 0 or step == stop or stopping:
            engine.save(run_dir, step, model, optimizer, scheduler, extra=recipe.extra_state(),
                        config_yaml=config_yaml, keep=cfg.keep)
        if stopping and step < stop:
            if metrics is not None and not logged:
                metrics.log(record)  # the checkpoint's step is in the log, so resume continues after it
            break
    progress.close()

    summary = {**record, "output_dir": str(run_dir), "final": None}
    if record["step"] < stop:  # a signal stopped it (here or on another process)
        signal_name = asked[0] if asked else "SIGTERM"
        if engine.is_main:
            logger.warning("stopped by %s after step %d of %d, checkpoint written; resume=true continues",
                           signal_name, record["step"], cfg.steps)
        return {**summary, "interrupted": signal_name}
    if stop < cfg.steps:
        logger.info("stopped after step %d of %d (stop_after); resume=true continues", stop, cfg.steps)
        return summary
    final = run_dir / recipe.final_name
    with engine.gathered(model):
        if engine.is_main:
            with atomic_dir(final) as tmp:
                recipe.save_final(engine.unwrap(model), tmp)
                (tmp / f"{recipe.name}_config.yaml").write_text(config_yaml)
    engine.wait()
    logger.info("%s: final model in %s", recipe.name, final)  # the other processes log warnings only
    accelerator.end_training()
    return {**summary, "final": str(final)}


EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}  # the shell's code for the signal


def exit_code(summary: dict) -> int:
    """A recipe command's exit status: 0, or 143 / 130 when SIGTERM / SIGINT stopped it with a checkpoint,
    so a scheduler or the pipeline sees the run is not finished (resume=true continues it)."""
    return EXIT_CODES.get(summary.get("interrupted"), 0)


def print_summary(summary: dict, keys: tuple[str, ...]) -> int:
    """The one JSON line a recipe's command prints at the end; returns `exit_code`."""
    if PartialState().is_main_process:  # one line for a multi-process run too
        print(json.dumps({k: summary.get(k) for k in keys}))
    return exit_code(summary)
