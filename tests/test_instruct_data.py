"""Instruction data: ``videollm data check`` names each bad record; mix sampling; VideoChat2 import;
dataset + collate (a broken video is skipped and counted, never a crash)."""

import json

import numpy as np
import pytest
import torch

from encoder.errors import UserError
from encoder.video_io import read_video, write_video
from videollm.data.instruct import (InstructDataset, collate, import_videochat2, load_mix, load_records,
                                    sample_records, split_eval, videochat2_to_llava)
from videollm.cli import main as cli


def _conv(q="<video>\nWhat moves?", a="A red square."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    write_video(d / "ok.mp4", rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), fps=4)
    (d / "broken.mp4").write_bytes(b"this is not a video at all" * 20)
    return d


def _check(capsys, *argv):
    code = cli(["data", "check", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_valid_file_passes_with_summary(tmp_path, video_dir, capsys):
    recs = [{"id": "a", "video": "ok.mp4", "conversations": _conv() + _conv("And then?", "It stops.")},
            {"id": "b", "video": "ok.mp4", "start": 0.5, "end": 2.0,
             "conversations": [{"role": "user", "content": "<video> Colour?"},
                               {"role": "assistant", "content": "Red."}]}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    code, out, _ = _check(capsys, f, "--video-root", video_dir, "--decode")
    assert code == 0, out
    assert "2 records, 6 turns" in out and "1 videos" in out


BAD_RECORDS = [
    ({"id": "x", "video": "ok.mp4"}, "missing 'conversations'"),
    ({"video": "ok.mp4", "conversations": [{"from": "system", "value": "<video> hi"},
                                           {"from": "gpt", "value": "a"}]}, "role 'system'"),
    ({"video": "ok.mp4", "conversations": [{"from": "gpt", "value": "<video> hi"},
                                           {"from": "human", "value": "a"}]}, "must alternate"),
    ({"video": "ok.mp4", "conversations": _conv(q="What moves?")}, "no <video> tag"),
    ({"video": "ok.mp4", "conversations": _conv(q="<video><video> What?")}, "2 <video> tags"),
    ({"video": "ok.mp4", "conversations": _conv(a="  ")}, "empty answer"),
    ({"video": "missing.mp4", "conversations": _conv()}, "not found"),
    ({"id": "t", "conversations": _conv()}, "missing 'video'"),  # a tag but no video
    ({"video": "", "conversations": _conv()}, "'video' must be a path"),
]


@pytest.mark.parametrize("record, problem", BAD_RECORDS)
def test_each_bad_record_is_named(tmp_path, video_dir, capsys, record, problem):
    good = {"id": "g", "video": "ok.mp4", "conversations": _conv()}
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (good, good, record)) + "\n")
    code, out, _ = _check(capsys, f, "--video-root", video_dir)
    assert code == 1
    lines = out.strip().splitlines()
    assert lines and all(line.startswith("record 3: ") for line in lines), out
    assert problem in out


def test_invalid_json_reports_the_line(tmp_path, video_dir, capsys):
    good = json.dumps({"video": "ok.mp4", "conversations": _conv()})
    f = tmp_path / "d.jsonl"
    f.write_text(f"{good}\n{good}\n{good}\n{{\"video\": \"ok.mp4\", \n{good}\n")
    code, out, _ = _check(capsys, f, "--video-root", video_dir)
    assert code == 1 and out.startswith("record 4: invalid JSON on line 4"), out
    g = tmp_path / "d.json"
    g.write_text("[\n" + good + ",\n" + good + ",\n{\"video\" \"ok.mp4\"},\n" + good + "\n]\n")
    code, out, _ = _check(capsys, g, "--video-root", video_dir)
    assert code == 1 and "invalid JSON at line 4" in out, out


def test_undecodable_video_needs_decode(tmp_path, video_dir, capsys):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"video": str(video_dir / "ok.mp4"), "conversations": _conv()},
                             {"video": str(video_dir / "broken.mp4"), "conversations": _conv()}]))
    assert _check(capsys, f)[0] == 0  # exists, so fine without --decode
    code, out, _ = _check(capsys, f, "--decode")
    assert code == 1 and out.startswith("record 2: ") and "cannot be decoded" in out, out


def test_missing_file_is_exit_2(tmp_path, capsys):
    code, _, err = _check(capsys, tmp_path / "nope.json")
    assert code == 2 and err.startswith("error: ") and "not found" in err


def test_mix_sampling_is_deterministic(tmp_path, video_dir):
    for name, n in (("a", 10), ("b", 4)):
        recs = [{"id": f"{name}{i}", "video": "ok.mp4", "conversations": _conv(a=f"{name}{i}")} for i in range(n)]
        (tmp_path / f"{name}.json").write_text(json.dumps(recs))
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"seed: 3\ndatasets:\n"
                   f"  - {{path: a.json, video_root: {video_dir}, sampling: 0.5}}\n"
                   f"  - {{path: b.json, video_root: {video_dir}, sampling: 2.5}}\n")
    recs = load_mix(mix)
    ids = [r.id for r in recs]
    assert sum(i.startswith("a") for i in ids) == 5 and len(set(i for i in ids if i.startswith("a"))) == 5
    assert sum(i.startswith("b") for i in ids) == 10  # 2 full copies + 2 of 4
    assert all(ids.count(f"b{i}") >= 2 for i in range(4))
    assert ids == [r.id for r in load_mix(mix)]  # same seed, same mix
    assert ids != [r.id for r in load_mix(mix, seed=4)]
    mix.write_text(f"datasets:\n  - {{path: a.json, video_root: {video_dir}, samples: 13}}\n")
    assert len(load_records(mix)) == 13
    assert sample_records(list(range(10)), samples=3, seed=0) == sample_records(list(range(10)), samples=3, seed=0)
    mix.write_text("datasets:\n  - {path: a.json, sampling: -1}\n")
    with pytest.raises(UserError, match="sampling"):
        load_mix(mix)


def test_videochat2_importer(tmp_path, video_dir, capsys):
    vc2 = [{"video": "ok.mp4", "QA": [{"i": "Watch carefully.", "q": "What colour?", "a": "Red."},
                                      {"i": "", "q": "How many?", "a": "Two."}]},
           {"video": "ok.mp4", "start": 0.0, "end": 1.5, "QA": [{"i": "Describe the video.", "q": "", "a": "A square."}]}]
    assert videochat2_to_llava(vc2)[0]["conversations"] == [
        {"from": "human", "value": "<video>\nWatch carefully.\nWhat colour?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Two."}]
    src = video_dir / "vc2.json"
    src.write_text(json.dumps(vc2))
    out = tmp_path / "llava.jsonl"
    code = cli(["data", "check", str(src), "--import-videochat2", str(out), "--decode"])
    text = capsys.readouterr().out
    assert code == 0, text
    recs = load_records(out, video_dir)
    assert [r.id for r in recs] == ["vc2-1", "vc2-2"] and recs[1].end == 1.5
    assert recs[1].conversations[0]["value"] == "<video>\nDescribe the video."
    assert import_videochat2(src, tmp_path / "x.json") == 2


def test_dataset_skips_and_counts_bad_videos(tmp_path, video_dir):
    recs = [{"id": str(i), "video": "broken.mp4" if i in (1, 2) else "ok.mp4", "conversations": _conv()}
            for i in range(5)]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    records = load_records(f, video_dir)

    def encode(record):
        frames = read_video(record.video, 4).frames
        n = 3 + int(record.id)
        return {"input_ids": torch.arange(n), "labels": torch.arange(n),
                "pixel_values": torch.from_numpy(frames).permute(3, 0, 1, 2).float()}

    ds = InstructDataset(records, encode, max_bad_videos=2)
    items = [ds[i] for i in range(5)]
    assert ds.bad_videos == 1  # both records share one broken file
    assert [len(x["input_ids"]) for x in items] == [3, 6, 6, 6, 7]  # 1 and 2 fall through to 3
    batch = collate(items[:2], pad_token_id=0)
    assert batch["input_ids"].shape == (2, 6) and batch["pixel_values"].shape == (2, 3, 4, 32, 32)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["labels"][0].tolist() == [0, 1, 2, -100, -100, -100]
    ds = InstructDataset(records, encode, max_bad_videos=0)
    with pytest.raises(UserError, match="failed to decode"):
        ds[1]
    train, held = split_eval(records, 0.2, seed=0)
    assert len(train) == 4 and len(held) == 1 and not {r.id for r in train} & {r.id for r in held}


def test_num_frames_per_record(tmp_path, video_dir):
    from videollm.data.instruct import parse_record

    obj = {"id": "long", "video": "ok.mp4", "num_frames": 64, "conversations": _conv()}
    record, problems = parse_record(obj, video_dir, 1, "d.json")
    assert problems == [] and record.num_frames == 64
    assert record.to_json(video_dir) == obj
    plain, _ = parse_record({"id": "s", "video": "ok.mp4", "conversations": _conv()}, video_dir, 2, "d.json")
    assert plain.num_frames is None and "num_frames" not in plain.to_json(video_dir)
    for bad in (0, -3, "64", True, 2.5):
        record, problems = parse_record({**obj, "num_frames": bad}, video_dir, 1, "d.json")
        assert record is None and len(problems) == 1, (bad, problems)
        assert problems[0].startswith("'num_frames' must be a positive integer") and repr(bad) in problems[0]
    # Through a data file, too.
    f = tmp_path / "d.json"
    f.write_text(json.dumps([obj, {**obj, "id": "s", "num_frames": None}]))
    assert [r.num_frames for r in load_records(f, video_dir)] == [64, None]


def test_collate_rejects_mixed_frame_counts():
    def item(frames):
        return {"input_ids": torch.arange(3), "labels": torch.arange(3), "pixel_values": torch.zeros(3, frames, 8, 8)}

    assert collate([item(4), item(4)], pad_token_id=0)["pixel_values"].shape == (2, 3, 4, 8, 8)
    with pytest.raises(ValueError, match=r"4, 16 frames.*grouped by frame count"):
        collate([item(4), item(16), item(4)], pad_token_id=0)


def test_bad_video_falls_through_within_its_frame_count(tmp_path, video_dir):
    recs = [{"id": "0", "video": "ok.mp4", "conversations": _conv()},
            {"id": "1", "video": "broken.mp4", "num_frames": 6, "conversations": _conv()},
            {"id": "2", "video": "ok.mp4", "conversations": _conv()},
            {"id": "3", "video": "ok.mp4", "num_frames": 6, "conversations": _conv()}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))

    def encode(record):
        frames = read_video(record.video, record.num_frames or 4).frames
        return {"input_ids": torch.tensor([int(record.id)]), "labels": torch.tensor([0]),
                "pixel_values": torch.from_numpy(frames).permute(3, 0, 1, 2).float()}

    ds = InstructDataset(load_records(f, video_dir), encode)
    item = ds[1]  # broken: replaced by record 3 (6 frames), not record 2 (4 frames)
    assert item["input_ids"].tolist() == [3] and item["pixel_values"].shape[1] == 6
    recs[3]["video"] = "broken.mp4"
    f.write_text(json.dumps(recs))
    with pytest.raises(UserError, match="num_frames=6"):
        InstructDataset(load_records(f, video_dir), encode)[1]


def test_text_only_records_have_no_video_and_no_tag(tmp_path, video_dir, capsys):
    from videollm.data.instruct import parse_record

    text = {"id": "t1", "conversations": _conv("What is a noun?", "A word that names a thing.")}
    record, problems = parse_record(text, video_dir, 1, "d.json")
    assert problems == [] and record.video is None
    assert record.to_json(video_dir) == text  # no "video" key written back
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"id": "v", "video": "ok.mp4", "conversations": _conv()}, text]))
    code, out, _ = _check(capsys, f, "--video-root", video_dir, "--decode")
    assert code == 0 and "2 records" in out and "1 videos (decoded), 1 text-only" in out
    records = load_records(f, video_dir)

    def encode(record):
        item = {"input_ids": torch.arange(2 + len(record.id)), "labels": torch.arange(2 + len(record.id))}
        if record.video is not None:
            item["pixel_values"] = torch.zeros(3, 4, 8, 8)
        return item

    ds = InstructDataset(records, encode)
    assert "pixel_values" not in ds[1] and ds.bad_videos == 0


def test_collate_stacks_the_videos_of_a_batch_with_text_only_examples():
    def item(n, frames=None, fill=0.0):
        out = {"input_ids": torch.arange(n), "labels": torch.arange(n)}
        if frames is not None:
            out["pixel_values"] = torch.full((3, frames, 8, 8), fill)
        return out

    batch = collate([item(3), item(5, 4, fill=1.0), item(2), item(4, 4, fill=2.0)], pad_token_id=0)
    assert batch["input_ids"].shape == (4, 5)
    # only the examples with a video, in batch order (the model fills placeholders row by row)
    assert batch["pixel_values"].shape == (2, 3, 4, 8, 8)
    assert batch["pixel_values"][:, 0, 0, 0, 0].tolist() == [1.0, 2.0]
    assert collate([item(3), item(2)], pad_token_id=0)["pixel_values"] is None
