"""Classification recipe through the real CLI: fine-tuning and linear probing on a tiny synthetic
list (decoded mp4 files, multi-clip test), and on in-memory synthetic clips with few labels."""

import json
from pathlib import Path

import pytest

from videollm.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.overrides.embed_dim=32", "model.overrides.depth_mamba=2", "model.overrides.attn_every=2",
        "model.overrides.num_heads=2", "model.overrides.patch_size=8", "data.num_frames=4", "data.size=32",
        "epochs=2", "batch_size=4", "num_threads=1"]


@pytest.fixture(scope="module")
def tiny_lists(tmp_path_factory):
    from training.synth import write_synth_dataset

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
              f"data.train_list={train}", f"data.val_list={val}", f"mode={mode}", "test_clips=2",
              f"output_dir={out}"])
    assert rc == 0
    r = check_results(out, capsys)
    assert r["num_test"] == 6 and r["test_clips"] == 2 and r["num_classes"] == 8 and r["mode"] == mode


def test_classify_synth_label_fraction_from_pretrained(tmp_path, capsys):
    """init= a pretrained encoder dir; only 25% of the labels are used."""
    from encoder.videomap import VideoMAPConfig, VideoMAPModel

    enc_dir = tmp_path / "enc"
    VideoMAPModel(VideoMAPConfig.from_preset("nano", img_size=32, num_frames=4, embed_dim=32, depth_mamba=2,
                                             attn_every=2, num_heads=2, patch_size=8)).save_pretrained(enc_dir)
    out = tmp_path / "synth"
    rc = cli(["classify", "--config", str(REPO / "training/configs/classify_synth_motion.yaml"), *TINY,
              "data.num_train=16", "data.num_val=8", "data.label_fraction=0.25", f"init={enc_dir}",
              f"output_dir={out}"])
    assert rc == 0
    r = check_results(out, capsys)
    assert r["num_train_labeled"] == 4 and r["num_test"] == 8


def test_bad_init_is_a_user_error(tmp_path, capsys):
    rc = cli(["classify", "--config", str(REPO / "training/configs/classify_synth_motion.yaml"), *TINY,
              f"init={tmp_path}", f"output_dir={tmp_path / 'o'}"])
    assert rc == 2 and "not an encoder directory" in capsys.readouterr().err


def test_ablation_table_from_rows():
    """The bench's aggregation (mean ± std per arm) and markdown, on known numbers."""
    from training.ablation import BUDGETS, summarize, to_markdown

    runs = [{"arm": arm, "seed": s, "pretrain_loss": None if arm == "scratch" else 1.0,
             "finetune_top1": acc, "finetune_top5": 1.0, "linear_top1": acc / 2}
            for arm, accs in (("videomap", (0.5, 0.7)), ("scratch", (0.2, 0.2))) for s, acc in enumerate(accs)]
    summary = summarize(runs)
    assert summary["videomap"]["finetune_top1"]["mean"] == pytest.approx(0.6)
    assert summary["videomap"]["finetune_top1"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert summary["scratch"]["finetune_top1"]["std"] == 0.0 and summary["scratch"]["pretrain_loss"] is None
    md = to_markdown({"task": "motion", "num_classes": 8, "seeds": [0, 1], "budget": BUDGETS["smoke"],
                      "summary": summary, "seconds": 60})
    assert "| videomap | hybrid 2:1 | VideoMAP | 60.0 ± 14.1 | 30.0 ± 7.1 | 1.000 |" in md
