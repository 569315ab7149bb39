"""Recipes with more than one process, as docs/finetune.md § 4 runs them: `torchrun --standalone
--nproc_per_node 2` on CPU (gloo), plain DDP and DeepSpeed ZeRO-2 / ZeRO-3, on the tiny Llama of
test_finetune. Each run is a real launch of `training.finetune`; the commands are the documented ones."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from test_finetune import CONFIGS, REPO, STAGE2, make_tiny_llm
from training.recipe import free_port
from videollm.chat import generate_stream
from videollm.data.synth import make_clip, write_synth_dataset
from videollm.modeling_videollm import load_videollm

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    write_synth_dataset(root / "synth", 64, seed=0, num_frames=8, size=32)
    return {"llm": make_tiny_llm(root / "llm32"), "data": root / "synth" / "instruct.json"}


def torchrun(processes: int) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc_per_node", str(processes)]


def launch(assets, out: Path, launcher: list[str], **overrides) -> subprocess.Popen:
    """`launcher` -m training.finetune --config finetune_stage2_smoke.yaml … (launcher: e.g. `torchrun(2)`;
    [python]: one process without a launcher, as a user resuming on one machine runs it)."""
    kw = {"llm": assets["llm"], "data.source": assets["data"], "output_dir": out, "eval_every": 0, "log_every": 1,
          **overrides}
    module = ["training.finetune"] if launcher[-1] == "--module" else ["-m", "training.finetune"]  # deepspeed's flag
    cmd = [*launcher, *module, "--config", str(STAGE2), *[f"{k}={v}" for k, v in kw.items()]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finetune(assets, out: Path, launcher, expect: int = 0, **overrides) -> str:
    """Run to the end (launcher: a process count for torchrun, or a command); the exit code must be
    `expect`. Returns stdout + stderr."""
    proc = launch(assets, out, torchrun(launcher) if isinstance(launcher, int) else launcher, **overrides)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == expect, stderr[-3000:]
    return stdout + stderr


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trained(out: Path) -> dict:
    """The final model's trained tensors: projector (model.safetensors) and LoRA adapter."""
    final = out / "final"
    return {**load_file(str(final / "model.safetensors")),
            **{f"lora.{k}": v for k, v in load_file(str(final / "llm_adapter" / "adapter_model.safetensors")).items()}}


def test_two_processes_step_as_one_process_with_the_whole_batch(assets, tmp_path):
    """One optimizer step of 2 processes × batch 2, of 2 processes × batch 1 × grad_accum 2, and of
    1 process × batch 4 give the same weights and the same loss: the step's loss is the token mean over
    its whole global batch however it is split. Each step is logged once, by one writer."""
    runs = {}
    for processes, batch, accum in ((1, 4, 1), (2, 2, 1), (2, 1, 2)):
        out = tmp_path / f"p{processes}b{batch}a{accum}"
        text = finetune(assets, out, processes, steps=1, batch_size=batch, grad_accum=accum)
        assert sum(line.startswith("{") for line in text.splitlines()) == 1  # one summary line
        (record,) = metrics(out)
        assert record["world_size"] == processes
        runs[(processes, batch, accum)] = record["loss"], trained(out)
    loss, weights = runs[(1, 4, 1)]
    for key, (other_loss, other) in runs.items():
        assert other_loss == pytest.approx(loss, rel=1e-6), key
        assert other.keys() == weights.keys()
        for name, w in weights.items():
            assert (other[name] - w).abs().max() < 1e-6, (key, name)
    # The step did move the weights (Adam: about lr = 2e-3 each), far beyond that tolerance.
    untrained = trained_after_zero_steps(assets, tmp_path)
    assert max((weights[n] - untrained[n]).abs().max() for n in weights if "lora_B" in n) > 1e-3


def trained_after_zero_steps(assets, tmp_path) -> dict:
    """The same model's weights before any step (the build is seeded): a run with lr 0."""
    out = tmp_path / "lr0"
    finetune(assets, out, 1, steps=1, batch_size=4, **{"optim.lr": 0.0})
    return trained(out)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_with_two_processes_runs_resumes_and_its_model_chats(assets, tmp_path, zero):
    """ZeRO-2 / ZeRO-3 on 2 CPU processes: the batch arithmetic is DeepSpeed's own check, the run stops
    after step 2 and resumes to step 3 (a resume with another process count is refused: ZeRO's shards),
    and the gathered final model loads and answers."""
    out = tmp_path / zero
    ds = {"steps": 3, "save_every": 2, "eval_every": 3, "deepspeed": CONFIGS / f"{zero}.json"}
    finetune(assets, out, 2, stop_after=2, **ds)
    refused = finetune(assets, out, [sys.executable], expect=2, resume="true", **ds)
    assert "written by 2 DeepSpeed process(es)" in refused and "Traceback" not in refused
    finetune(assets, out, 2, resume="true", **ds)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and {r["world_size"] for r in rows} == {2}
    assert "eval_loss" in rows[-1]
    model, processor = load_videollm(out / "final")
    frames = make_clip(5, 8, 32, "motion").frames
    with torch.no_grad():
        tokens = model.generate(**processor("What moves?", video=frames), max_new_tokens=4, min_new_tokens=4,
                                do_sample=False)
    assert "".join(generate_stream(model, processor, frames, "What moves?", max_new_tokens=4, min_new_tokens=4)) \
        == processor.tokenizer.decode(tokens[0, -4:], skip_special_tokens=True)


def test_plain_data_parallel_resumes_with_another_process_count(assets, tmp_path):
    """A DDP checkpoint holds whole weights and optimizer state: 2 processes stop after step 2 and one
    process (no launcher) continues it to step 4, with the global batch of one process."""
    out = tmp_path / "run"
    finetune(assets, out, 2, steps=4, save_every=2, stop_after=2)
    finetune(assets, out, [sys.executable], steps=4, save_every=2, resume="true")
    assert [(r["step"], r["world_size"]) for r in metrics(out)] == [(1, 2), (2, 2), (3, 1), (4, 1)]
    assert (out / "final" / "model.safetensors").is_file()


def _ranks(launcher: subprocess.Popen, timeout: float = 120) -> dict[int, psutil.Process]:
    """The launcher's worker processes by rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = {}
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                workers[int(rank)] = child
        if len(workers) == 2:
            return workers
        time.sleep(0.05)
    raise AssertionError("the workers did not start")


def _wait_for(path: Path, launcher: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert launcher.poll() is None and time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    finetune(assets, out, 2, **RUN)
    return {r["step"]: r["loss"] for r in metrics(out)}


RUN = {"steps": 40, "save_every": 2, "keep": 100}


def _resume_matches(assets, out: Path, reference: dict) -> None:
    stopped_at = max(r["step"] for r in metrics(out))
    finetune(assets, out, 2, resume="true", **RUN)
    got = {r["step"]: r["loss"] for r in metrics(out)}
    assert sorted(got) == list(range(1, 41)) and stopped_at < 40
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), step


def test_sigterm_to_one_process_stops_both_after_the_same_step_with_a_checkpoint(assets, tmp_path, uninterrupted):
    """A scheduler's SIGTERM that reaches one rank first: both finish the same step, one checkpoint of
    it is written, the job exits 143, and resume=true continues as the uninterrupted run."""
    out = tmp_path / "run"
    launcher = launch(assets, out, torchrun(2), **RUN)
    workers = _ranks(launcher)
    _wait_for(out / "checkpoint-4", launcher)
    workers[1].send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode != 0 and "exitcode  : 143" in stderr, stderr[-2000:]
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert last == max(r["step"] for r in metrics(out)) < 40  # the checkpoint is of the last logged step
    _resume_matches(assets, out, uninterrupted)


def test_killing_one_process_stops_the_job_and_leaves_only_whole_checkpoints(assets, tmp_path, uninterrupted):
    """SIGKILL to rank 1 (a lost node): the launcher stops the job with an error; every checkpoint
    folder left is whole (written atomically), and resume=true continues as the uninterrupted run."""
    out = tmp_path / "run"
    launcher = launch(assets, out, torchrun(2), **RUN)
    workers = _ranks(launcher)
    _wait_for(out / "checkpoint-4", launcher)
    workers[1].kill()
    launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    for ckpt in out.glob("checkpoint-*"):
        assert {"training_state.pt", "config.yaml"} <= {p.name for p in ckpt.iterdir()}, ckpt
    _resume_matches(assets, out, uninterrupted)


@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_the_other_documented_launchers_make_one_job(assets, tmp_path, launcher):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun underneath; on CPU the processes join
    over gloo) and the `deepspeed` launcher (which passes --local_rank) with ZeRO-2, as docs/finetune.md
    § 4 writes them: one job of 2 processes, each step logged once, one summary line."""
    bin_dir = os.path.dirname(sys.executable)
    command = {"accelerate": [shutil.which("accelerate", path=bin_dir), "launch", "--multi_gpu", "--num_processes", "2",
                              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
               # DS_ACCELERATOR=cpu: the launcher counts CPU "accelerators"
               "deepspeed": ["env", "DS_ACCELERATOR=cpu", shutil.which("deepspeed", path=bin_dir), "--num_accelerators", "2", "--master_port",
                             str(free_port()), "--module"]}[launcher]
    if launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    out = tmp_path / launcher
    extra = {"deepspeed": CONFIGS / "zero2.json"} if launcher == "deepspeed" else {}
    text = finetune(assets, out, command, steps=2, **extra)
    assert sum(line.startswith("{") for line in text.splitlines()) == 1
    assert [(r["step"], r["world_size"]) for r in metrics(out)] == [(1, 2), (2, 2)]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("recipe, config, overrides", [
    ("classify", "classify_synth_motion.yaml", {"data.num_train": 32, "data.num_val": 8, "steps": 2, "batch_size": 4}),
    ("ground", "ground_nano.yaml", {"steps": 2, "batch_size": 4, "eval_clips": 4}),
])
def test_classification_and_grounding_run_as_one_job(tmp_path, recipe, config, overrides):
    """The other recipes under torchrun with 2 processes: one job (world_size 2), each step logged once,
    one final model."""
    out = tmp_path / recipe
    cmd = [*torchrun(2), "-m", f"training.{recipe}", "--config", str(CONFIGS / config), f"output_dir={out}",
           "log_every=1", *[f"{k}={v}" for k, v in overrides.items()]]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["step"], r["world_size"]) for r in metrics(out)] == [(1, 2), (2, 2)]
    assert (out / "final").is_dir()
