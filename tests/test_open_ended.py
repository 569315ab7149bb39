"""eval.open_ended: the open-ended scorer, the held-out samples and the blind baseline's pairing."""

from eval.open_ended import mismatched_clip, open_correct, open_samples


def test_open_scoring():
    assert open_correct("The moving object moves up-left.", "up-left")
    assert open_correct("It moves up left", "up-left")
    assert open_correct("RED", "red")
    assert not open_correct("It is blue.", "red")
    motions = ("moves up", "moves up-right", "moves left", "stays still")
    assert open_correct("It moves up.", "moves up", motions)
    assert not open_correct("It moves up-right.", "moves up", motions)  # the longer phrase wins
    assert open_correct("It moves up-right.", "moves up-right", motions)
    assert not open_correct("It moves up or left... it moves left", "moves up", motions)
    assert not open_correct("red or blue", "red", ("red", "blue"))
    assert not open_correct("It is reddish.", "red", ("red", "blue"))  # whole words only
    samples = open_samples(1001, 6, 8, 32)
    assert len(samples) == 6 and {s["category"] for s in samples} <= {"color", "shape", "motion"}
    assert open_samples(1001, 6, 8, 32)[0]["answer"] == samples[0]["answer"]  # deterministic


def test_blind_baseline_asks_about_another_clip_of_the_same_task():
    samples = open_samples(1001, 7, 8, 32)
    for i, s in enumerate(samples):
        j = mismatched_clip(i, len(samples))
        assert j is not None and j != i
        assert samples[j]["task"] == s["task"]  # also at the end, where the partner is the previous clip
        assert (samples[j]["frames"] != s["frames"]).any()
    assert [mismatched_clip(i, 3) for i in range(3)] == [None] * 3  # three samples: no second clip of a task
