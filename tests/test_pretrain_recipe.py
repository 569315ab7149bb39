"""The pretraining recipe, through the real CLI: the loss goes down, a killed run resumes with the
uninterrupted run's losses, undecodable videos are skipped and reported."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from videollm.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "training/configs/pretrain_smoke.yaml")


def metrics(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert cli(["pretrain", "--config", SMOKE, f"output_dir={out}"]) == 0
    return out


def test_loss_decreases_and_encoder_saved(full_run):
    m = metrics(full_run)
    assert sorted(m) == list(range(1, 31))
    losses = [m[s]["loss"] for s in range(1, 31)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    for key in ("lr", "samples_per_s", "skipped", "next_pix", "masked_pix", "grad_norm"):
        assert key in m[30]
    from encoder.videomap import VideoMAPModel

    enc = VideoMAPModel.from_pretrained(full_run / "encoder")
    assert enc.config.embed_dim == 32 and enc.config.num_frames == 4
    assert (full_run / "checkpoint-30" / "config.yaml").is_file()


def test_kill_and_resume_matches_uninterrupted(full_run, tmp_path):
    out = tmp_path / "run"
    assert cli(["pretrain", "--config", SMOKE, f"output_dir={out}", "stop_after=10"]) == 0
    assert (out / "checkpoint-10").is_dir() and not (out / "encoder").exists()
    # restarting without resume=true refuses to overwrite
    assert cli(["pretrain", "--config", SMOKE, f"output_dir={out}"]) == 2
    assert cli(["pretrain", "--config", SMOKE, f"output_dir={out}", "resume=true", "stop_after=20"]) == 0
    ref, got = metrics(full_run), metrics(out)
    assert sorted(got) == list(range(1, 21))
    for step in range(11, 21):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-5), step
    assert got[20]["loss"] == pytest.approx(ref[20]["loss"], abs=1e-5)


def test_corrupt_videos_skipped_and_reported(tmp_path, caplog, capsys):
    from videollm.data.synth import write_synth_dataset

    data = tmp_path / "data"
    write_synth_dataset(data, 6, seed=0, num_frames=4, size=32, task="motion")
    good = (data / "videos" / "000000.mp4").read_bytes()
    (data / "videos" / "text.mp4").write_text("this is not a video\n")
    (data / "videos" / "trunc.mp4").write_bytes(good[: len(good) // 3])
    lines = (data / "index.csv").read_text() + "videos/text.mp4,0\nvideos/trunc.mp4,1\n"
    (data / "list.csv").write_text(lines)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        rc = cli(["pretrain", "--config", SMOKE, f"output_dir={out}", f"data.source={data / 'list.csv'}",
                  "steps=6", "save_every=3"])
    assert rc == 0
    m = metrics(out)
    assert sorted(m) == list(range(1, 7))
    assert m[6]["skipped"] > 0 and m[6]["skipped_files"] == 2
    text = caplog.text
    assert "text.mp4" in text and "trunc.mp4" in text
    # over the cap: a clear error naming the cap (exit status 2)
    rc = cli(["pretrain", "--config", SMOKE, f"output_dir={tmp_path / 'run2'}", f"data.source={data / 'list.csv'}",
              "steps=6", "data.max_skipped=1"])
    assert rc == 2
    assert "data.max_skipped=1" in capsys.readouterr().err


def test_shipped_pretrain_configs_load():
    from training.config import load_config
    from training.pretrain import PretrainConfig, build_model

    for path in sorted((REPO / "training/configs").glob("pretrain_*.yaml")):
        cfg = load_config(PretrainConfig, path)
        assert cfg.output_dir and cfg.steps > 0
        if "smoke" in path.name:
            build_model(cfg)
    nano = load_config(PretrainConfig, REPO / "training/configs/pretrain_nano_synth.yaml")
    assert nano.encoder == "nano" and nano.data.num_frames == 16
    assert yaml.safe_load((REPO / "training/configs/pretrain_nano_synth.yaml").read_text())["objective"]["name"] == "videomap"


def test_a_folder_of_videos_is_a_source(tmp_path, capsys, caplog):
    """data.source=<folder>: every video under it (any depth); an empty or missing folder is named.
    Off a terminal, progress is a log line with the ETA."""
    from videollm.data.synth import write_synth_dataset

    write_synth_dataset(tmp_path / "data", 4, seed=0, num_frames=4, size=32, task="motion")
    (tmp_path / "data" / "index.csv").unlink()  # only videos: the folder itself is the source
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="training.recipe"):
        assert cli(["pretrain", "--config", SMOKE, f"output_dir={out}", f"data.source={tmp_path / 'data'}",
                    "steps=2", "save_every=2"]) == 0
    assert sorted(metrics(out)) == [1, 2] and (out / "encoder" / "config.json").is_file()
    assert "pretrain step 2/2" in caplog.text and "ETA" in caplog.text
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert cli(["pretrain", "--config", SMOKE, f"output_dir={tmp_path / 'r2'}", f"data.source={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err
    assert f"folder '{tmp_path / 'empty'}' holds no videos" in err and "not found" not in err
    assert cli(["pretrain", "--config", SMOKE, f"output_dir={tmp_path / 'r3'}", f"data.source={tmp_path / 'nope'}"]) == 2
    assert f"data.source '{tmp_path / 'nope'}' not found; give 'synth', a folder" in capsys.readouterr().err


def test_help_lists_every_key_and_unknown_keys_are_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["pretrain", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for line in ("steps=1000", "stop_after=null", "resume=false", "keep=2", "encoder=nano", "data.source=synth",
                 "optim.lr=0.00015", "optim.min_lr_ratio=0.0", "objective.name=videomap", "precision=fp32"):
        assert line in text, line
    assert "continue the run in output_dir" in text  # the field's comment
    assert cli(["pretrain", "--config", SMOKE, "resum=true"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'resum' on the command line; did you mean 'resume'?" in err and "valid keys:" in err
    assert cli(["pretrain", "--config", SMOKE, "max_steps=3"]) == 2
    assert "renamed to 'steps'" in capsys.readouterr().err
    assert cli(["pretrain", "--config", SMOKE, "optim.lrr=3"]) == 2
    assert "did you mean 'optim.lr'?" in capsys.readouterr().err


def test_sigterm_writes_a_checkpoint_and_resume_continues_exactly(full_run, tmp_path):
    """What a scheduler sends before it kills a job: the run finishes its step, writes a checkpoint
    and exits cleanly with 143 (128 + SIGTERM); resume=true then continues with the uninterrupted
    run's losses."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "videollm.cli", "pretrain", "--config", SMOKE, f"output_dir={out}", "log_every=1"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr  # not finished: a scheduler or the pipeline must not take it as done
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    stopped = max(metrics(out))
    assert 3 <= stopped < 30 and (out / f"checkpoint-{stopped}").is_dir() and not (out / "encoder").exists()
    assert cli(["pretrain", "--config", SMOKE, f"output_dir={out}", "resume=true"]) == 0
    ref, got = metrics(full_run), metrics(out)
    assert sorted(got) == list(range(1, 31))
    for step in range(1, 31):  # before the signal, and after the resume
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-5), step
    assert (out / "encoder" / "config.json").is_file()


def test_two_processes_under_torchrun_are_one_data_parallel_job(tmp_path):
    """torchrun --nproc_per_node 2 on a machine without CUDA: one job (gloo), not two copies racing:
    each step logged once with world_size 2, one summary line, one final encoder, and losses unlike
    the single-process run's (each process draws its own clips)."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun is installed with torch"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(n), "-m", "training.pretrain", "--config", SMOKE,
               f"output_dir={out}", "steps=4", "log_every=1", "save_every=4"]
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1, proc.stdout  # rank 0 alone prints the summary
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3, 4] and {r["world_size"] for r in log} == {n}
        assert (out / "encoder" / "config.json").is_file() and "# world_size: %d" % n in (out / "config.yaml").read_text()
        runs[n] = [r["loss"] for r in log]
    assert runs[1] != pytest.approx(runs[2], abs=1e-6)  # rank 1's clips are not rank 0's
