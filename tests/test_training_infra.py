"""Recipe config loading, atomic and resumable checkpoints, and the skeleton's shared pieces."""

import dataclasses
import json
import math

import pytest
import torch

from encoder.errors import UserError
from training.checkpoint import MetricsLog, latest_checkpoint, load_checkpoint, save_checkpoint, trainable_state
from training.config import keys_help, load_config, parse_overrides
from training.recipe import claim_run, lr_schedule, open_run, param_groups


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
    (["stepz=3"], "unknown key 'stepz' on the command line; did you mean 'steps'"),
    (["optim.lrr=3"], "unknown key 'optim.lrr' on the command line; did you mean 'optim.lr'"),
    (["max_steps=3"], "renamed to 'steps'"),
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
        save_checkpoint(tmp_path, step, weights=trainable_state(model), optimizer=opt, config_yaml="a: 1\n", keep=2)
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
    save_checkpoint(tmp_path, 1, weights=trainable_state(model))

    def boom(_):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, weights=trainable_state(model), write_files=boom)
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    assert not (tmp_path / "checkpoint-2").exists()


def test_metrics_log_truncates_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s})
    MetricsLog(tmp_path / "m.jsonl", resume_step=3).log({"step": 4, "loss": 0.0})
    steps = [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("resum: true\n")
    with pytest.raises(UserError, match=f"unknown key 'resum' in '{f}'; did you mean 'resume'\\? valid keys: steps, name"):
        load_config(Cfg, f)


def test_help_lists_keys_with_defaults_and_comments():
    text = keys_help(Cfg)
    assert "steps=10" in text and "teacher=null" in text and "optim.betas=[0.9, 0.95]" in text


def test_checkpoints_hold_trainable_weights_and_buffers_not_frozen_ones():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert sorted(trainable_state(model)) == ["1.bias", "1.num_batches_tracked", "1.running_mean", "1.running_var",
                                              "1.weight", "2.bias", "2.weight"]


def test_the_one_lr_schedule():
    f = lr_schedule(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.1 + 0.9 * 0.5) and f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)
    g = lr_schedule(warmup=0, total=10)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_param_groups_no_decay_on_norms_biases_and_tagged_and_own_lrs():
    m = torch.nn.Module()
    m.projector, m.vision_tower, m.language_model = (torch.nn.Linear(2, 2) for _ in range(3))
    m.table = torch.nn.Parameter(torch.zeros(1, 4, 2))
    m.table._no_weight_decay = True
    m.language_model.bias.requires_grad_(False)
    groups = param_groups(m, 1e-4, 0.1, {"projector.": 1e-3, "vision_tower.": None})
    by = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by == {(1e-3, 0.1): 1, (1e-3, 0.0): 1, (1e-4, 0.1): 2, (1e-4, 0.0): 2}  # the frozen bias is left out


def test_a_folder_holding_a_run_is_refused_without_resume(tmp_path):
    assert open_run(tmp_path / "new", resume=False) is None
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="already holds a run \\(metrics.jsonl\\); pass resume=true"):
        open_run(tmp_path / "old", resume=False)
    assert open_run(tmp_path / "old", resume=True) is None  # nothing to resume from: step 0


def test_every_process_checks_the_folder_before_the_main_one_writes_its_config(tmp_path):
    """A late process of a multi-process launch must not take the main process's fresh config.yaml
    for an old run: the check comes before the barrier, the write after it."""
    run_dir = tmp_path / "run"
    events = []

    class Other:  # a non-main process; the main one writes its config the moment the barrier opens
        is_main = False

        @staticmethod
        def wait():
            events.append("wait")
            run_dir.mkdir()
            (run_dir / "config.yaml").write_text("steps: 2\n")

    assert claim_run(Other, run_dir, resume=False, config_yaml="steps: 2\n") is None
    assert events == ["wait"]

    class Main:
        is_main = True
        wait = staticmethod(lambda: events.append("main wait"))

    assert claim_run(Main, tmp_path / "fresh", resume=False, config_yaml="steps: 3\n") is None
    assert (tmp_path / "fresh" / "config.yaml").read_text() == "steps: 3\n"
