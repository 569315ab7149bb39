"""VideoMAP backbone: presets, block layout, token layout and masking, the bidirectional mixer,
position-table interpolation, checkpoints, gradient checkpointing, stochastic depth.

Sizes are tiny (32–64 px frames, a few frames, width 16) because the selective scan may be the
sequential reference loop; one test runs the real `nano` preset on a 16-frame 112-px clip.
"""

import math

import pytest
import torch

from encoder.layers import (
    AttentionBlock,
    DropPath,
    apply_token_mask,
    interpolate_spatial_pos,
    interpolate_temporal_pos,
)
from encoder.videomap import (
    PRESET_PARAMS,
    PRESETS,
    BiMambaMixer,
    MambaBlock,
    VideoMAPConfig,
    VideoMAPModel,
)
from encoder.scan import causal_conv1d


def tiny_config(**overrides) -> VideoMAPConfig:
    kw = dict(img_size=32, patch_size=16, num_frames=2, embed_dim=16, depth_mamba=2, attn_every=2,
              num_heads=2, d_state=4)
    return VideoMAPConfig(**{**kw, **overrides})


def tiny_model(**overrides) -> VideoMAPModel:
    torch.manual_seed(0)
    return VideoMAPModel(tiny_config(**overrides)).eval()


# --------------------------------------------------------------------------- config and presets


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_its_documented_parameter_count(name):
    with torch.device("meta"):  # shapes only: building `base` for real takes seconds
        model = VideoMAPModel(VideoMAPConfig.from_preset(name))
    n = sum(p.numel() for p in model.parameters())
    assert n == PRESET_PARAMS[name]


def test_preset_widths_and_depths_follow_the_design():
    expect = {"nano": (128, 8, 2), "tiny": (192, 24, 6), "small": (384, 24, 6), "middle": (576, 32, 8),
              "base": (768, 24, 6)}
    for name, (dim, n_mamba, n_attn) in expect.items():
        cfg = VideoMAPConfig.from_preset(name)
        assert (cfg.embed_dim, cfg.block_types.count("mamba"), cfg.block_types.count("attn")) == (dim, n_mamba, n_attn)
    assert VideoMAPConfig.from_preset("nano", img_size=112).img_size == 112  # overrides apply
    with pytest.raises(ValueError, match="unknown VideoMAP preset"):
        VideoMAPConfig.from_preset("huge")


def test_attn_every_4_puts_one_attention_block_after_every_four_mamba_blocks():
    model = VideoMAPModel(tiny_config(depth_mamba=8, attn_every=4))
    kinds = ["A" if isinstance(b, AttentionBlock) else "M" for b in model.blocks]
    assert "".join(kinds) == "MMMMAMMMMA"
    assert all(isinstance(b, (MambaBlock, AttentionBlock)) for b in model.blocks)


def test_attn_every_0_is_pure_mamba_and_1_is_pure_attention():
    pure_mamba = VideoMAPModel(tiny_config(depth_mamba=3, attn_every=0))
    assert len(pure_mamba.blocks) == 3 and all(isinstance(b, MambaBlock) for b in pure_mamba.blocks)
    pure_attn = VideoMAPModel(tiny_config(depth_mamba=3, attn_every=1))
    assert len(pure_attn.blocks) == 3 and all(isinstance(b, AttentionBlock) for b in pure_attn.blocks)
    # A remainder of Mamba blocks closes the stack.
    assert VideoMAPConfig(depth_mamba=5, attn_every=2).block_types == ["mamba", "mamba", "attn"] * 2 + ["mamba"]


@pytest.mark.parametrize("bad, match", [
    (dict(pool="max"), "pool"),
    (dict(img_size=40), "multiple of patch_size"),
    (dict(embed_dim=18, num_heads=4), "divisible by num_heads"),
    (dict(attn_every=-1), "attn_every"),
    (dict(depth_mamba=0), "depth_mamba"),
    (dict(dt_rank="big"), "dt_rank"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
    (dict(patch_stem="resnet"), "patch_stem"),
    (dict(lean_backward="yes"), "lean_backward"),
    (dict(patch_stem="conv", patch_size=12, img_size=48), "power of two"),
])
def test_config_rejects_bad_values_with_a_clear_message(bad, match):
    with pytest.raises(ValueError, match=match):
        VideoMAPConfig(**bad)


def test_dt_rank_auto_is_ceil_of_width_over_16():
    assert VideoMAPConfig(embed_dim=200).resolved_dt_rank == math.ceil(200 / 16)
    assert VideoMAPConfig(dt_rank=3).resolved_dt_rank == 3


# --------------------------------------------------------------------------- forward, tokens


def test_forward_shapes_grid_and_pooling():
    model = tiny_model()
    x = torch.randn(2, 3, 3, 32, 48)  # non-square and not the table's size
    out = model(x)
    assert out.grid == (3, 2, 3)
    assert out.last_hidden_state.shape == (2, 1 + 3 * 6, 16)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    mean_model = tiny_model(pool="mean")
    out = mean_model(x)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 1:].mean(1))


def test_conv_stem_gives_the_linear_patchify_grid_and_sees_within_patches(tmp_path):
    torch.manual_seed(0)
    conv, linear = tiny_model(patch_stem="conv"), tiny_model()
    x = torch.randn(2, 3, 3, 32, 48)
    out = conv(x)
    assert out.grid == linear(x).grid == (3, 2, 3)
    assert out.last_hidden_state.shape == linear(x).last_hidden_state.shape
    # frames are embedded independently: changing frame 2 leaves frame 0's patch embeddings alone
    emb = conv.embeddings.patch_embed
    y = x.clone()
    y[:, :, 2] += 1.0
    e_x, e_y = emb(x)[0], emb(y)[0]  # (B, T, N, D)
    assert torch.equal(e_x[:, 0], e_y[:, 0]) and not torch.allclose(e_x[:, 2], e_y[:, 2])
    conv.save_pretrained(tmp_path / "c")
    again = VideoMAPModel.from_pretrained(tmp_path / "c")
    assert again.config.patch_stem == "conv"
    torch.testing.assert_close(again.eval()(x).last_hidden_state, conv.eval()(x).last_hidden_state)


def test_motion_stem_adds_the_difference_from_the_frame_gap_before(tmp_path):
    model = tiny_model(patch_stem="conv", motion_gap=2)
    emb = model.embeddings.patch_embed
    still = torch.randn(1, 3, 1, 32, 48).expand(-1, -1, 6, -1, -1).clone()
    e_still = emb(still)[0]  # (B, T, N, D)
    assert all(torch.allclose(e_still[:, t], e_still[:, 0]) for t in range(6))  # no change: every frame alike
    moved = still.clone()
    moved[:, :, 3] += torch.randn(3, 32, 48)  # frame 3 changes
    e_moved = emb(moved)[0]
    # frames before 3 keep their embeddings (only earlier frames enter); 3 changes in appearance and
    # motion, 5 (= 3 + gap) in motion only, 4 not at all (it is compared with frame 2)
    assert torch.equal(e_moved[:, :3], e_still[:, :3]) and torch.allclose(e_moved[:, 4], e_still[:, 4])
    assert not torch.allclose(e_moved[:, 3], e_still[:, 3]) and not torch.allclose(e_moved[:, 5], e_still[:, 5])
    plain = tiny_model(patch_stem="conv")
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in plain.parameters())
    assert emb(still[:, :, :1])[0].shape == (1, 1, 6, 16)  # one frame: compared with itself
    model.save_pretrained(tmp_path / "m")
    again = VideoMAPModel.from_pretrained(tmp_path / "m")
    assert again.config.motion_gap == 2
    torch.testing.assert_close(again.eval()(moved).last_hidden_state, model(moved).last_hidden_state)
    with pytest.raises(ValueError, match="motion_gap"):
        tiny_config(motion_gap=-1)


def test_frame_size_not_divisible_by_patch_raises():
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        tiny_model()(torch.randn(1, 3, 2, 32, 40))


def test_token_mask_removes_tokens_before_the_blocks():
    model = tiny_model(img_size=64)
    x = torch.randn(2, 3, 2, 64, 64)  # N = 16 per frame
    mask = torch.zeros(2, 2, 16, dtype=torch.bool)
    for b in range(2):
        for t in range(2):
            mask[b, t, torch.randperm(16)[:10]] = True
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    out = model(x, token_mask=mask)
    assert seen == [torch.Size([2, 1 + 2 * 6, 16])]  # dropped, not zeroed: the blocks see 13 tokens
    assert out.last_hidden_state.shape == (2, 1 + 2 * 6, 16)
    assert out.grid == (2, 4, 4)
    # The masked patches' pixels cannot influence anything.
    patch_mask = mask.view(2, 2, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)  # (B, T, H, W)
    x2 = torch.where(patch_mask[:, None], torch.randn_like(x), x)
    torch.testing.assert_close(model(x2, token_mask=mask).last_hidden_state, out.last_hidden_state)


def test_token_mask_with_unequal_counts_per_frame_raises():
    model = tiny_model()
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[0, 0, :2] = True
    mask[0, 1, :1] = True
    with pytest.raises(ValueError, match="same number of tokens in every frame"):
        model(torch.randn(1, 3, 2, 32, 32), token_mask=mask)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 3, 2, 32, 32), token_mask=torch.zeros(1, 2, 5, dtype=torch.bool))


def test_apply_token_mask_keeps_the_order_of_visible_tokens():
    x = torch.arange(2 * 4, dtype=torch.float32).view(1, 2, 4, 1)  # (B, T, N, D)
    mask = torch.tensor([[[True, False, True, False], [False, True, False, True]]])
    assert apply_token_mask(x, mask).flatten().tolist() == [1.0, 3.0, 4.0, 6.0]


def test_token_order_is_spatial_first():
    model = tiny_model()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    x = torch.randn(1, 3, 3, 32, 32)  # T = 3, N = 4
    model(x)
    x2 = x.clone()
    x2[:, :, 1] = torch.randn(3, 32, 32)  # change frame 2 only
    model(x2)
    changed = (seen[0] - seen[1]).abs().amax(-1)[0] > 0  # (1 + T·N,)
    expect = torch.zeros(1 + 3 * 4, dtype=torch.bool)
    expect[1 + 4:1 + 8] = True  # [cls, frame 1 (4), frame 2 (4), frame 3 (4)]
    assert changed.tolist() == expect.tolist()


# --------------------------------------------------------------------------- the B-Mamba mixer


def test_causal_conv1d_never_reads_the_future():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 12)
    w, b = torch.randn(6, 4), torch.randn(6)
    y = causal_conv1d(x, w, b)
    x2 = x.clone()
    x2[..., 5] += 1.0
    changed = (causal_conv1d(x2, w, b) - y).abs().amax(1)[0] > 0  # (L,)
    assert changed.tolist() == [t in (5, 6, 7, 8) for t in range(12)]  # kernel 4: t .. t+3


def test_each_scan_direction_is_causal():
    mixer = tiny_model(attn_every=0).blocks[0].mixer
    x = torch.randn(1, 32, 10)  # (B, E, L)
    x2 = x.clone()
    x2[..., 6] += 1.0
    for ssm in (mixer.ssm_fwd, mixer.ssm_bwd):  # the mixer feeds ssm_bwd the flipped sequence
        changed = (ssm(x2) - ssm(x)).abs().amax(1)[0] > 0  # (L,)
        assert not changed[:6].any() and changed[6:].all()


def test_mixer_is_bidirectional():
    # Gradients show dependence exactly (at init the cross-token effect is tiny: Δ, B, C are small).
    mixer = tiny_model(attn_every=0).blocks[0].mixer
    x = torch.randn(1, 12, 16, requires_grad=True)
    mixer(x)[:, 0].sum().backward()
    assert (x.grad[0].abs().sum(-1) > 0).all()  # position 0 sees every later token
    x.grad = None
    mixer(x)[:, -1].sum().backward()
    assert (x.grad[0].abs().sum(-1) > 0).all()  # and the last position every earlier one
    # Without the backward direction, position 0 would see nothing after it.
    x.grad = None
    xz = mixer.in_proj(x).transpose(1, 2)  # (B, 2E, L)
    mixer.ssm_fwd(xz[:, :32])[..., 0].sum().backward()
    assert (x.grad[0, 1:] == 0).all() and (x.grad[0, 0] != 0).any()


def test_backward_direction_is_the_forward_one_on_the_flipped_sequence():
    torch.manual_seed(0)
    model = tiny_model(attn_every=0)
    mixer = model.blocks[0].mixer
    swapped = BiMambaMixer(16, d_state=4, dt_rank=1)
    state = mixer.state_dict()
    swapped.load_state_dict({k.replace("ssm_fwd", "TMP").replace("ssm_bwd", "ssm_fwd").replace("TMP", "ssm_bwd"): v
                             for k, v in state.items()})
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(swapped(x.flip(1)).flip(1), mixer(x))


def test_reverse_conv_and_scan_equal_the_flipped_forward_ones():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 6, 11), torch.randn(6, 4), torch.randn(6)
    torch.testing.assert_close(causal_conv1d(x, w, b, "silu", reverse=True),
                               causal_conv1d(x.flip(-1), w, b, "silu").flip(-1))
    ssm = tiny_model(attn_every=0).blocks[0].mixer.ssm_bwd
    x, z = torch.randn(2, 32, 10), torch.randn(2, 32, 10)
    torch.testing.assert_close(ssm(x, z, reverse=True), ssm(x.flip(-1), z.flip(-1)).flip(-1))


def test_mixer_equals_videomambas_flip_formulation():
    # The mixer gates inside the scans, runs the backward direction reversed in place and keeps
    # (B, E, L) throughout; VideoMamba's formulation flips copies, averages, then gates. Same
    # function: outputs and every parameter gradient agree.
    import torch.nn.functional as F

    from encoder.scan import causal_conv1d_ref, selective_scan_ref

    torch.manual_seed(0)
    mixer = tiny_model(attn_every=0).blocks[0].mixer
    with torch.no_grad():  # move A, D and the dt bias off their init so every term matters
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, 13, 16)

    def direction(ssm, x):
        x = causal_conv1d_ref(x, ssm.conv1d.weight.squeeze(1), ssm.conv1d.bias, "silu")
        dt, B, C = ssm.x_proj(x.transpose(1, 2)).split([ssm.dt_rank, ssm.d_state, ssm.d_state], dim=-1)
        delta = (dt @ ssm.dt_proj.weight.t()).transpose(1, 2)
        return selective_scan_ref(x, delta, -torch.exp(ssm.A_log), B.transpose(1, 2), C.transpose(1, 2),
                                  D=ssm.D, delta_bias=ssm.dt_proj.bias, delta_softplus=True)

    def flip_formulation(h):
        x, z = mixer.in_proj(h).transpose(1, 2).chunk(2, dim=1)
        y = 0.5 * (direction(mixer.ssm_fwd, x) + direction(mixer.ssm_bwd, x.flip(-1)).flip(-1)) * F.silu(z)
        return mixer.out_proj(y.transpose(1, 2))

    grads = []
    for fn in (mixer, flip_formulation):
        mixer.zero_grad()
        y = fn(h)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((y.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()}))
    (y_new, g_new), (y_old, g_old) = grads
    torch.testing.assert_close(y_new, y_old, rtol=1e-4, atol=1e-5)
    for name in g_old:
        torch.testing.assert_close(g_new[name], g_old[name], rtol=1e-4, atol=1e-5, msg=name)


def test_ssm_parameters_are_initialised_as_mamba_and_tagged():
    model = tiny_model(attn_every=0)
    ssm = model.blocks[0].mixer.ssm_bwd
    torch.testing.assert_close(-torch.exp(ssm.A_log), -torch.arange(1.0, 5.0).repeat(32, 1))
    assert torch.equal(ssm.D, torch.ones(32))
    dt = torch.nn.functional.softplus(ssm.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert ssm.A_log._no_weight_decay and ssm.D._no_weight_decay
    names = model.no_weight_decay()
    assert "blocks.0.mixer.ssm_fwd.A_log" in names and "embeddings.pos_embed" in names
    assert not any(n.endswith("in_proj.weight") for n in names)


# --------------------------------------------------------------------------- positions, checkpoints


def test_position_interpolation_is_identity_at_the_trained_size():
    table = torch.randn(1, 1 + 4 * 4, 8)
    assert interpolate_spatial_pos(table, (4, 4), (4, 4)) is table
    temporal = torch.randn(1, 8, 8)
    assert interpolate_temporal_pos(temporal, 8) is temporal
    # Resizing keeps the cls entry and maps a constant field to the same constant.
    const = torch.cat([torch.randn(1, 1, 8), torch.full((1, 16, 8), 0.5)], dim=1)
    big = interpolate_spatial_pos(const, (4, 4), (7, 5))
    assert big.shape == (1, 1 + 35, 8) and torch.equal(big[:, 0], const[:, 0])
    torch.testing.assert_close(big[:, 1:], torch.full((1, 35, 8), 0.5))
    torch.testing.assert_close(interpolate_temporal_pos(torch.ones(1, 8, 3), 512), torch.ones(1, 512, 3))


def test_checkpoint_trained_at_8_frames_112px_runs_at_64_frames_224px(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(img_size=112, num_frames=8, embed_dim=8, num_heads=2, d_state=2)
    model = VideoMAPModel(config).eval()
    x = torch.randn(1, 3, 8, 112, 112)
    with torch.no_grad():
        before = model(x).last_hidden_state
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    loaded = VideoMAPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, before)  # nothing re-initialised on load
        out = loaded(torch.randn(1, 3, 64, 224, 224))
    assert out.grid == (64, 14, 14)
    assert out.last_hidden_state.shape == (1, 1 + 64 * 196, 8)
    assert torch.isfinite(out.last_hidden_state).all()
    assert loaded.blocks[0].mixer.ssm_fwd.A_log._no_weight_decay  # tags survive loading


def test_runs_at_512_frames_and_auto_model_loads_it(tmp_path):
    from transformers import AutoModel

    tiny_model(num_frames=8, embed_dim=8, d_state=2).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(model, VideoMAPModel)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 16, 16))
    assert out.last_hidden_state.shape == (1, 1 + 512, 8)


# --------------------------------------------------------------------------- training features


def _loss_and_grads(model, x):
    model.zero_grad()
    torch.manual_seed(123)  # same drop-path draws in both runs
    out = model(x)
    loss = out.last_hidden_state.pow(2).mean() + out.pooler_output.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    model = tiny_model(drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 2, 32, 32)
    loss_ref, grads_ref = _loss_and_grads(model, x)

    model.activation_checkpointing_enable()
    calls = []
    # A pre-hook: torch stops the recomputation early, so the mixer's forward never "returns".
    model.blocks[0].mixer.register_forward_pre_hook(lambda *a: calls.append(1))
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x)
    assert len(calls) == 2  # really checkpointed: the mixer ran again in the backward pass
    torch.testing.assert_close(loss_ckpt, loss_ref)
    assert grads_ckpt.keys() == grads_ref.keys() and len(grads_ref) == len(list(model.parameters()))
    for name in grads_ref:
        torch.testing.assert_close(grads_ckpt[name], grads_ref[name], msg=name)


@pytest.mark.parametrize("frame_causal", [False, True], ids=["bidirectional", "frame-causal"])
def test_lean_backward_gives_the_same_loss_and_grads_and_can_be_turned_off(frame_causal):
    # lean_backward (the default) runs the Mamba blocks' norm, in_proj and scans as one function that
    # recomputes the norm and in_proj in the backward; off, the parts' backward, as models trained
    # before it. The forward is the same to the bit, the gradients to float rounding.
    x = torch.randn(2, 3, 2, 32, 32)
    runs = {}
    for lean in (True, False):
        torch.manual_seed(0)
        model = tiny_model(drop_path_rate=0.3, frame_causal=frame_causal, lean_backward=lean).train()
        seen = []
        model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.grad_fn))
        runs[lean] = _loss_and_grads(model, x)
        names, todo = set(), [seen[0]]
        while todo:  # the first block's graph (and the embeddings' before it)
            node = todo.pop()
            names.add(node.name())
            todo += [f for f, _ in node.next_functions if f is not None]
        assert any("_BiMambaCPU" in n for n in names) == lean, names
    (loss_lean, grads_lean), (loss_parts, grads_parts) = runs[True], runs[False]
    assert torch.equal(loss_lean, loss_parts)
    assert grads_lean.keys() == grads_parts.keys() and len(grads_parts) == len(list(model.parameters()))
    for name in grads_parts:
        torch.testing.assert_close(grads_lean[name], grads_parts[name], msg=name)


def test_config_flag_turns_gradient_checkpointing_on():
    model = VideoMAPModel(tiny_config(gradient_checkpointing=True))
    assert model.is_activation_checkpointing
    assert all(block.gradient_checkpointing for block in model.blocks)


def test_drop_path_is_identity_in_eval_mode():
    x = torch.randn(64, 5, 4)
    drop = DropPath(0.5)
    assert torch.equal(drop.eval()(x), x)
    y = drop.train()(x)
    zeroed = (y == 0).flatten(1).all(1)
    assert 0 < zeroed.sum() < 64  # whole samples dropped in training
    torch.testing.assert_close(y[~zeroed], 2 * x[~zeroed])

    deep = tiny_model(drop_path_rate=0.5)
    plain = VideoMAPModel(tiny_config()).eval()
    plain.load_state_dict(deep.state_dict())
    v = torch.randn(1, 3, 2, 32, 32)
    assert torch.equal(deep(v).last_hidden_state, plain(v).last_hidden_state)
    assert [b.drop_path.p for b in deep.blocks] == [0.0, 0.25, 0.5]  # linear schedule


def test_nano_forward_and_backward_on_a_16_frame_112px_clip():
    torch.manual_seed(0)
    model = VideoMAPModel(VideoMAPConfig.from_preset("nano")).train()
    x = torch.randn(1, 3, 16, 112, 112)
    out = model(x)
    assert out.last_hidden_state.shape == (1, 1 + 16 * 49, 128)
    assert out.grid == (16, 7, 7)
    out.last_hidden_state.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for ssm in (model.blocks[0].mixer.ssm_fwd, model.blocks[0].mixer.ssm_bwd):
        assert ssm.A_log.grad.abs().sum() > 0 and ssm.dt_proj.bias.grad.abs().sum() > 0
