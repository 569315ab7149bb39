"""The memory/time profiler: one real point in a fresh subprocess, a series stopped at the time limit."""

import csv
import json

import pytest

from encoder.errors import UserError
from eval import profile_memory as pm


def test_one_point_in_a_subprocess_and_reports(tmp_path):
    rc = pm.main(["--encoders", "videomap-nano", "--frames", "2", "--mode", "train", "--size", "32",
                  "--out", str(tmp_path), "--time-limit", "300"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "profile.csv").open()))
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "ok", row["note"]
    assert row["tokens"] == str(1 + 2 * 2 * 2)  # cls + T·(32/16)²
    assert float(row["peak_rss_mb"]) >= float(row["baseline_rss_mb"]) > 50  # torch alone is > 50 MB
    assert float(row["delta_mb"]) == pytest.approx(float(row["peak_rss_mb"]) - float(row["baseline_rss_mb"]), abs=0.2)
    assert float(row["time_s"]) > 0
    assert (tmp_path / "profile.png").stat().st_size > 1000
    assert "| videomap-nano | train | 2 |" in (tmp_path / "profile.md").read_text()

    # a rerun reuses the finished point instead of measuring it again
    pm.main(["--encoders", "videomap-nano", "--frames", "2", "--mode", "train", "--size", "32",
             "--out", str(tmp_path), "--time-limit", "300"])
    assert len(list(csv.DictReader((tmp_path / "profile.csv").open()))) == 1


def test_series_stops_at_time_limit(tmp_path):
    # 0.05 s is less than importing torch takes, so the first point times out for sure
    pm.main(["--encoders", "vit-nano-frame", "--frames", "2,4", "--mode", "infer", "--size", "32",
             "--out", str(tmp_path), "--time-limit", "0.05"])
    rows = list(csv.DictReader((tmp_path / "profile.csv").open()))
    assert [(r["frames"], r["status"]) for r in rows] == [("2", "timeout"), ("4", "skipped")]
    # a rerun retries failed points (here: fails again) instead of reusing or duplicating them
    pm.main(["--encoders", "vit-nano-frame", "--frames", "2,4", "--mode", "infer", "--size", "32",
             "--out", str(tmp_path), "--time-limit", "0.05"])
    rows = list(csv.DictReader((tmp_path / "profile.csv").open()))
    assert [(r["frames"], r["status"]) for r in rows] == [("2", "timeout"), ("4", "skipped")]


def test_crossover_and_encoder_names():
    def row(enc, f, t, m, status="ok"):
        return {"encoder": enc, "mode": "infer", "frames": f, "time_s": t, "delta_mb": m, "status": status}

    rows = [row("videomap-tiny", 8, 2.0, 50), row("vit-tiny", 8, 1.0, 40),
            row("videomap-tiny", 16, 3.0, 90), row("vit-tiny", 16, 3.5, 80),
            row("videomap-tiny", 32, 6.0, 180), row("vit-tiny", 32, "", "", "oom")]
    lines = pm.crossovers(rows)
    assert "- infer, time: videomap-tiny cheaper than vit-tiny from 16 frames on" in lines
    assert "- infer, memory: videomap-tiny cheaper than vit-tiny from 32 frames on" in lines
    # Where both stop (say VideoMAP out of memory, ViT out of time) the crossover found below stands;
    # where only VideoMAP stops, it does not.
    both = rows + [row("videomap-tiny", 64, "", "", "oom"), row("vit-tiny", 64, "", "", "timeout")]
    assert ("- infer, time: videomap-tiny cheaper than vit-tiny from 16 frames on "
            "(at 64 frames both stopped: videomap-tiny oom, vit-tiny timeout)") in pm.crossovers(both)
    only = rows[:4] + [row("videomap-tiny", 32, "", "", "oom"), row("vit-tiny", 32, 9.0, 300)]
    assert "- infer, time: videomap-tiny cheaper than vit-tiny not within the measured range" in pm.crossovers(only)
    pm.check_encoder_name("vit-small-frame")
    for bad in ("resnet-50", "nano"):  # profiled encoders are named with their family
        with pytest.raises(UserError, match="unknown encoder"):
            pm.check_encoder_name(bad)


def test_point_json_line(capsys):
    assert pm.main(["--point", json.dumps({"encoder": "vit-nano", "frames": 1, "mode": "infer", "size": 16})]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "ok" and out["tokens"] == 2
