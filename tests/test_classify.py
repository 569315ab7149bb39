"""Classification recipe through the real CLI: fine-tuning and linear probing on a tiny synthetic
list (decoded mp4 files, multi-clip test), and on in-memory synthetic clips with few labels."""

import json
from pathlib import Path

import pytest

from videollm.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["encoder_config.embed_dim=32", "encoder_config.depth_mamba=2", "encoder_config.attn_every=2",
        "encoder_config.num_heads=2", "encoder_config.patch_size=8", "data.num_frames=4", "data.size=32",
        "steps=6", "batch_size=4", "threads=1"]


@pytest.fixture(scope="module")
def tiny_lists(tmp_path_factory):
    from videollm.data.synth import write_synth_dataset

    root = tmp_path_factory.mktemp("synthlist")
    write_synth_dataset(root / "train", 12, seed=0, num_frames=8, size=32, task="motion")
    write_synth_dataset(root / "val", 6, seed=500, num_frames=8, size=32, task="motion")
    return root / "train" / "index.csv", root / "val" / "index.csv"


def check_results(out: Path, capsys) -> dict:
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "results.json").read_text())
    for r in (printed, saved):
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["top5"] <= 1.0 and r["top5"] >= r["top1"]
    return saved


@pytest.mark.parametrize("mode", ["finetune", "linear"])
def test_classify_on_list_files(tiny_lists, tmp_path, capsys, mode):
    train, val = tiny_lists
    out = tmp_path / mode
    rc = cli(["classify", "--config", str(REPO / "training/configs/classify_list.yaml"), *TINY,
              f"data.source={train}", f"data.val_source={val}", f"mode={mode}", "test_clips=2",
              f"output_dir={out}"])
    assert rc == 0
    r = check_results(out, capsys)
    assert r["num_test"] == 6 and r["test_clips"] == 2 and r["num_classes"] == 8 and r["mode"] == mode


def test_classify_synth_label_fraction_from_pretrained(tmp_path, capsys):
    """encoder= a pretrained encoder dir; only 25% of the labels are used."""
    from encoder.videomap import VideoMAPConfig, VideoMAPModel

    enc_dir = tmp_path / "enc"
    VideoMAPModel(VideoMAPConfig.from_preset("nano", img_size=32, num_frames=4, embed_dim=32, depth_mamba=2,
                                             attn_every=2, num_heads=2, patch_size=8)).save_pretrained(enc_dir)
    out = tmp_path / "synth"
    rc = cli(["classify", "--config", str(REPO / "training/configs/classify_synth_motion.yaml"), *TINY,
              "data.num_train=16", "data.num_val=8", "data.label_fraction=0.25", f"encoder={enc_dir}",
              f"output_dir={out}"])
    assert rc == 0
    r = check_results(out, capsys)
    assert r["num_train_labeled"] == 4 and r["num_test"] == 8


def test_bad_encoder_is_a_user_error(tmp_path, capsys):
    rc = cli(["classify", "--config", str(REPO / "training/configs/classify_synth_motion.yaml"), *TINY,
              f"encoder={tmp_path}", f"output_dir={tmp_path / 'o'}"])
    assert rc == 2 and "nor an encoder directory" in capsys.readouterr().err


def test_ablation_summary_and_comparisons_from_rows():
    """The bench's aggregation (mean ± std per arm and label fraction, per-seed runs kept), its
    pooled-std comparison and markdown, on known numbers."""
    from training.ablation import BUDGETS, compare, summarize, to_markdown

    runs = [{"arm": arm, "seed": s, "fraction": 0.1, "finetune_top1": acc, "linear_top1": acc / 2}
            for arm, accs in (("videomap", (0.5, 0.7)), ("scratch", (0.2, 0.2))) for s, acc in enumerate(accs)]
    summary = summarize(runs)
    ft = summary["videomap"]["10%"]["finetune_top1"]
    assert ft["mean"] == pytest.approx(0.6) and ft["std"] == pytest.approx(0.1414, abs=1e-3) and ft["n"] == 2
    assert [r["seed"] for r in summary["videomap"]["10%"]["runs"]] == [0, 1]
    diff = compare(summary, "videomap", "scratch")["finetune_top1"]
    assert diff["points"] == pytest.approx(40.0) and diff["in_pooled_stds"] == pytest.approx(40 / 10, rel=1e-2)
    md = to_markdown({"seeds": [0, 1], "budget": BUDGETS["smoke"], "summary": summary, "seconds": 60,
                      "comparisons": {"videomap-scratch": compare(summary, "videomap", "scratch")}})
    assert "| videomap | — | 60.0 ± 14.1 (n=2) | — | — | 30.0 ± 7.1 (n=2) | — |" in md
    assert "videomap − scratch: finetune +40.0 (4.0 σ)" in md


def test_scene_options_and_time_pool(tmp_path, capsys):
    """data.background / data.distractors fix the synthetic scene; pool=time keeps frame order."""
    import torch

    from encoder.videomap import VideoMAPConfig, VideoMAPModel
    from training.classify import VideoClassifier
    from videollm.data.synth import PLAIN_BACKGROUNDS, make_clip
    from videollm.data.video_sources import SynthSource

    src = SynthSource(4, 32, "motion", base_seed=10, size_hint=4, background="plain", distractors=0)
    for i in range(2):
        kw = src.spec_kw(10 + i)
        assert kw["background"] in PLAIN_BACKGROUNDS and kw["distractors"] == 0
        clip = make_clip(10 + i, 4, 32, "motion", **kw)
        assert len(clip.spec.objects) == 1
        x, y = src.load(i)
        assert x.shape == (3, 4, 32, 32) and y == clip.label
    enc = VideoMAPModel(VideoMAPConfig.from_preset("nano", img_size=32, num_frames=4, embed_dim=32, depth_mamba=2,
                                                   attn_every=2, num_heads=2, patch_size=8))
    model = VideoClassifier(enc, 8, pool="time").eval()
    x = torch.randn(2, 3, 4, 32, 32)
    assert model.features(x).shape == (2, 4 * 32) and model(x).shape == (2, 8)
    out = tmp_path / "scene"
    rc = cli(["classify", "--config", str(REPO / "training/configs/classify_synth_motion.yaml"), *TINY,
              "data.num_train=8", "data.num_val=4", "encoder=nano", "pool=time", "data.background=plain",
              "data.distractors=0", "steps=2", f"output_dir={out}"])
    assert rc == 0 and check_results(out, capsys)["num_test"] == 4
    rc = cli(["classify", "--config", str(REPO / "training/configs/classify_synth_motion.yaml"), *TINY,
              "data.background=sky", f"output_dir={tmp_path / 'bad'}"])
    assert rc == 2 and "data.background" in capsys.readouterr().err


def test_classify_a_class_folder_tree_saves_the_classifier_and_resumes_exactly(tmp_path, capsys):
    """data.source=<folder>/<class>/<video> (Kinetics-style): labels from the sub-folders; the run
    checkpoints, refuses to start over in its folder, resumes with the uninterrupted run's losses,
    and saves the fine-tuned classifier, which loads with its class names."""
    import shutil

    import torch

    from training.classify import load_classifier
    from videollm.data.synth import write_synth_dataset

    write_synth_dataset(tmp_path / "synth", 8, seed=0, num_frames=8, size=32, task="motion")
    tree = tmp_path / "tree"
    for line in (tmp_path / "synth" / "index.csv").read_text().splitlines():
        path, label = line.split(",")
        (tree / f"class{label}").mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "synth" / path, tree / f"class{label}")
    classes = sorted(p.name for p in tree.iterdir())
    args = ["classify", "--config", str(REPO / "training/configs/classify_list.yaml"), *TINY, f"data.source={tree}",
            f"data.val_source={tree}", "steps=4", "save_every=2", "log_every=1", "optim.warmup_steps=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli([*args, f"output_dir={full}"]) == 0
    r = check_results(full, capsys)
    assert r["num_classes"] == len(classes) and r["classes"] == classes and r["num_test"] == 8
    assert cli([*args, f"output_dir={part}", "stop_after=2"]) == 0
    assert (part / "checkpoint-2" / "trainable.safetensors").is_file() and not (part / "final").exists()
    capsys.readouterr()
    assert cli([*args, f"output_dir={part}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli([*args, f"output_dir={part}", "resume=true"]) == 0
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (full, part)]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    model, names = load_classifier(part / "final")
    assert names == classes and model(torch.zeros(1, 3, 4, 32, 32)).shape == (1, len(classes))
