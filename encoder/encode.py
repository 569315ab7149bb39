"""``videollm encode VIDEO``: run a VideoMAP or ViT encoder on a video; print shapes and timings.

    videollm encode bigbuckbunny --preset nano --frames 16
    videollm encode clip.mp4 --encoder vit-frame --preset tiny --size 224
    videollm encode clip.mp4 --checkpoint runs/pretrain/final

Prints one JSON line: encoder, preset, checkpoint, params, frames, input/output/pooled shapes,
token grid and seconds spent decoding and encoding. Without ``--checkpoint`` the encoder is
randomly initialised (seed 0) at the requested size — a shape/speed check, not features.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from encoder.errors import UserError, run_cli
from encoder.transforms import frames_to_tensor
from encoder.video_io import read_video, resolve_video
from encoder.videomap import VideoMAPConfig, VideoMAPModel
from encoder.vit import ViTVideoConfig, ViTVideoModel

ENCODERS = ("videomap", "vit", "vit-frame")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videollm encode", description=__doc__.split("\n\n")[0])
    p.add_argument("video", help="video file, or a bundled clip name (bigbuckbunny, bikes, …)")
    p.add_argument("--encoder", choices=ENCODERS, default="videomap",
                   help="videomap, vit (joint space-time attention) or vit-frame (per-frame attention)")
    p.add_argument("--preset", default="nano",
                   help="size preset: nano, tiny, small, middle (VideoMAP only), base (default: nano)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled uniformly (default: 16)")
    p.add_argument("--size", type=int, default=224, help="frame side after resize + centre crop (default: 224)")
    p.add_argument("--checkpoint", help="directory written by save_pretrained (overrides --preset)")
    return p


def _build(encoder: str, preset: str, frames: int, size: int, checkpoint: str | None):
    """The encoder model (eval mode) and its patch size."""
    if encoder == "videomap":
        model_cls, config_cls, extra = VideoMAPModel, VideoMAPConfig, {}
    else:
        model_cls, config_cls, extra = ViTVideoModel, ViTVideoConfig, {
            "attention": "frame" if encoder == "vit-frame" else "joint"}

    if checkpoint is not None:
        config_file = Path(checkpoint) / "config.json"
        if not config_file.is_file():
            raise UserError(f"checkpoint '{checkpoint}' has no config.json; "
                            "pass a directory written by save_pretrained")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != config_cls.model_type:
            want = {"videomap": "videomap", "vit_video": "vit or vit-frame"}.get(model_type, "another tool")
            raise UserError(f"checkpoint '{checkpoint}' holds a '{model_type}' model, not "
                            f"'{config_cls.model_type}'; use --encoder {want}")
        # The per-frame and joint ViT share weights; `attention` only changes how they are applied.
        model = model_cls.from_pretrained(checkpoint, **extra)
    else:
        import torch

        try:
            patch = config_cls.from_preset(preset).patch_size
        except ValueError as err:  # unknown preset for this encoder
            raise UserError(str(err)) from None
        if size % patch:
            raise UserError(f"--size {size} is not a multiple of the patch size {patch}; "
                            f"try {max(patch, round(size / patch) * patch)}")
        config = config_cls.from_preset(preset, img_size=size, num_frames=frames, **extra)
        torch.manual_seed(0)
        model = model_cls(config)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.frames < 1:
        raise UserError(f"--frames must be >= 1; got {args.frames}")
    if args.size < 1:
        raise UserError(f"--size must be >= 1; got {args.size}")

    t0 = time.perf_counter()
    clip = read_video(resolve_video(args.video), args.frames)  # a bad path fails before any model is built
    pixel_values = frames_to_tensor(clip.frames, size=args.size).unsqueeze(0)  # (1, 3, T, S, S)
    t1 = time.perf_counter()

    model = _build(args.encoder, args.preset, args.frames, args.size, args.checkpoint)
    patch = model.config.patch_size
    if args.size % patch:  # a checkpoint with another patch size
        raise UserError(f"--size {args.size} is not a multiple of the patch size {patch}; "
                        f"try {max(patch, round(args.size / patch) * patch)}")

    t2 = time.perf_counter()
    with torch.no_grad():
        out = model(pixel_values)
    t3 = time.perf_counter()

    print(json.dumps({
        "encoder": args.encoder,
        "preset": None if args.checkpoint else args.preset,
        "checkpoint": args.checkpoint,
        "video": str(clip.info.path),
        "params": sum(p.numel() for p in model.parameters()),
        "frames": int(pixel_values.shape[2]),
        "input_shape": list(pixel_values.shape),
        "output_shape": list(out.last_hidden_state.shape),
        "pooled_shape": list(out.pooler_output.shape),
        "grid": list(out.grid),
        "seconds": {"decode": round(t1 - t0, 4), "encode": round(t3 - t2, 4)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
