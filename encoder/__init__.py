"""VideoMAP encoder: selective scan, video I/O, the hybrid Mamba-Transformer backbone, ViT baseline.

The ground layer of the project: it imports nothing from `videollm`, `training`, `eval` or `demo`.
Heavy submodules (torch) load on first attribute access so that the CLI's ``--help`` stays instant.
"""

import importlib

from encoder.errors import UserError, VideoReadError

_LAZY = {
    "selective_scan": "encoder.scan",
    "selective_scan_ref": "encoder.scan",
    "VideoMAPConfig": "encoder.videomap",
    "VideoMAPModel": "encoder.videomap",
    "ViTVideoConfig": "encoder.vit",
    "ViTVideoModel": "encoder.vit",
    "read_video": "encoder.video_io",
    "probe_video": "encoder.video_io",
    "sample_clip_path": "encoder.video_io",
}

__all__ = ["UserError", "VideoReadError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'encoder' has no attribute {name!r}")
