"""Recipe config loading and atomic, resumable checkpoints."""

import dataclasses
import json

import pytest
import torch

from encoder.errors import UserError
from training.checkpoint import MetricsLog, latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import load_config, parse_overrides


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)


@dataclasses.dataclass
class Cfg:
    steps: int = 10
    name: str = "x"
    teacher: str | None = None
    resume: bool = False
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 30\noptim:\n  lr: 0.01\n")
    cfg = load_config(Cfg, f, ["optim.lr=3e-4", "resume=true", "teacher=null", "name=run 1"])
    assert cfg.steps == 30 and cfg.optim.lr == pytest.approx(3e-4) and cfg.resume is True
    assert cfg.teacher is None and cfg.name == "run 1" and cfg.optim.betas == (0.9, 0.95)
    assert parse_overrides(["a.b=1"]) == {"a.b": 1}


@pytest.mark.parametrize("override, message", [
    (["stepz=3"], "unknown key"),
    (["steps=many"], "expected an integer"),
    (["resume=maybe"], "expected true/false"),
    (["steps"], "key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(Cfg, None, override)


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Cfg, bad)


def test_checkpoint_roundtrip_rng_and_rotation(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, config_yaml="a: 1\n", keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    expected_next = torch.rand(3)  # the draw right after the checkpoint's RNG snapshot
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model2, optimizer=opt2)
    assert state["step"] == 3
    assert torch.equal(torch.rand(3), expected_next)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["exp_avg"].shape == (2, 3)
    assert not list(tmp_path.glob(".*tmp*"))


def test_interrupted_write_keeps_previous(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, model=model)

    def boom(_):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, model=model, write_files=boom)
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    assert not (tmp_path / "checkpoint-2").exists()


def test_metrics_log_truncates_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s})
    MetricsLog(tmp_path / "m.jsonl", resume_step=3).log({"step": 4, "loss": 0.0})
    steps = [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
