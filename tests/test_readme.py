"""Every command the README shows runs.

The commands are read from the README's shell code blocks, so the README and this file cannot
drift apart: a new command needs an entry in FAST (the same command with short flags, so it takes
seconds), and an entry whose command left the README fails too. The commands run in a scratch
folder, in README order, as a user would type them (`training/configs` is linked in); each checks
something that could fail (an output file, a non-empty reply, a JSON line), and no command may
print a Python warning or a traceback (quiet by default).

Only `videollm train-default` (the whole pipeline, minutes even at the smoke budget) is slow.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from encoder.video_io import sample_clip_path
from training.recipe import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 150


def readme_commands(text: str | None = None) -> list[str]:
    """The command lines of the README's shell code blocks, comments stripped, continuation lines
    joined, in README order; each re-quoted by shlex.join (so a question reads 'like this')."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands, in_block, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block and line.strip("`").strip() in ("bash", "sh", "shell", "console")
            continue
        if not in_block:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


# -------------------------------------------------------------------------------------------------
# The fast variant of each README command


@dataclass
class Fast:
    id: str
    check: Callable[[Path, subprocess.CompletedProcess], None]
    set: dict[str, str] = field(default_factory=dict)  # flag -> new value (the flag must be in the command)
    add: list[str] = field(default_factory=list)  # words appended (flags, or key=value overrides, which win)
    needs: list[str] = field(default_factory=list)  # ids of the commands whose outputs this one reads
    stdin: str | None = None
    server: bool = False  # a server: up and answering HTTP is the check; then it is stopped
    slow: bool = False

    def argv(self, command: str) -> list[str]:
        words = shlex.split(command)
        for flag, value in self.set.items():
            assert flag in words, f"README command no longer has {flag}: {command}"
            words[words.index(flag) + 1] = value
        return words + self.add


def _stdout(ws: Path, proc: subprocess.CompletedProcess) -> None:
    assert proc.stdout.strip(), "no output"


def _answered(ws: Path, proc: subprocess.CompletedProcess) -> None:
    """A server's check is made while it runs (it answered HTTP); nothing is left to look at."""


def _file(*paths: str) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(ws: Path, proc: subprocess.CompletedProcess) -> None:
        for p in paths:
            assert (ws / p).exists(), f"{p} was not written"
    return check


def _json_line(key: str) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(ws: Path, proc: subprocess.CompletedProcess) -> None:
        assert key in json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout[-500:]
    return check


def _synthqa(ws: Path, proc: subprocess.CompletedProcess) -> None:
    assert json.loads((ws / "out/synthqa/results.json").read_text())["n"] == 2


def _bench_chat(ws: Path, proc: subprocess.CompletedProcess) -> None:
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["new_tokens"] > 0 and out["packed_decoder"]  # the shipped model decodes on its packed weights
    assert set(out["bare"]["by_attention"]) == {"sdpa", "eager"} and out["decode_speedup"] > 0  # the same-run anchor
    assert len(out["tokens_per_s_runs"]) == len(out["bare"]["runs"]) == 3  # ours and the anchor's in turn, 3 each
    # each of ours a first answer: the clip read and encoded again, the median time to first token reported
    assert len(out["time_to_first_token_runs_s"]) == 3 and out["decode_s"] > 0 and out["encode_s"] > 0
    assert out["time_to_first_token_s"] == sorted(out["time_to_first_token_runs_s"])[1]
    assert out["next_turn"]["prompt_tokens"] > out["prompt_tokens"] + out["new_tokens"]  # the answer, then a question


def _profile(ws: Path, proc: subprocess.CompletedProcess) -> None:
    rows = json.loads((ws / "out/profile/profile.json").read_text())
    assert rows and all(r["status"] == "ok" for r in rows), rows


CHAT = ["--frames", "2", "--max-new-tokens", "4"]
PRETRAIN = ["steps=2", "batch_size=2", "save_every=2", "data.num_frames=4", "data.size=32"]

# README command (as readme_commands() gives it) -> its fast variant.
FAST: dict[str, Fast] = {
    "videollm chat bigbuckbunny 'What happens in this video?' --frames 16":
        Fast("chat", _stdout, set={"--frames": "2"}, add=["--max-new-tokens", "4"]),
    "videollm chat bikes 'What moves?' --frames auto --max-memory 8GB":
        Fast("chat-frames-auto", _stdout, add=["--max-new-tokens", "4"]),
    "videollm chat bikes":
        Fast("chat-interactive", _stdout, add=CHAT, stdin="What colour is the object?\n/quit\n"),
    "videollm chat --no-video 'What is the capital of France?'":
        Fast("chat-no-video", _stdout, add=["--max-new-tokens", "4"]),
    "videollm demo --port 7860":
        Fast("demo", _answered, set={"--port": "FREE_PORT"}, add=["--no-examples"], server=True),
    "videollm serve --port 8000":
        Fast("serve", _answered, set={"--port": "FREE_PORT"}, server=True),
    "videollm pretrain --config training/configs/pretrain_nano_synth.yaml output_dir=runs/nano":
        Fast("pretrain", _file("runs/nano/encoder/config.json"), add=PRETRAIN),
    "videollm pretrain --config training/configs/pretrain_nano_synth.yaml data.source=my_videos/ "
    "output_dir=runs/mine_encoder":
        Fast("pretrain-folder", _file("runs/mine_encoder/encoder/config.json"), add=PRETRAIN),
    "videollm classify --config training/configs/classify_synth_motion.yaml encoder=runs/nano/encoder":
        Fast("classify", _file("runs/classify_synth_motion/final", "runs/classify_synth_motion/results.json"),
             add=["steps=2", "batch_size=4", "eval_batch_size=4", "data.num_train=8", "data.num_val=4",
                  "data.num_frames=4"], needs=["pretrain"]),
    "videollm data synth --out data/synth --n 500 --task motion":
        Fast("data-synth", _file("data/synth/instruct.json", "data/synth/videos/000000.mp4"),
             set={"--n": "4"}, add=["--frames", "4", "--size", "32"]),
    "videollm data check data/synth/instruct.json --decode":
        Fast("data-check", _stdout, needs=["data-synth"]),
    "videollm finetune --config training/configs/finetune_stage2.yaml init_from=default "
    "data.source=data/synth/instruct.json output_dir=runs/mine":
        Fast("finetune", _file("runs/mine/final/config.json", "runs/mine/final/llm_adapter"),
             add=["steps=2", "batch_size=1", "grad_accum=1", "save_every=2", "eval_every=0", "eval_batches=1",
                  "data.num_frames=2", "data.size=32", "precision=fp32", "gradient_checkpointing=false"],
             needs=["data-synth"]),
    "videollm chat data/synth/videos/000000.mp4 'How does the object move?' --model runs/mine/final":
        Fast("chat-finetuned", _stdout, add=CHAT, needs=["finetune"]),
    "videollm train-default --out runs/default_model --ship runs/my_default":
        Fast("train-default", _file("runs/default_model/stage2/final/config.json"),
             add=["--config", "training/configs/default_model_smoke.yaml"], slow=True),
    "videollm eval qa --benchmark synthqa --seed 1 --n 200 --out out/synthqa":
        Fast("eval-qa", _synthqa, set={"--n": "2"}, add=["--frames", "2", "--max-new-tokens", "4"]),
    "videollm eval niah --frames 64,128,256 --depths 0,0.5,1 --model runs/mine/final --out out/niah":
        Fast("eval-niah", _file("out/niah/niah.json"), set={"--frames": "8", "--depths": "0.5"},
             add=["--needles", "1", "--max-new-tokens", "4"], needs=["finetune"]),
    "videollm profile memory --encoders videomap-tiny,vit-tiny,vit-tiny-frame --frames 8,16,32,64 "
    "--mode infer,train --out out/profile":
        Fast("profile", _profile, set={"--encoders": "videomap-tiny", "--frames": "2", "--mode": "infer"},
             add=["--size", "32", "--time-limit", "120"]),
    "videollm bench scan":
        Fast("bench-scan", _json_line("speedup"),
             add=["--batch", "1", "--dim", "8", "--state", "4", "--length", "32", "--repeats", "1"]),
    "videollm bench chat":
        Fast("bench-chat", _bench_chat, add=["--frames", "2", "--max-new-tokens", "4", "--no-warmup"]),
    "videollm bench ablation --out out/ablation":
        Fast("bench-ablation", _file("out/ablation/ablation.json"),
             add=["--budget", "smoke", "--seeds", "1", "--jobs", "1", "--threads", "1"]),
}

BY_ID = {fast.id: command for command, fast in FAST.items()}


# -------------------------------------------------------------------------------------------------
# Running them


def _videollm() -> list[str]:
    script = Path(sys.executable).parent / "videollm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "videollm.cli"]


# One torch thread per command: on a CPU shared with other jobs, two spinning OpenMP threads per
# process made a 4-second training step take 36 s; these tiny commands gain nothing from two.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Workspace:
    """A scratch folder laid out as a user's checkout: the recipes' configs, a folder of own videos."""

    def __init__(self, root: Path):
        self.root = root
        (root / "training").mkdir()
        (root / "training" / "configs").symlink_to(REPO / "training" / "configs")
        (root / "my_videos").mkdir()
        for name in ("carphone_distorted", "carphone_pristine"):
            shutil.copy(sample_clip_path(name), root / "my_videos" / f"{name}.mp4")
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def run(self, command: str) -> subprocess.CompletedProcess:
        fast = FAST[command]
        if fast.id in self.done:
            return self.done[fast.id]
        for need in fast.needs:
            proc = self.run(BY_ID[need])
            assert proc.returncode == 0, f"{need}, needed by {fast.id}, failed"
        words = fast.argv(command)
        argv = _videollm() + [str(free_port()) if w == "FREE_PORT" else w for w in words[1:]]
        proc = self._server(argv) if fast.server else subprocess.run(
            argv, cwd=self.root, env=ENV, input=fast.stdin or "", capture_output=True, text=True, timeout=600)
        self.done[fast.id] = proc
        return proc

    def _server(self, argv: list[str]) -> subprocess.CompletedProcess:
        port = argv[argv.index("--port") + 1]
        url, up = f"http://127.0.0.1:{port}/", False
        server = subprocess.Popen(argv, cwd=self.root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and server.poll() is None and not up:
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        up = response.status == 200
                except OSError:
                    time.sleep(1)
        finally:
            server.terminate()
            try:
                out, err = server.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                out, err = server.communicate()
        # A server stopped by us is a success only if it answered first.
        return subprocess.CompletedProcess(argv, 0 if up else (server.returncode or 1), out,
                                           err if up else f"{err}\nnever answered {url}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("readme"))


def _params():
    params = []
    for command in readme_commands():
        if not command.startswith("videollm "):
            continue
        fast = FAST.get(command)
        marks = [pytest.mark.slow] if fast and fast.slow else []
        params.append(pytest.param(command, id=fast.id if fast else command[:60], marks=marks))
    return params


@pytest.mark.parametrize("command", _params())
def test_readme_command_runs(command, workspace):
    assert command in FAST, (f"the README shows a command with no fast variant in tests/test_readme.py: "
                             f"{command!r}; add one to FAST")
    proc = workspace.run(command)
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
    FAST[command].check(workspace.root, proc)
    for noise in ("Traceback (most recent call last)", "Warning:", "warnings.warn(", "] [WARNING] ["):  # last: DeepSpeed's log
        assert noise not in proc.stderr, f"{command} printed library noise:\n{proc.stderr[-3000:]}"


# -------------------------------------------------------------------------------------------------
# The README itself


def test_every_readme_command_is_known_and_every_fast_variant_is_in_the_readme():
    commands = readme_commands()
    assert set(FAST) <= set(commands), f"FAST has commands the README no longer shows: {set(FAST) - set(commands)}"
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for command in commands:
        words = shlex.split(command)
        if words[0] == "make":
            assert all(t in targets for t in words[1:] if "=" not in t), f"no such make target: {command}"
        else:
            assert words[0] == "videollm" and command in FAST, \
                f"README command without a fast variant in tests/test_readme.py: {command!r}"


def test_readme_commands_are_read_as_the_shell_reads_them():
    text = "```bash\nvideollm chat x \"a question # not a comment\" \\\n    --frames 2   # a comment\n```\n" \
           "```python\nvideollm not a shell block\n```\n"
    assert readme_commands(text) == ["videollm chat x 'a question # not a comment' --frames 2"]


def test_readme_is_short_and_its_links_exist():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to a missing {target}"
    for path in re.findall(r"`((?:docs|videollm|training)/[\w./-]+\.(?:md|json|yaml))`", text):
        assert (REPO / path).exists(), f"README names a missing {path}"


def test_docs_tables_are_written_from_their_json():
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "tables.py"), "--check"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
