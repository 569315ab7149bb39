"""Synthetic videos: determinism, rendered truth = recorded truth, time-dependence of the labels,
QA well-formedness, needles, the mp4 dataset writer and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from encoder.errors import UserError
from encoder.video_io import read_video
from videollm.data import synth
from videollm.data.synth import (
    COLORS,
    DIRECTIONS,
    NUM_CLASSES,
    SHAPES,
    TASKS,
    SynthObject,
    SynthSpec,
    SynthVideoDataset,
    make_clip,
    make_needle,
    render,
    resize_frames,
    sample_spec,
    short_conversations,
    write_synth_dataset,
)
from eval.answer import extract_letter
from videollm.data.instruct import check_file
from videollm.data.prompts import format_mc
from videollm.data.synth_cli import main as synth_main


def color_mask(frame: np.ndarray, color: str, tol: int = 12) -> np.ndarray:
    """(H, W) bool: pixels within `tol` of the named colour in every channel."""
    return (np.abs(frame.astype(np.int16) - np.array(COLORS[color])) <= tol).all(axis=-1)


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


# ---------------------------------------------------------------------------------------------
# Determinism and labels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_clip_other_seed_differs(task):
    a, b, c = make_clip(7, task=task), make_clip(7, task=task), make_clip(8, task=task)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (16, 64, 64, 3)
    assert np.array_equal(a.frames, b.frames)
    assert (a.label, a.label_name, a.caption, a.qa, a.spec) == (b.label, b.label_name, b.caption, b.qa, b.spec)
    assert not np.array_equal(a.frames, c.frames)
    assert 0 <= a.label < NUM_CLASSES[task]
    assert a.label_name == synth.CLASS_NAMES[task][a.label]


def test_labels_cover_every_class():
    for task in ("motion", "order"):
        labels = {make_clip(s, task=task).label for s in range(60)}
        assert labels == set(range(NUM_CLASSES[task])), task


def test_motion_label_matches_rendered_motion():
    for k, direction in enumerate(DIRECTIONS):
        clip = make_clip(100 + k, task="motion", label=k, distractors=2)
        main = clip.spec.objects[0]
        assert (clip.label, clip.label_name, main.motion) == (k, direction, direction)
        first, last = color_mask(clip.frames[0], main.color), color_mask(clip.frames[-1], main.color)
        assert first.sum() > 10 and abs(int(first.sum()) - int(last.sum())) <= 0.2 * first.sum()
        moved = centroid(last) - centroid(first)  # (dx, dy), y down
        unit = np.array(synth._DIRECTION_VECTORS[direction])
        assert moved @ unit > 0.15 * 64, (direction, moved)  # travelled along the label …
        assert abs(moved[0] * unit[1] - moved[1] * unit[0]) < 2.0, (direction, moved)  # … and only along it


@pytest.mark.parametrize("task", ["motion", "order"])
def test_first_frame_carries_no_label(task):
    """Forcing another class changes the clip but not frame 0: one frame cannot solve the task."""
    for seed in (0, 1, 2):
        clips = [make_clip(seed, task=task, label=k) for k in range(NUM_CLASSES[task])]
        assert [c.label for c in clips] == list(range(NUM_CLASSES[task]))
        for other in clips[1:]:
            assert np.array_equal(other.frames[0], clips[0].frames[0])
            assert not np.array_equal(other.frames, clips[0].frames)


def test_order_task_frames_as_a_set_carry_no_label():
    """Equal-length events: both classes show the same multiset of frames, only the order differs
    (a frame-averaging model is at chance)."""
    for seed in range(4):
        a, b = (make_clip(seed, task="order", label=k) for k in (0, 1))
        assert sorted(f.tobytes() for f in a.frames) == sorted(f.tobytes() for f in b.frames)


def test_order_label_matches_rendered_events():
    for seed in range(6):
        clip = make_clip(seed, task="order")
        left, right = sorted(clip.spec.objects, key=lambda o: o.x)
        changed = []
        for obj in (left, right):  # first frame whose look differs from frame 0 in obj's half
            half = slice(0, 32) if obj is left else slice(32, 64)
            diff = np.abs(clip.frames[:, :, half].astype(int) - clip.frames[0, :, half]).max(axis=(1, 2, 3))
            changed.append(int(np.argmax(diff > 40)))
        assert changed == [synth.event_frame(left), synth.event_frame(right)]
        assert clip.label == (0 if changed[0] < changed[1] else 1)


def test_bad_arguments_raise_user_error():
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="unknown synthetic task"):
        sample_spec(rng, 16, 64, task="colour")
    with pytest.raises(UserError, match="at least 8 frames"):
        sample_spec(rng, 4, 64, task="order")
    with pytest.raises(UserError, match="label"):
        make_clip(0, task="motion", label=8)
    with pytest.raises(UserError, match="distractors"):
        make_clip(0, task="order", distractors=1)
    with pytest.raises(UserError, match="size"):
        make_clip(0, size=8)


# ---------------------------------------------------------------------------------------------
# Rendering of events and motions
# ---------------------------------------------------------------------------------------------


def test_appear_disappear_and_colour_change_at_recorded_frames():
    pop = SynthObject("circle", "red", "large", 16, 20, appear=3, disappear=7)
    flash = SynthObject("square", "blue", "large", 46, 40, color_changes=[(5, "yellow"), (9, "blue")])
    frames = render(SynthSpec(12, 64, "gray", [pop, flash]))
    red = [int(color_mask(f, "red").sum()) for f in frames]
    assert [n > 20 for n in red] == [3 <= t < 7 for t in range(12)]
    yellow = [int(color_mask(f, "yellow").sum()) for f in frames]
    blue = [int(color_mask(f, "blue").sum()) for f in frames]
    assert [n > 20 for n in yellow] == [5 <= t < 9 for t in range(12)]
    assert [n > 20 for n in blue] == [not 5 <= t < 9 for t in range(12)]
    assert pop.visible(3) and not pop.visible(7) and flash.color_at(8) == "yellow"


def test_grow_shrink_bounce_render_as_named():
    objs = {m: SynthObject("circle", c, "small", 32, 44, motion=m, speed=1.0)
            for m, c in (("grow", "red"), ("shrink", "green"), ("bounce", "blue"))}
    for motion, obj in objs.items():
        frames = render(SynthSpec(9, 64, "black", [obj]))
        areas = [int(color_mask(f, obj.color).sum()) for f in frames]
        ys = [centroid(color_mask(f, obj.color))[1] for f in frames]
        if motion == "grow":
            assert areas[-1] > 2 * areas[0]
        elif motion == "shrink":
            assert areas[-1] < 0.5 * areas[0]
        else:  # up and down again, twice: highest at 1/4 and 3/4 of the clip, back at the ends
            assert ys[2] < ys[0] - 6 and ys[6] < ys[0] - 6 and abs(ys[4] - ys[0]) < 1 and abs(ys[8] - ys[0]) < 1


def test_every_shape_and_background_renders_distinctly():
    masks = []
    for shape in SHAPES:
        frame = render(SynthSpec(1, 64, "black", [SynthObject(shape, "white", "large", 32, 32)]))[0]
        mask = color_mask(frame, "white", tol=40)
        ys, xs = np.nonzero(mask)
        assert mask.sum() > 80 and abs(xs.mean() - 32) < 2 and abs(ys.mean() - 32) < 3, shape
        masks.append(mask)
    for i in range(len(masks)):
        for j in range(i):
            assert (masks[i] ^ masks[j]).sum() > 20, (SHAPES[i], SHAPES[j])
    backgrounds = [render(SynthSpec(1, 32, bg, [], bg_seed=1))[0] for bg in synth.BACKGROUNDS]
    assert len({b.tobytes() for b in backgrounds}) == len(backgrounds)


def test_long_clip_renders():
    clip = make_clip(3, num_frames=256, size=32, task="count")
    assert clip.frames.shape == (256, 32, 32, 3)


# ---------------------------------------------------------------------------------------------
# Captions and QA
# ---------------------------------------------------------------------------------------------


def all_qa():
    clips = [make_clip(s, task=t) for t in TASKS for s in range(12)] + [make_needle(s) for s in range(4)]
    return [(clip, item) for clip in clips for item in clip.qa]


def test_multiple_choice_items_are_well_formed():
    items = all_qa()
    assert {item["category"] for _, item in items} == {"color", "shape", "motion", "count", "order",
                                                       "event", "needle"}
    letters = set()
    for _, item in items:
        assert item["type"] in ("open", "mc") and item["question"] and item["answer"]
        if item["type"] == "open":
            assert "options" not in item
            continue
        opts = item["options"]
        assert len(opts) == 4 and len(set(opts)) == 4, item
        assert opts.count(item["answer"]) == 1
        assert opts["ABCD".index(item["answer_letter"])] == item["answer"]
        letters.add(item["answer_letter"])
    assert letters == set("ABCD")  # shuffled, not always in one slot


def test_answers_match_the_spec():
    for s in range(10):
        clip = make_clip(s, task="motion")
        main = clip.spec.objects[0]
        answers = {(q["category"], q["type"]): q["answer"] for q in clip.qa}
        assert answers[("color", "open")] == main.color and answers[("shape", "open")] == main.shape
        assert answers[("motion", "open")] == clip.label_name
        assert answers[("count", "open")] == str(len(clip.spec.objects))
        assert clip.caption.startswith(f"A {main.size} {main.color} {main.shape} moves {main.motion} on a ")
        order = make_clip(s, task="order")
        question = next(q for q in order.qa if q["category"] == "order")
        left, right = sorted(order.spec.objects, key=lambda o: o.x)
        assert question["answer"] == (left if order.label == 0 else right).name()


def test_caption_names_timed_events():
    obj = SynthObject("star", "cyan", "small", 20, 20, motion="right", speed=1.0, appear=4,
                      color_changes=[(8, "orange")])
    spec = SynthSpec(16, 64, "gray", [SynthObject("circle", "red", "large", 40, 40), obj])
    caption = synth.caption_of(spec, fps=8.0)
    assert caption == ("A large red circle stays still on a gray background; a small cyan star appears "
                       "at 0.5 s, moves right and turns orange at 1.0 s.")
    qa = synth.qa_of(spec, np.random.default_rng(0))
    questions = {q["question"]: q["answer"] for q in qa}
    assert questions["When does the cyan star appear?"] == "at 0.5 s"
    assert questions["What colour does the cyan star turn into?"] == "orange"
    order = [q for q in qa if q["category"] == "order"]
    assert len(order) == 2 and all(q["answer"] == "the red circle" for q in order)
    assert "Which appears first" in order[0]["question"] and "the cyan star" in order[0]["question"]


# ---------------------------------------------------------------------------------------------
# Needles
# ---------------------------------------------------------------------------------------------


def test_needle_clip_and_question():
    needle = make_needle(5, num_frames=3, size=48)
    assert needle.frames.shape == (3, 48, 48, 3)
    shape = needle.spec.objects[0].shape
    mc = [q for q in needle.qa if q["type"] == "mc" and "shape" in q["question"]]
    assert mc and mc[0]["category"] == "needle" and mc[0]["answer"] == shape == needle.label_name
    assert np.array_equal(make_needle(5, 3, 48).frames, needle.frames)


def test_resize_frames_keeps_flat_colours_and_shapes():
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    frames[:, :, 4:] = (200, 10, 30)
    out = resize_frames(frames, 16, 24)
    assert out.shape == (2, 16, 24, 3)
    assert (out[:, :, :10] == 0).all() and (out[:, :, 14:] == (200, 10, 30)).all()


# ---------------------------------------------------------------------------------------------
# Dataset, writer, CLI
# ---------------------------------------------------------------------------------------------


def test_dataset_streams_clips_on_the_fly():
    ds = SynthVideoDataset(5, base_seed=40, num_frames=8, size=32, task="motion")
    item = ds[3]
    ref = make_clip(43, 8, 32, "motion")
    assert len(ds) == 5 and item["seed"] == 43 and item["label"] == ref.label
    assert np.array_equal(item["frames"], ref.frames)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["frames"].shape == (2, 8, 32, 32, 3) and batch["frames"].dtype == torch.uint8
    with pytest.raises(IndexError):
        ds[5]


def check_dataset_dir(out, n, task):
    lines = (out / "index.csv").read_text().splitlines()
    annotations = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    instruct = json.loads((out / "instruct.json").read_text())
    assert len(lines) == len(annotations) == n and len(instruct) == 3 * n
    for k, (line, ann) in enumerate(zip(lines, annotations)):
        path, label = line.split(",")
        assert (out / path).is_file() and path == ann["video"] == f"videos/{k:06d}.mp4"
        assert int(label) == ann["label"] and 0 <= ann["label"] < NUM_CLASSES[task]
        assert ann["caption"] and ann["qa"]
        records = {rec["id"]: rec for rec in instruct if rec["video"] == path}
        assert sorted(records) == sorted(f"{ann['id']}_{kind}" for kind in ("caption", "open", "mc"))
        prompts = {}
        for rec in records.values():
            conv = rec["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
            assert conv[0]["value"].startswith("<video>\n")
            assert sum(t["value"].count("<video>") for t in conv) == 1
            prompts.update({t["value"].removeprefix("<video>\n"): conv[i + 1]["value"]
                            for i, t in enumerate(conv) if t["from"] == "human"})
        assert records[f"{ann['id']}_caption"]["conversations"][1]["value"] == ann["caption"]
        for q in ann["qa"]:
            if q["type"] == "mc":
                assert prompts[format_mc(q["question"], q["options"])] == q["answer_letter"]
            else:
                assert prompts[q["question"]] == q["answer"]
    return annotations


def test_write_synth_dataset_reads_back(tmp_path):
    summary = write_synth_dataset(tmp_path, n=3, seed=11, num_frames=16, size=64, task="motion", fps=8)
    assert summary["n"] == 3 and summary["files"]["index"] == "index.csv"
    annotations = check_dataset_dir(tmp_path, 3, "motion")
    clip = make_clip(11, 16, 64, "motion")
    video = read_video(tmp_path / annotations[0]["video"], 16)
    assert video.frames.shape == (16, 64, 64, 3) and video.info.num_frames == 16
    assert abs(video.info.fps - 8.0) < 1e-6
    err = np.abs(video.frames.astype(int) - clip.frames.astype(int))
    assert err.mean() < 6
    main = clip.spec.objects[0]  # the main object's colour survives compression at its centre
    cx, cy = int(round(main.x)), int(round(main.y))
    assert np.abs(video.frames[0, cy, cx].astype(int) - COLORS[main.color]).max() < 40
    assert annotations[0]["spec"]["objects"][0]["motion"] == clip.label_name
    # the instruction-data validator that fine-tuning runs accepts every record
    records, problems = check_file(tmp_path / "instruct.json")
    assert problems == [] and len(records) == 9


def test_cli_writes_and_rejects_bad_arguments(tmp_path, capsys):
    out = tmp_path / "synth"
    assert synth_main(["--out", str(out), "--n", "2", "--frames", "8", "--size", "32", "--task", "order"]) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["n"] == 2 and summary["out"] == str(out) and summary["files"]["instruct"] == "instruct.json"
    check_dataset_dir(out, 2, "order")
    with pytest.raises(UserError, match="not empty"):
        synth_main(["--out", str(out), "--n", "2"])
    with pytest.raises(UserError, match="--n"):
        synth_main(["--out", str(tmp_path / "other"), "--n", "0"])
    with pytest.raises(UserError, match="frames"):
        synth_main(["--out", str(out), "--overwrite", "--frames", "1"])
    assert (out / "index.csv").is_file()  # a rejected run does not delete the old dataset
    assert synth_main(["--out", str(out), "--overwrite", "--n", "1", "--frames", "8", "--size", "32"]) == 0
    check_dataset_dir(out, 1, "motion")
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["000000.mp4"]


# ---------------------------------------------------------------------------------------------
# The "short" record layout
# ---------------------------------------------------------------------------------------------


def test_short_records_ask_each_question_once():
    clip = make_clip(3, 16, 64, "count")
    groups = short_conversations(clip.caption, clip.qa, np.random.default_rng(0), qa_turns=2, caption_fraction=1.0)
    assert groups["caption"][1]["value"] == clip.caption
    questions = []
    for name, turns in groups.items():
        assert turns[0]["value"].startswith("<video>\n") and sum("<video>" in t["value"] for t in turns) == 1
        assert len(turns) <= 2 * 2 and [t["from"] for t in turns[:2]] == ["human", "gpt"]
        if name != "caption":
            questions += [t["value"].replace("<video>\n", "").split("\n")[0] for t in turns[::2]]
    assert len(questions) == len(set(questions))  # the open and MC forms never share a record
    assert not any(q.startswith("When ") for q in questions)
    expected = {q["question"] for q in clip.qa if not q["question"].startswith("When ")}
    assert set(questions) == expected


@pytest.mark.parametrize("mc_reply", ["letter", "option"])
def test_short_records_answer_multiple_choice_as_configured(mc_reply):
    clip = make_clip(3, 16, 64, "count")
    by_prompt = {q["question"]: q for q in clip.qa if q["type"] == "mc"}
    groups = short_conversations(clip.caption, clip.qa, np.random.default_rng(1), qa_turns=2, mc_reply=mc_reply)
    replies = 0
    for turns in groups.values():
        for human, gpt in zip(turns[::2], turns[1::2]):
            lines = human["value"].replace("<video>\n", "").split("\n")
            if len(lines) == 1:
                continue  # an open question
            q = by_prompt[lines[0]]
            expected = q["answer_letter"] if mc_reply == "letter" else q["answer"]
            assert gpt["value"] == expected
            assert extract_letter(gpt["value"], q["options"]) == q["answer_letter"]
            replies += 1
    assert replies > 0
