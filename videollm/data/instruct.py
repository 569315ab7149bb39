"""Video instruction data: load, validate, mix, import, and turn into model batches.

The format is LLaVA-video's, one record per video conversation (a JSON list, or JSONL with one
record per line)::

    {"id": "clip-7", "video": "videos/clip7.mp4", "start": 2.0, "end": 9.5,
     "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                       {"from": "gpt", "value": "A red square moves left."}, ...]}

Rules (`validate_record` enforces them, ``videollm data check`` reports them):

- roles ``human``/``gpt`` (or ``user``/``assistant``); turns alternate and start with the human;
  ``{"role", "content"}`` keys are accepted as well as ``{"from", "value"}``;
- exactly one ``<video>`` tag in the whole conversation, in the first human turn; a record with
  no ``video`` is a text-only conversation and has no tag (text turns mixed into tuning keep the
  LLM's own replies, see `videollm.data.text_replay`);
- every assistant answer is a non-empty string (the loss is computed on these only);
- ``start``/``end`` are optional seconds (``0 <= start < end``);
- ``num_frames`` is an optional positive integer: frames to sample from this video (e.g. 64 for a
  long needle-in-a-haystack clip; default: the training config's ``data.num_frames``);
- ``video`` is resolved against the video root: ``--video-root`` / ``video_root:`` if given, else
  the folder holding the data file.

Record numbers are 1-based. In JSONL files the record number is the line number, so an invalid
line and a bad record are both reported as ``record <line>: …``.

A data mix (YAML) combines files with per-file sampling, deterministic by seed::

    seed: 0
    datasets:
      - {path: captions.jsonl, video_root: /data/videos, sampling: 0.5}   # keep half
      - {path: qa.json, sampling: 3}                                      # three copies
      - {path: mc.json, samples: 1000}                                    # exactly 1000
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from encoder.errors import UserError, VideoReadError
from encoder.files import atomic_write_text
from encoder.video_io import read_video

logger = logging.getLogger(__name__)

VIDEO_TAG = "<video>"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
MIX_SUFFIXES = (".yaml", ".yml")


@dataclass
class Record:
    """One validated conversation about one video, or a text-only one (``video`` None); roles
    normalised to ``human``/``gpt``."""

    id: str
    video: Path | None  # resolved path; None: a text-only conversation
    conversations: list[dict[str, str]]  # [{"from": "human"|"gpt", "value": str}, ...]
    start: float | None = None
    end: float | None = None
    source: str = ""  # "file:record" for error messages
    num_frames: int | None = None  # frames to sample from this video; None: the config's data.num_frames
    # Made-up concepts for a model with a concept stem, {class name: share}, instead of what the frames
    # show (training the reading of class names no real clip shows); None: the frames' own.
    concepts: dict[str, float] | None = None

    def to_json(self, video_root: Path | None = None) -> dict[str, Any]:
        """The record as data-file JSON; its video relative to `video_root` when under it."""
        video = self.video
        if video is not None and video_root is not None and video.is_relative_to(video_root):
            video = video.relative_to(video_root)
        out = {"id": self.id, "video": None if video is None else str(video), "conversations": self.conversations,
               "start": self.start, "end": self.end, "num_frames": self.num_frames, "concepts": self.concepts}
        return {key: value for key, value in out.items() if value is not None}


# --------------------------------------------------------------------------- Reading and validating one file


def read_raw(path: str | Path) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """Parse a JSON list or JSONL file → ``([(record_number, obj)], [(record_number, problem)])``.

    A ``.jsonl`` file, or a file whose text is not one JSON document but starts with ``{``, is
    read line by line (record number = line number; blank lines are skipped). An unparsable JSON
    list is one problem with number 0 naming the line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file '{path}' not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if not text.lstrip().startswith("{"):
                return [], [(0, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}")]
        else:
            data = [data] if isinstance(data, dict) else data  # a dict is a single record
            if not isinstance(data, list):
                return [], [(0, f"expected a JSON list of records, got {type(data).__name__}")]
            return list(enumerate(data, 1)), []
    items, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            problems.append((lineno, f"invalid JSON on line {lineno} (column {err.colno}): {err.msg}"))
    return items, problems


def _turns(conversations: list) -> tuple[list[dict[str, str]] | None, str | None]:
    """Normalise turns to ``{"from", "value"}`` with roles human/gpt; (turns, problem)."""
    out = []
    for i, turn in enumerate(conversations, 1):
        if not isinstance(turn, dict):
            return None, f"turn {i} is not an object"
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role is None:
            return None, f"turn {i} has no 'from' (or 'role') key"
        if role not in HUMAN_ROLES + ASSISTANT_ROLES:
            return None, f"turn {i} has role '{role}'; use one of {', '.join(HUMAN_ROLES + ASSISTANT_ROLES)}"
        if not isinstance(value, str):
            return None, f"turn {i} has no text ('value' or 'content' must be a string)"
        out.append({"from": "human" if role in HUMAN_ROLES else "gpt", "value": value})
    return out, None


def parse_record(obj: Any, video_root: Path, number: int = 0,
                 source: str = "") -> tuple[Record | None, list[str]]:
    """Check one raw record; return ``(Record, [])`` or ``(None, [problems])``. No file access."""
    if not isinstance(obj, dict):
        return None, [f"a record must be a JSON object, got {type(obj).__name__}"]
    problems = []
    video = obj.get("video")
    if video is not None and (not isinstance(video, str) or not video.strip()):
        problems.append(f"'video' must be a path to the video file, got {video!r} (leave it out for a "
                        "text-only conversation)")
    conv = obj.get("conversations")
    turns = None
    if conv is None:
        problems.append("missing 'conversations'")
    elif not isinstance(conv, list) or not conv:
        problems.append("'conversations' must be a non-empty list of turns")
    else:
        turns, problem = _turns(conv)
        if problem:
            problems.append(problem)
    if turns is not None:
        for i, turn in enumerate(turns):
            want = "human" if i % 2 == 0 else "gpt"
            if turn["from"] != want:
                problems.append(f"turn {i + 1} is from '{conv[i].get('from', conv[i].get('role'))}' "
                                f"but turns must alternate human, gpt, human, … starting with the human")
                break
        if len(turns) < 2 or turns[-1]["from"] != "gpt":
            problems.append("the conversation must end with an assistant (gpt) answer")
        for i, turn in enumerate(turns):
            if turn["from"] == "gpt" and not turn["value"].strip():
                problems.append(f"turn {i + 1}: empty answer")
        tags = sum(t["value"].count(VIDEO_TAG) for t in turns)
        if video is None:
            if tags:
                problems.append(f"missing 'video' (a path to the video file): the conversation has a "
                                f"{VIDEO_TAG} tag; give the video, or remove the tag for a text-only record")
        elif tags == 0:
            problems.append(f"no {VIDEO_TAG} tag; put exactly one in the first human turn")
        elif tags > 1:
            problems.append(f"{tags} {VIDEO_TAG} tags; put exactly one, in the first human turn")
        elif VIDEO_TAG not in turns[0]["value"]:
            problems.append(f"the {VIDEO_TAG} tag must be in the first human turn")
    start, end = obj.get("start"), obj.get("end")
    for name, value in (("start", start), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"'{name}' must be a number of seconds, got {value!r}")
    num_frames = obj.get("num_frames")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                   or num_frames < 1):
        problems.append(f"'num_frames' must be a positive integer (frames to sample from this video), "
                        f"got {num_frames!r}")
    concepts = obj.get("concepts")
    if concepts is not None and not (
            isinstance(concepts, dict) and concepts and all(isinstance(k, str) and k for k in concepts)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in concepts.values())
            and sum(concepts.values()) <= 1 + 1e-6):
        problems.append(f"'concepts' must map class names to shares > 0 that sum to at most 1, got {concepts!r}")
    elif concepts is not None and video is None:
        problems.append("'concepts' belong to a video; a text-only record has none")
    if not problems:
        if start is not None and start < 0:
            problems.append(f"'start' must be >= 0, got {start}")
        if start is not None and end is not None and end <= start:
            problems.append(f"'end' ({end}) must be after 'start' ({start})")
    if problems:
        return None, problems
    rid = obj.get("id")
    return Record(
        id=str(rid) if rid is not None else f"{Path(source).stem or 'record'}-{number}",
        video=None if video is None else
        (Path(video_root) / video).resolve() if not Path(video).is_absolute() else Path(video),
        conversations=turns,
        start=float(start) if start is not None else None,
        end=float(end) if end is not None else None,
        source=f"{source}:{number}",
        num_frames=num_frames,
        concepts=None if concepts is None else {k: float(v) for k, v in concepts.items()},
    ), []


def check_video(record: Record, *, decode: bool = False, num_frames: int = 4) -> str | None:
    """None if the record's video is usable (or it has none), else the problem. `decode` actually
    decodes frames."""
    if record.video is None:
        return None
    if not record.video.is_file():
        return f"video file '{record.video}' not found"
    if not decode:
        return None
    try:
        read_video(record.video, num_frames, start=record.start, end=record.end)
    except VideoReadError as err:
        return f"video '{record.video}' cannot be decoded: {err.reason}"
    except UserError as err:  # e.g. start/end past the end of the video
        return f"video '{record.video}': {err}"
    return None


def check_file(path: str | Path, video_root: str | Path | None = None, *, check_files: bool = True,
               decode: bool = False, num_frames: int = 4) -> tuple[list[Record], list[tuple[int, str]]]:
    """Read and validate one data file (see `read_raw`) → ``(good records, [(record_number, problem)])``.

    `check_files` checks each video exists; `decode` also decodes `num_frames` frames of it.
    """
    path = Path(path)
    items, problems = read_raw(path)
    root = Path(video_root) if video_root is not None else path.parent
    records = []
    for number, obj in items:
        record, errs = parse_record(obj, root, number, str(path))
        if record is not None and check_files:
            problem = check_video(record, decode=decode, num_frames=num_frames)
            if problem:
                record, errs = None, [problem]
        problems.extend((number, e) for e in errs)
        if record is not None:
            records.append(record)
    return records, sorted(problems, key=lambda p: p[0])


def load_instruct_file(path: str | Path, video_root: str | Path | None = None, *,
                       check_files: bool = True) -> list[Record]:
    """All records of one file; any bad record is a `UserError` listing the problems."""
    records, problems = check_file(path, video_root, check_files=check_files)
    if problems:
        lines = [f"record {n}: {p}" if n else p for n, p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"… and {len(problems) - 20} more")
        raise UserError(f"'{path}' has {len(problems)} problem(s); run `videollm data check {path}` "
                        "for the full list:\n  " + "\n  ".join(lines))
    if not records:
        raise UserError(f"data file '{path}' holds no records")
    return records


# --------------------------------------------------------------------------- Data mix


@dataclass
class MixEntry:
    path: Path
    video_root: Path | None = None
    sampling: float | None = None  # <1: fraction kept; >=1: repeat factor
    samples: int | None = None  # exact number of records (cycles through a shuffled copy)


@dataclass
class DataMix:
    datasets: list[MixEntry]
    seed: int = 0


def read_mix(path: str | Path) -> DataMix:
    """Parse a data-mix YAML (paths relative to the YAML's folder)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data mix '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"data mix '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise UserError(f"data mix '{path}' must have a non-empty 'datasets:' list "
                        "of {path, video_root?, sampling? | samples?}")
    unknown = sorted(set(data) - {"datasets", "seed"})
    if unknown:
        raise UserError(f"data mix '{path}': unknown key(s) {', '.join(unknown)}; valid: datasets, seed")
    entries = []
    for i, d in enumerate(data["datasets"], 1):
        where = f"data mix '{path}', dataset {i}"
        if not isinstance(d, dict) or "path" not in d:
            raise UserError(f"{where}: each entry needs a 'path'")
        bad = sorted(set(d) - {"path", "video_root", "sampling", "samples"})
        if bad:
            raise UserError(f"{where}: unknown key(s) {', '.join(bad)}; valid: path, video_root, sampling, samples")
        sampling, samples, root = d.get("sampling"), d.get("samples"), d.get("video_root")
        if sampling is not None and samples is not None:
            raise UserError(f"{where}: give 'sampling' or 'samples', not both")
        if sampling is not None and (isinstance(sampling, bool) or not isinstance(sampling, (int, float))
                                     or sampling <= 0):
            raise UserError(f"{where}: 'sampling' must be a number > 0 (a fraction or a repeat factor), "
                            f"got {sampling!r}")
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0):
            raise UserError(f"{where}: 'samples' must be a positive integer, got {samples!r}")
        entries.append(MixEntry(path.parent / d["path"], None if root is None else path.parent / root,
                                None if sampling is None else float(sampling), samples))
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"data mix '{path}': 'seed' must be an integer, got {seed!r}")
    return DataMix(entries, seed)


def sample_records(records: list, *, sampling: float | None = None, samples: int | None = None,
                   seed: int = 0) -> list:
    """Subsample or repeat `records` deterministically.

    ``sampling=0.25`` keeps a random quarter (order preserved); ``sampling=2.5`` keeps two full
    copies plus a random half; ``samples=N`` takes exactly N (whole copies, then a random rest).
    """
    n = len(records)
    if n == 0 or (sampling is None and samples is None):
        return list(records)
    target = samples if samples is not None else round(n * sampling)
    rng = random.Random(seed)
    copies, rest = divmod(target, n)
    keep = sorted(rng.sample(range(n), rest))
    return list(records) * copies + [records[i] for i in keep]


def load_mix(path: str | Path, seed: int | None = None, *, check_files: bool = True) -> list[Record]:
    """All records of a data mix after per-file sampling (`seed` overrides the YAML's)."""
    mix = read_mix(path)
    seed = mix.seed if seed is None else seed
    out: list[Record] = []
    for i, entry in enumerate(mix.datasets):
        records = load_instruct_file(entry.path, entry.video_root, check_files=check_files)
        # A per-file seed: adding a file to the mix leaves the others' samples unchanged.
        out += sample_records(records, sampling=entry.sampling, samples=entry.samples,
                              seed=seed * 1_000_003 + i)
    return out


def load_records(path: str | Path, video_root: str | Path | None = None, *, seed: int | None = None,
                 check_files: bool = True) -> list[Record]:
    """A JSON/JSONL file or a data-mix YAML → records."""
    if Path(path).suffix in MIX_SUFFIXES:
        if video_root is not None:
            raise UserError("a data mix sets video_root per dataset; do not also pass a video root")
        return load_mix(path, seed, check_files=check_files)
    return load_instruct_file(path, video_root, check_files=check_files)


# --------------------------------------------------------------------------- VideoChat2 importer


def videochat2_to_llava(items: list, id_prefix: str = "videochat2") -> list[dict[str, Any]]:
    """VideoChat2's ``[{"video", "QA": [{"i", "q", "a"}, …]}]`` → LLaVA-video records.

    Each QA pair becomes one human/gpt exchange; the first human turn gets the ``<video>`` tag.
    VideoChat2 puts the task instruction in ``i`` (often shared by all pairs) and the question in
    ``q``; they are joined with a newline (either may be empty). ``start``/``end`` are kept.
    """
    if not isinstance(items, list):
        raise UserError(f"a VideoChat2 file holds a JSON list, got {type(items).__name__}")
    out = []
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict) or "video" not in item or not isinstance(item.get("QA"), list):
            raise UserError(f"VideoChat2 record {n}: needs 'video' and a 'QA' list")
        turns = []
        for qa in item["QA"]:
            if not isinstance(qa, dict) or "a" not in qa:
                raise UserError(f"VideoChat2 record {n}: each QA entry needs at least 'a' (the answer)")
            prompt = "\n".join(s.strip() for s in (qa.get("i") or "", qa.get("q") or "") if s.strip())
            if not turns:
                prompt = f"{VIDEO_TAG}\n{prompt}" if prompt else VIDEO_TAG
            turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": str(qa["a"])}]
        record = {"id": str(item.get("id", f"{id_prefix}-{n}")), "video": item["video"], "conversations": turns}
        out.append(record | {key: item[key] for key in ("start", "end") if item.get(key) is not None})
    return out


def import_videochat2(in_path: str | Path, out_path: str | Path) -> int:
    """Convert a VideoChat2 JSON file to a LLaVA-video JSON (or JSONL) file; returns the count."""
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise UserError(f"VideoChat2 file '{in_path}' not found")
    try:
        items = json.loads(in_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"'{in_path}' is not valid JSON (line {err.lineno}): {err.msg}") from None
    records = videochat2_to_llava(items, id_prefix=in_path.stem)
    if out_path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    atomic_write_text(out_path, text)
    return len(records)


# --------------------------------------------------------------------------- Dataset and collate


class InstructDataset(torch.utils.data.Dataset):
    """Records → model inputs through `encode(record)`, which decodes the record's video (start/end
    honoured) and tokenizes its conversation into ``{"input_ids": (L,), "labels": (L,),
    "pixel_values": (3, T, H, W)[, "concept_probs": (T, C)]}`` (no pixel_values for a text-only record; the recipe wraps
    `VideoLLMProcessor` in it).
    A video that fails to decode is logged, counted in ``bad_videos`` and replaced by the next
    good record with the same ``num_frames`` (so a batch grouped by frame count stays grouped);
    more than `max_bad_videos` distinct failures is a `UserError` (a broken data set should stop
    the run, a few corrupt files should not).
    """

    def __init__(self, records: list[Record], encode: Callable[[Record], dict[str, torch.Tensor]],
                 *, max_bad_videos: int = 10):
        if not records:
            raise UserError("the instruction data set is empty")
        self.records, self.encode, self.max_bad_videos = records, encode, max_bad_videos
        self.bad: set[str] = set()

    @property
    def bad_videos(self) -> int:
        return len(self.bad)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.records)
        num_frames = self.records[index % n].num_frames
        for offset in range(n):
            record = self.records[(index + offset) % n]
            if (record.video is not None and str(record.video) in self.bad) or record.num_frames != num_frames:
                continue
            try:
                return self.encode(record)
            except VideoReadError as err:
                self.bad.add(str(record.video))
                logger.warning("skipping record %s (%s): %s [%d bad videos so far]",
                               record.id, record.source, err, len(self.bad))
                if len(self.bad) > self.max_bad_videos:
                    raise UserError(f"more than {self.max_bad_videos} videos failed to decode (last: "
                                    f"{err}); run `videollm data check FILE --decode` to list them, "
                                    f"or raise data.max_bad_videos") from None
        if any(r.num_frames != num_frames for r in self.records):
            group = f"num_frames={num_frames}" if num_frames is not None else "the default num_frames"
            raise UserError(f"no record of the data set with {group} has a decodable video")
        raise UserError("no record of the data set has a decodable video")


def collate(batch: list[dict[str, torch.Tensor]], pad_token_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (with `pad_token_id`), ``labels`` (with -100) and build ``attention_mask``;
    stack the ``pixel_values`` of the examples that have a video → (B_v, 3, T, H, W), in batch
    order (the model fills each row's ``<video>`` placeholders in that order), or None when none
    has. All videos must have the same T (a `ValueError` otherwise: batch records by frame count,
    as `training.finetune.epoch_batches` does). ``concept_probs`` (B_v, T, C) when an example gives
    made-up concepts (a record's ``concepts``); the other videos' rows are NaN (their frames' own)."""
    videos = [torch.as_tensor(b["pixel_values"]) for b in batch if b.get("pixel_values") is not None]
    given = [b.get("concept_probs") for b in batch if b.get("pixel_values") is not None]
    shape = next((g.shape for g in given if g is not None), None)
    concept_probs = None if shape is None else torch.stack(
        [g if g is not None else torch.full(shape, float("nan")) for g in given])
    frames = [v.shape[1] for v in videos]
    if len(set(frames)) > 1:
        raise ValueError(f"a batch mixes videos of {', '.join(map(str, sorted(set(frames))))} frames "
                         f"(per example: {frames}); batches must be grouped by frame count")
    longest = max(len(b["input_ids"]) for b in batch)
    B = len(batch)
    input_ids = torch.full((B, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((B, longest), -100, dtype=torch.long)
    attention_mask = torch.zeros((B, longest), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[i, sl] = torch.as_tensor(b["input_ids"])
        labels[i, sl] = torch.as_tensor(b["labels"])
        attention_mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": torch.stack(videos) if videos else None,
            **({"concept_probs": concept_probs} if concept_probs is not None else {})}


def split_eval(records: list, fraction: float, seed: int, min_eval: int = 1) -> tuple[list, list]:
    """Hold out a deterministic `fraction` of the records (by id, so repeats stay on one side)."""
    if fraction <= 0:
        return list(records), []
    ids = sorted({r.id for r in records})
    n_eval = max(min_eval, math.floor(len(ids) * fraction))
    if n_eval >= len(ids):
        raise UserError(f"data.eval_fraction={fraction} leaves no training records ({len(ids)} distinct ids)")
    held = set(random.Random(seed).sample(ids, n_eval))
    return [r for r in records if r.id not in held], [r for r in records if r.id in held]


def summarize(records: list[Record]) -> dict[str, int]:
    return {
        "records": len(records),
        "turns": sum(len(r.conversations) for r in records),
        "answers": sum(1 for r in records for t in r.conversations if t["from"] == "gpt"),
        "videos": len({str(r.video) for r in records if r.video is not None}),
        "text_only": sum(1 for r in records if r.video is None),
    }
