"""Benchmark loaders on small fixtures in each benchmark's published annotation layout."""

import json
from pathlib import Path

import numpy as np
import pytest

from encoder.errors import UserError
from eval.benchmarks import load_benchmark, load_synthqa, load_videomme

FIX = Path(__file__).parent / "fixtures"


def test_videomme_json_strips_letters_and_keeps_duration():
    samples = load_benchmark("videomme", FIX / "videomme")
    assert [s.id for s in samples] == ["001-1", "001-2", "301-1", "601-1"]
    first = samples[0]
    assert first.options == ["Apples.", "Candles.", "Berries.", "The three kinds are of the same number."]
    assert first.answer == "C"
    assert first.categories["duration"] == "short" and first.categories["task_type"] == "Counting Problem"
    assert first.video == str(FIX / "videomme" / "data" / "fFjv93ACGo8.mp4")
    assert [s.categories["duration"] for s in samples] == ["short", "short", "medium", "long"]


def test_videomme_nested_layout_and_video_root(tmp_path):
    samples = load_videomme(FIX / "videomme" / "videomme_nested.json", video_root=tmp_path)
    assert [s.id for s in samples] == ["001-1", "001-2"]
    assert samples[1].answer == "A" and samples[1].categories["task_type"] == "Information Synopsis"
    assert samples[0].video == str(tmp_path / "fFjv93ACGo8.mp4")


def test_videomme_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = json.loads((FIX / "videomme" / "videomme" / "test.json").read_text())
    (tmp_path / "videomme").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "videomme" / "test-00000-of-00001.parquet")
    samples = load_benchmark("videomme", tmp_path)
    assert [s.answer for s in samples] == ["C", "A", "B", "D"]
    assert samples[2].options[1] == "He passes."


def test_mvbench_answer_text_to_letter_and_task_video_dirs():
    samples = load_benchmark("mvbench", FIX / "mvbench")
    by_id = {s.id: s for s in samples}
    assert set(by_id) == {"action_sequence/0", "action_sequence/1", "moving_direction/0"}
    s = by_id["action_sequence/1"]
    assert s.answer == "B" and len(s.options) == 3 and (s.start, s.end) == (3.0, 9.5)
    assert s.video == str(FIX / "mvbench" / "video" / "star/Charades_v1_480" / "9Q3AC.mp4")
    assert by_id["moving_direction/0"].answer == "C"
    assert by_id["moving_direction/0"].categories == {"task": "moving_direction"}


def test_egoschema_keeps_only_answered_questions():
    samples = load_benchmark("egoschema", FIX / "egoschema")
    assert [s.answer for s in samples] == ["D", "C"]
    assert len(samples[0].options) == 5 and samples[0].options[3] == "C is cleaning dishes."
    assert samples[0].video.endswith("videos/001934bb-81bd-4cd8-a574-0472ef3f6678.mp4")


def test_mlvu_question_type_and_video_dir():
    samples = load_benchmark("mlvu", FIX / "mlvu")
    assert [s.answer for s in samples] == ["A", "C", "A"]
    assert [s.categories["question_type"] for s in samples] == ["plotQA", "count", "count"]
    assert samples[1].video == str(FIX / "mlvu" / "video" / "4_count" / "count_1.mp4")


def test_longvideobench_correct_choice_and_categories():
    samples = load_benchmark("longvideobench", FIX / "longvideobench")
    assert [s.answer for s in samples] == ["B", "E"]
    assert samples[1].categories["duration_group"] == "15"
    assert samples[0].categories["question_category"] == "TOS"
    assert samples[0].video == str(FIX / "longvideobench" / "videos" / "86CxyhFV9MI.mp4")


def test_bad_records_and_paths_name_the_file(tmp_path):
    bad = tmp_path / "json"
    bad.mkdir()
    (bad / "action_count.json").write_text(json.dumps([{"video": "a.mp4", "question": "q",
                                                        "candidates": ["x", "y"], "answer": "z"}]))
    with pytest.raises(UserError, match="action_count.json record 0"):
        load_benchmark("mvbench", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_benchmark("longvideobench", tmp_path / "nope")
    with pytest.raises(UserError, match="needs --data"):
        load_benchmark("mlvu", None)
    with pytest.raises(UserError, match="unknown benchmark"):
        load_benchmark("kinetics", FIX)


def test_synthqa_deterministic_and_seed_dependent():
    a = load_synthqa(seed=0, n=4)
    b = load_synthqa(seed=0, n=4)
    c = load_synthqa(seed=1, n=4)
    assert [s.question for s in a] == [s.question for s in b]
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    assert not any(np.array_equal(x.frames, y.frames) for x, y in zip(a, c))
    for s in a:
        assert s.answer in "ABCD" and len(s.options) == 4 and s.frames.dtype == np.uint8
        assert s.categories["task"] in ("motion", "order", "count")
