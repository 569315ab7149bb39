"""Loaders for local copies of multiple-choice video QA benchmarks, in their published layouts.

Each loader returns a list of `MCSample` (option texts without letters, the correct letter, a
video path and the categories results are broken down by). Videos are not opened here; a path
that does not exist is the runner's business (``videollm eval qa`` lists them).

Layouts read (``--data`` is the benchmark's root folder, or the annotation file itself):

=================  ===========================================================================
Video-MME          ``videomme/test-00000-of-00001.parquet`` (lmms-lab/Video-MME: video_id,
                   duration short/medium/long, domain, sub_category, videoID, question_id,
                   task_type, question, options ``["A. …", …]``, answer ``"A"``) — parquet needs
                   pandas or pyarrow — or the same records as a JSON list, or the original nested
                   JSON (one record per video with a ``questions`` list). Videos ``data/<videoID>.mp4``.
MVBench            ``json/<task>.json`` (OpenGVLab/MVBench: video, question, candidates, answer
                   text, optional start/end seconds); videos under ``video/<task's source dir>/``.
EgoSchema          ``questions.json`` (q_uid, question, ``option 0``…``option 4``) and
                   ``subset_answers.json`` (``{q_uid: index}``); only answered questions are used.
                   Videos ``videos/<q_uid>.mp4``.
MLVU               ``json/<n>_<task>.json`` (MLVU dev: video, question, candidates, answer text,
                   question_type); videos ``video/<n>_<task>/<video>``.
LongVideoBench     ``lvb_val.json`` (id, video_id, video_path, question, candidates,
                   correct_choice, duration_group, question_category, level); videos
                   ``videos/<video_path>``.
synthqa            generated on the fly by `videollm.data.synth` (``--seed``, ``--n``); frames in memory.
=================  ===========================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from encoder.errors import UserError
from eval.answer import LETTERS, strip_letter_prefix
from videollm.data.synth import TASKS, make_clip

BENCHMARKS = ("videomme", "mvbench", "egoschema", "mlvu", "longvideobench", "synthqa")

# MVBench json file → folder of its source videos under video/ (from the MVBench release's
# data_list; "frame" tasks are folders of jpg frames instead of video files).
MVBENCH_TASKS: dict[str, str] = {
    "action_sequence": "star/Charades_v1_480",
    "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480",
    "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video",
    "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}


@dataclass
class MCSample:
    """One multiple-choice question about one video.

    options: option texts without letters; answer: the correct letter ("A"…); categories:
    breakdown name → value (e.g. ``{"duration": "short", "task_type": "OCR Problems"}``), the
    first one is the main breakdown. video: a file (or frame folder) path; frames: in-memory
    uint8 (T, H, W, 3) instead (synthetic sets). start/end: seconds of the clip to use.
    """

    id: str
    question: str
    options: list[str]
    answer: str
    categories: dict[str, str] = field(default_factory=dict)
    video: str | None = None
    frames: np.ndarray | None = field(default=None, repr=False)
    start: float | None = None
    end: float | None = None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"annotation file '{path}' does not exist") from None
    except json.JSONDecodeError as err:
        raise UserError(f"'{path}' is not valid JSON: {err}") from None


def _find(root: Path, candidates: list[str], what: str) -> Path:
    """root itself if it is a file, else the first candidate (glob) under it."""
    if root.is_file():
        return root
    if not root.exists():
        raise UserError(f"{what}: '{root}' does not exist")
    for pattern in candidates:
        hits = sorted(root.glob(pattern))
        if hits:
            return hits[0]
    raise UserError(f"{what}: none of {', '.join(candidates)} found under '{root}'")


def _data_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _record_error(where: str, err: Exception) -> UserError:
    return UserError(f"{where}: missing or bad field {err}; is this the benchmark's published layout?")


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise UserError(f"reading '{path}' needs pyarrow or pandas (pip install pyarrow), "
                            "or give the annotations as JSON") from None
        return pd.read_parquet(path).to_dict(orient="records")
    return pq.read_table(path).to_pylist()


def load_videomme(data: str | Path, video_root: str | Path | None = None) -> list[MCSample]:
    path = _find(Path(data), ["videomme/*.parquet", "*.parquet", "videomme/*.json", "*.json"], "Video-MME")
    rows = _read_parquet(path) if path.suffix == ".parquet" else _read_json(path)
    if isinstance(rows, dict):
        rows = rows.get("data") or list(rows.values())
    flat = []
    for row in rows:  # the original release nests questions under each video
        if "questions" in row:
            flat += [{**{k: v for k, v in row.items() if k != "questions"}, **q} for q in row["questions"]]
        else:
            flat.append(row)
    root = Path(video_root) if video_root else _data_dir(Path(data)) / "data"
    samples = []
    for i, row in enumerate(flat):
        where = f"{path} record {i}"
        try:
            options = [strip_letter_prefix(str(o)) for o in row["options"]]
            vid = str(row["videoID"])
            samples.append(MCSample(
                id=str(row.get("question_id") or f"{vid}-{i}"),
                question=str(row["question"]),
                options=options,
                answer=str(row["answer"]).strip().upper()[:1],
                categories={"duration": str(row["duration"]), "task_type": str(row.get("task_type", "")),
                            "domain": str(row.get("domain", ""))},
                video=str(root / f"{vid}.mp4"),
            ))
        except (KeyError, TypeError) as err:
            raise _record_error(where, err) from None
    return samples


def _load_task_files(data, video_root, benchmark: str, what: str, fields) -> list[MCSample]:
    """MVBench / MLVU layout: one JSON per task under ``<root>/json/`` (or the folder or file
    given), videos under ``<root>/video/`` unless `video_root` says otherwise. Records have video,
    question, candidates and the answer's text; ``fields(task, row, videos folder)`` gives the
    `MCSample` fields that differ between the two (video path, categories, …)."""
    data = Path(data)
    if data.is_file():
        files = [data]
    else:
        folder = data / "json" if (data / "json").is_dir() else data
        files = sorted(folder.glob("*.json"))
        if not files:
            raise UserError(f"{benchmark}: no {what} files under '{folder}'")
    base = _data_dir(data)
    root = Path(video_root) if video_root else (base if base.name != "json" else base.parent) / "video"
    samples = []
    for file in files:
        task = file.stem
        for i, row in enumerate(_read_json(file)):
            where = f"{file} record {i}"
            try:
                candidates = [str(c) for c in row["candidates"]]
                question, answer = str(row["question"]), str(row["answer"])
                if answer not in candidates:
                    raise UserError(f"{where}: answer {answer!r} is not one of the candidates {candidates}")
                samples.append(MCSample(id=f"{task}/{i}", question=question, options=candidates,
                                        answer=LETTERS[candidates.index(answer)], **fields(task, row, root)))
            except (KeyError, TypeError) as err:
                raise _record_error(where, err) from None
    return samples


def load_mvbench(data: str | Path, video_root: str | Path | None = None) -> list[MCSample]:
    return _load_task_files(data, video_root, "MVBench", "<task>.json", lambda task, row, root: {
        "categories": {"task": task},
        "video": str(root / MVBENCH_TASKS.get(task, "") / row["video"]),
        "start": row.get("start"),
        "end": row.get("end"),
    })


def load_egoschema(data: str | Path, video_root: str | Path | None = None) -> list[MCSample]:
    questions_path = _find(Path(data), ["questions.json"], "EgoSchema")
    answers_path = questions_path.parent / "subset_answers.json"
    if not answers_path.is_file():
        raise UserError(f"EgoSchema: '{answers_path}' is missing; only the subset with published "
                        "answers (subset_answers.json) can be scored locally")
    answers = _read_json(answers_path)
    root = Path(video_root) if video_root else questions_path.parent / "videos"
    samples = []
    for i, row in enumerate(_read_json(questions_path)):
        where = f"{questions_path} record {i}"
        try:
            uid = str(row["q_uid"])
            if uid not in answers:
                continue
            options = [str(row[f"option {k}"]) for k in range(5)]
            samples.append(MCSample(id=uid, question=str(row["question"]), options=options,
                                    answer=LETTERS[int(answers[uid])], categories={"set": "subset"},
                                    video=str(root / f"{uid}.mp4")))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise _record_error(where, err) from None
    if not samples:
        raise UserError(f"EgoSchema: no question in '{questions_path}' has an answer in '{answers_path}'")
    return samples


def load_mlvu(data: str | Path, video_root: str | Path | None = None) -> list[MCSample]:
    return _load_task_files(data, video_root, "MLVU", "<n>_<task>.json", lambda task, row, root: {
        "categories": {"question_type": str(row.get("question_type") or task.split("_", 1)[-1])},  # 1_plotQA: plotQA
        "video": str(root / task / row["video"]),
    })


def load_longvideobench(data: str | Path, video_root: str | Path | None = None) -> list[MCSample]:
    path = _find(Path(data), ["lvb_val.json", "*.json"], "LongVideoBench")
    root = Path(video_root) if video_root else path.parent / "videos"
    samples = []
    for i, row in enumerate(_read_json(path)):
        where = f"{path} record {i}"
        try:
            if "correct_choice" not in row:
                raise UserError(f"{where}: no correct_choice (the test split has no answers; use lvb_val.json)")
            candidates = [str(c) for c in row["candidates"]]
            samples.append(MCSample(
                id=str(row.get("id") or f"{row['video_id']}-{i}"),
                question=str(row["question"]),
                options=candidates,
                answer=LETTERS[int(row["correct_choice"])],
                categories={"duration_group": str(row.get("duration_group", "")),
                            "question_category": str(row.get("question_category", "")),
                            "level": str(row.get("level", ""))},
                video=str(root / (row.get("video_path") or f"{row['video_id']}.mp4")),
            ))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise _record_error(where, err) from None
    return samples


def load_synthqa(seed: int = 0, n: int = 50, num_frames: int = 16, size: int = 64) -> list[MCSample]:
    """n multiple-choice questions on n synthetic clips, all determined by `seed`.

    Clip seeds come from ``SeedSequence(seed)``, so two seeds give disjoint-looking sets (a
    held-out set is ``--seed 1``); tasks cycle motion / order / count and one MC question per
    clip is drawn. Categories: the question's category (color, motion, order, …) and the task.
    """
    if n < 1:
        raise UserError(f"--n must be >= 1; got {n}")
    clip_seeds = np.random.SeedSequence(int(seed)).generate_state(n)
    rng = np.random.default_rng(int(seed))
    samples = []
    for i, clip_seed in enumerate(clip_seeds):
        task = TASKS[i % len(TASKS)]
        clip = make_clip(int(clip_seed), num_frames, size, task)
        mcs = [q for q in clip.qa if q["type"] == "mc"]
        q = mcs[int(rng.integers(len(mcs)))]
        samples.append(MCSample(id=f"synth-{seed}-{i}", question=q["question"], options=list(q["options"]),
                                answer=q["answer_letter"], categories={"category": q["category"], "task": task},
                                frames=clip.frames))
    return samples


LOADERS = {
    "videomme": load_videomme,
    "mvbench": load_mvbench,
    "egoschema": load_egoschema,
    "mlvu": load_mlvu,
    "longvideobench": load_longvideobench,
}


def load_benchmark(name: str, data: str | Path | None = None, video_root: str | Path | None = None, *,
                   seed: int = 0, n: int = 50) -> list[MCSample]:
    """Samples of benchmark `name` (one of `BENCHMARKS`); `data` is required except for synthqa."""
    if name == "synthqa":
        return load_synthqa(seed=seed, n=n)
    if name not in LOADERS:
        raise UserError(f"unknown benchmark '{name}'; choose one of: {', '.join(BENCHMARKS)}")
    if data is None:
        raise UserError(f"--benchmark {name} needs --data (the benchmark's local folder or annotation file)")
    return LOADERS[name](data, video_root)
