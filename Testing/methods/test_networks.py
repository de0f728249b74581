"""Denoising networks: shapes in 2D/3D at odd sizes, the paper's fusion, FF-Parser, ablations, weights round trip."""

from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.models.card import LabelInfo, ModelCard, save_model
from DiffusionSegLib.methods.registry import load_model
from DiffusionSegLib.methods.registry import build_network
from DiffusionSegLib.methods.medsegdiff.network import DynamicConditionalEncoding, FFParser, MedSegDiffUNet
from DiffusionSegLib.methods.vanilla_dpm.network import VanillaConditionalDPM


@pytest.mark.parametrize("dims,size,labels", [(2, (48, 80), 1), (2, (24, 40), 3), (3, (16, 32, 24), 1), (3, (8, 16, 8), 2)])
def test_medsegdiff_shapes_any_size(dims, size, labels):
    net = MedSegDiffUNet(spatial_dims=dims, in_channels=2, out_channels=labels, channels=[8, 16, 32], norm_groups=4)
    assert net.size_divisor == 4
    x = torch.randn(2, labels, *size)
    out = net(x, torch.randn(2, 2, *size), torch.tensor([3, 900]))
    assert out.shape == x.shape


@pytest.mark.parametrize("dims,size", [(2, (32, 24)), (3, (16, 8, 24))])
def test_vanilla_dpm_shapes(dims, size):
    net = VanillaConditionalDPM(spatial_dims=dims, in_channels=3, out_channels=2, channels=[8, 16], norm_num_groups=4)
    x = torch.randn(2, 2, *size)
    assert net(x, torch.randn(2, 3, *size), torch.tensor([0, 999])).shape == x.shape


def _trained_like(net: torch.nn.Module) -> torch.nn.Module:
    """Random non-trivial FF-Parser filters and GroupNorm affines (at init they are identities)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize("dynamic", [True, False])
def test_image_index_gives_the_numbers_of_one_image_per_item(dynamic):
    """The sampler passes a slice's image once for its N samples; the output must not change."""
    net = _trained_like(MedSegDiffUNet(out_channels=3, channels=[8, 16, 32, 32], norm_groups=4, dynamic_conditioning=dynamic))
    images = torch.randn(2, 1, 24, 16)
    index = torch.tensor([0, 0, 0, 1, 1])
    x = torch.randn(5, 3, 24, 16)
    t = torch.full((5,), 400)
    with torch.inference_mode():
        shared = net(x, images, t, image_index=index)
        expanded = net(x, images[index], t)
    torch.testing.assert_close(shared, expanded, rtol=1e-5, atol=1e-5)


def test_image_branch_runs_once_per_image_until_the_mask_enters_it():
    """Encoder levels 0 and 1 of the image branch see the image and t only (the dynamic conditional
    encoding first mixes the mask in after level 1): they run on U images, later levels on B items."""
    net = MedSegDiffUNet(out_channels=2, channels=[8, 16, 32, 32], norm_groups=4).eval()
    assert net.dynamic_stages == [1, 2]
    seen = {}
    for level, stage in enumerate(net.image_encoder.stages):
        stage.register_forward_pre_hook(lambda m, args, level=level: seen.update({level: args[0].shape[0]}))
    with torch.inference_mode():
        net(torch.randn(6, 2, 16, 16), torch.randn(2, 1, 16, 16), torch.full((6,), 10),
            image_index=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert seen == {0: 2, 1: 2, 2: 6}


def test_items_that_share_an_image_must_share_a_timestep():
    net = MedSegDiffUNet(channels=[8, 16], norm_groups=4)
    with pytest.raises(ValueError, match="share a timestep"):
        net(torch.randn(2, 1, 8, 8), torch.randn(1, 1, 8, 8), torch.tensor([10, 20]), image_index=torch.tensor([0, 0]))


@pytest.mark.parametrize("block", ["time", "plain"])
def test_blocks_without_autograd_give_the_same_numbers_and_leave_their_input(block):
    """Sampling runs SiLU and the residual sum in place; the input must stay as it was."""
    from DiffusionSegLib.methods.blocks import ResBlock, TimeResBlock

    net = _trained_like(TimeResBlock(2, 8, 8, 16, 4) if block == "time" else ResBlock(2, 8, 8, 4))
    x, temb = torch.randn(3, 8, 12, 12), torch.randn(3, 16)
    call = (lambda: net(x, temb)) if block == "time" else (lambda: net(x))
    before = x.clone()
    with torch.enable_grad():
        reference = call()
    with torch.inference_mode():
        fast = call()
    assert torch.equal(x, before)
    torch.testing.assert_close(fast, reference.detach(), rtol=0, atol=0)


def test_vanilla_dpm_with_attention_and_default_size():
    net = VanillaConditionalDPM(channels=[8, 16], attention_levels=[False, True], norm_num_groups=4)
    x = torch.randn(1, 1, 8, 12)
    assert net(x, torch.randn(1, 1, 8, 12), torch.tensor([7])).shape == x.shape
    assert VanillaConditionalDPM().size_divisor == MedSegDiffUNet().size_divisor == 8


def test_default_sizes_are_cpu_trainable():
    """The defaults stay in the 1-3 M parameter range (training runs on a 2-core CPU)."""
    for net in (MedSegDiffUNet(), VanillaConditionalDPM()):
        assert 1e6 < sum(p.numel() for p in net.parameters()) < 3e6


def test_gradient_reaches_both_encoders_fusion_and_filters():
    net = MedSegDiffUNet(in_channels=1, out_channels=1, channels=[8, 16, 32], norm_groups=4, ff_reference_size=8)
    net(torch.randn(2, 1, 16, 20), torch.randn(2, 1, 16, 20), torch.tensor([5, 50])).pow(2).mean().backward()
    assert net.image_encoder.stem.weight.grad.abs().sum() > 0
    assert net.mask_encoder.stem.weight.grad.abs().sum() > 0
    assert net.dynamic["1"].norm_mask.weight.grad.abs().sum() > 0
    assert net.ff_parsers[0].weight_real.grad.abs().sum() > 0
    assert net.ff_parsers[0].weight_imag.grad.abs().sum() > 0


def test_bf16_autocast_forward_keeps_the_fft_in_float32():
    net = MedSegDiffUNet(spatial_dims=2, channels=[8, 16], norm_groups=4).eval()
    x, im, t = torch.randn(1, 1, 12, 20), torch.randn(1, 1, 12, 20), torch.tensor([3])
    with torch.no_grad():
        ref = net(x, im, t)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low = net(x, im, t)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_dynamic_conditional_encoding_matches_the_paper_formula():
    fuse = DynamicConditionalEncoding(2)  # GroupNorm(1, C): layer norm over channels and space, affine = identity at init
    m_i = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2)
    m_x = torch.tensor([[[[0.0, 1.0]], [[0.0, 3.0]]]])

    def ln(t):
        return (t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5)

    expected = ln(m_i) * ln(m_x) * m_i
    assert torch.allclose(fuse(m_i, m_x), expected, atol=1e-5)


@pytest.mark.parametrize("dims,size", [(2, (64, 64)), (2, (37, 50)), (3, (12, 9, 16))])
def test_ff_parser_is_identity_at_init_at_any_size(dims, size):
    ff = FFParser(dims, channels=3, reference_size=16)
    x = torch.randn(2, 3, *size)
    assert torch.allclose(ff(x), x, atol=1e-5)


def test_ff_parser_uses_its_filter_as_is_at_the_reference_size():
    """At the reference grid the stored W multiplies the spectrum bin for bin (no resampling)."""
    torch.manual_seed(0)
    ff = FFParser(2, channels=2, reference_size=12)
    with torch.no_grad():
        ff.weight_real.normal_()
        ff.weight_imag.normal_()
    x = torch.randn(3, 2, 12, 12)
    expected = torch.fft.irfftn(torch.fft.rfftn(x, dim=(2, 3), norm="ortho")
                                * torch.complex(ff.weight_real, ff.weight_imag),
                                s=(12, 12), dim=(2, 3), norm="ortho")
    assert torch.allclose(ff(x), expected, atol=1e-5)


def _waves(size: tuple[int, ...], axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every cosine cos(2 pi k i / n) along ``axis`` (n = size[axis], k = 0..n//2), constant elsewhere.

    Returns (waves (n//2+1, 1, *size) float32, frequencies k/n (n//2+1,) in cycles/sample).
    """
    n = size[axis]
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    profile = torch.cos(2 * torch.pi * k[:, None] * i[None, :] / n)  # (K, n)
    view = [len(k), 1] + [1] * len(size)
    view[2 + axis] = n
    return profile.view(view).expand(len(k), 1, *size).float().contiguous(), k / n


def _notch(ff: FFParser, axis: int, bin_: int) -> None:
    """Zero W where the frequency along ``axis`` is +-bin_/reference (every frequency on the other axes)."""
    last = ff.spatial_dims - 1
    reference = ff.weight_real.shape[1]
    bins = {bin_} if axis == last else {bin_ % reference, -bin_ % reference}  # full axes hold +f and -f
    with torch.no_grad():
        for b in bins:
            index = [slice(None)] * (ff.spatial_dims + 1)
            index[1 + axis] = b
            ff.weight_real[tuple(index)] = 0.0


def _tent_gain(freqs: torch.Tensor, reference: int, bin_: int, rfft_axis: bool) -> torch.Tensor:
    """Gain of W = 1 with a zero at reference bin ``bin_``, linearly interpolated in frequency.

    Reference position of frequency f is f * reference; on a full axis the spectrum is periodic
    (distance measured around the circle), on the rfft axis positions past the last stored bin
    take its value.
    """
    position = freqs.double() * reference
    if rfft_axis:
        distance = (position.clamp(max=reference // 2) - bin_).abs()
    else:
        offset = torch.remainder(position - bin_, reference)
        distance = torch.minimum(offset, reference - offset)
    return distance.clamp(max=1.0)


@pytest.mark.parametrize("reference", [64, 63])
@pytest.mark.parametrize("size", [(96, 96), (168, 168), (63, 63), (65, 65), (64, 50)])
def test_ff_parser_dc_block_stays_at_dc_at_other_sizes(reference, size):
    """W = 0 at DC only, learnt on the reference grid: the mean is removed at any size, a cosine passes."""
    ff = FFParser(2, channels=1, reference_size=reference)
    with torch.no_grad():
        ff.weight_real[:, 0, 0] = 0.0
    constant = torch.full((1, 1, *size), 3.0)
    assert ff(constant).abs().max() < 1e-4
    for axis in (0, 1):
        waves, freqs = _waves(size, axis)
        far = (freqs * reference > 1.0)  # more than one reference bin away from DC
        out = ff(waves[far])
        assert torch.allclose(out, waves[far], atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("size", [(96, 96), (168, 168), (64, 64)])
def test_ff_parser_band_stop_at_quarter_frequency_stays_there(axis, size):
    """W = 0 at f = 0.25 (one reference bin): a cosine at 0.25 is removed at any size, one at 0.1 passes."""
    ff = FFParser(2, channels=1, reference_size=64)
    _notch(ff, axis, 16)  # bin 16 of 64 is f = 0.25
    waves, freqs = _waves(size, axis)
    quarter = int(torch.nonzero(freqs == 0.25))
    tenth = int(torch.argmin((freqs - 0.1).abs()))
    assert ff(waves[quarter:quarter + 1]).abs().max() < 1e-4
    assert torch.allclose(ff(waves[tenth:tenth + 1]), waves[tenth:tenth + 1], atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("size,reference", [((96, 96), 64), ((50, 50), 64), ((96, 96), 32), ((64, 64), 96)])
def test_ff_parser_nyquist_stop_stays_at_nyquist(axis, size, reference):
    """W = 0 at the reference's Nyquist bin: the alternating +-1 pattern is removed at any even size."""
    ff = FFParser(2, channels=1, reference_size=reference)
    _notch(ff, axis, reference // 2)
    waves, freqs = _waves(size, axis)
    assert freqs[-1] == 0.5
    assert ff(waves[-1:]).abs().max() < 1e-4
    tenth = int(torch.argmin((freqs - 0.1).abs()))
    assert torch.allclose(ff(waves[tenth:tenth + 1]), waves[tenth:tenth + 1], atol=1e-4)


@pytest.mark.parametrize("dims,size,reference,bin_", [
    (2, (96, 96), 64, 16), (2, (168, 63), 64, 16), (2, (65, 96), 63, 16), (2, (63, 65), 63, 0),
    (2, (40, 41), 16, 5), (2, (48, 33), 64, 32),
    (3, (24, 20, 21), 16, 4), (3, (21, 24, 20), 15, 0), (3, (10, 12, 14), 16, 8),
])
def test_ff_parser_gain_follows_physical_frequency(dims, size, reference, bin_):
    """Every cosine of the target grid along every axis gets the reference filter's gain at its own
    frequency (a one-bin notch interpolated linearly in cycles/sample), odd and even, 2D and 3D."""
    for axis in range(dims):
        ff = FFParser(dims, channels=1, reference_size=reference)
        _notch(ff, axis, bin_)
        waves, freqs = _waves(size, axis)
        gain = _tent_gain(freqs, reference, bin_, rfft_axis=axis == dims - 1)
        expected = waves * gain.float().view(-1, *([1] * (dims + 1)))
        assert torch.allclose(ff(waves), expected, atol=1e-4), f"axis {axis}"


def test_ff_parser_dc_block_in_3d_at_another_size():
    """3D: W = 0 at DC on a 16^3 grid removes an offset at 24 x 21 x 30 and keeps a cosine riding on it."""
    ff = FFParser(3, channels=2, reference_size=16)
    with torch.no_grad():
        ff.weight_real[:, 0, 0, 0] = 0.0
    z, y, x = torch.meshgrid(torch.arange(24.0), torch.arange(21.0), torch.arange(30.0), indexing="ij")
    wave = torch.cos(2 * torch.pi * (5 * z / 24 + 4 * y / 21 + 6 * x / 30))  # far from DC on every axis
    volume = torch.stack([wave + 4.0, 2.0 * wave - 1.0])[None]
    expected = torch.stack([wave, 2.0 * wave])[None]
    assert torch.allclose(ff(volume), expected, atol=1e-4)


def test_ff_parser_resized_filter_stays_differentiable():
    ff = FFParser(2, channels=2, reference_size=8)
    ff(torch.randn(2, 2, 20, 13)).pow(2).sum().backward()
    assert ff.weight_real.grad.abs().sum() > 0 and ff.weight_imag.grad.abs().sum() > 0


def test_ff_parser_filters_when_trained():
    ff = FFParser(2, channels=1, reference_size=8)
    with torch.no_grad():
        ff.weight_real.zero_()  # W = 0 removes every frequency
    assert torch.allclose(ff(torch.randn(1, 1, 20, 12)), torch.zeros(1, 1, 20, 12), atol=1e-6)


def test_ablation_flags_change_the_structure():
    full = MedSegDiffUNet(channels=[8, 16, 32, 64], norm_groups=4)
    no_ff = MedSegDiffUNet(channels=[8, 16, 32, 64], norm_groups=4, ff_parser=False)
    no_dyn = MedSegDiffUNet(channels=[8, 16, 32, 64], norm_groups=4, dynamic_conditioning=False)
    assert full.dynamic_stages == [1, 2]
    assert any("ff_parsers" in k for k in full.state_dict())
    assert not any("ff_parsers" in k for k in no_ff.state_dict())
    assert not any(k.startswith("dynamic.") for k in no_dyn.state_dict())
    assert MedSegDiffUNet(channels=[8, 16, 32, 64], norm_groups=4, dynamic_stages=[0]).dynamic_stages == [0]
    with pytest.raises(ValueError):
        MedSegDiffUNet(channels=[8, 16, 32, 64], dynamic_stages=[3])  # the bottleneck has no mask feature


@pytest.mark.parametrize("method", ["medsegdiff", "vanilla_dpm"])
def test_weights_round_trip_through_safetensors(tmp_path, method):
    network = {"channels": [8, 16], "norm_groups": 4} if method == "medsegdiff" else {"channels": [8, 16], "norm_num_groups": 4}
    card = ModelCard(name="rt", method=method, labels=[LabelInfo("a"), LabelInfo("b")], network=network)
    torch.manual_seed(0)
    net = build_network(card).eval()
    save_model(tmp_path / "m", net.state_dict(), card)
    loaded, loaded_card = load_model(tmp_path / "m")
    x, im, t = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 16, 16), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(net(x, im, t), loaded(x, im, t))
    assert loaded_card.weights_sha256 == card.weights_sha256 and len(card.weights_sha256) == 64
    assert (tmp_path / "m" / "model.json").stat().st_mode & 0o044  # readable by others


def test_unknown_method_is_refused():
    with pytest.raises(ValueError):
        build_network(ModelCard(name="x", method="unet3000"))


@pytest.mark.parametrize("dims,size", [(1, (7,)), (2, (5, 6)), (3, (3, 4, 5))])
def test_upsample_conv_equals_nearest_upsampling_then_the_conv(dims, size):
    from DiffusionSegLib.methods.blocks import conv_nd, upsample_conv

    torch.manual_seed(0)
    conv = conv_nd(dims)(6, 4, 3, padding=1)
    h = torch.randn(2, 6, *size, requires_grad=True)
    target = tuple(2 * n for n in size)
    reference = conv(torch.nn.functional.interpolate(h, size=target, mode="nearest"))
    out = upsample_conv(h, conv, target)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # training goes through it too
    assert h.grad is not None and conv.weight.grad is not None


def test_upsample_conv_falls_back_where_the_shortcut_does_not_hold():
    """Odd target sizes (not exactly 2x) and other convolutions: interpolate, then convolve."""
    from DiffusionSegLib.methods.blocks import upsample_conv

    torch.manual_seed(0)
    h = torch.randn(1, 3, 4, 5)
    for conv, size in [(torch.nn.Conv2d(3, 2, 3, padding=1), (8, 9)), (torch.nn.Conv2d(3, 2, 1), (8, 10)),
                       (torch.nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), (8, 10))]:
        reference = conv(torch.nn.functional.interpolate(h, size=size, mode="nearest"))
        torch.testing.assert_close(upsample_conv(h, conv, size), reference)


def test_the_decoders_never_make_the_upsampled_tensor(monkeypatch):
    """At sizes divisible by the network's divisor every decoder level is exactly 2x: no interpolation."""
    from DiffusionSegLib.methods.unisegdiff.network import UniSegDiffNet

    def refuse(*args, **kwargs):
        raise AssertionError("nearest upsampling made")

    monkeypatch.setattr(torch.nn.functional, "interpolate", refuse)
    net = MedSegDiffUNet(out_channels=2, channels=[8, 16, 32], norm_groups=4)
    assert net(torch.randn(2, 2, 16, 24), torch.randn(2, 1, 16, 24), torch.tensor([5, 9])).shape == (2, 2, 16, 24)
    uni = UniSegDiffNet(out_channels=2, channels=[8, 16, 32], norm_groups=4)
    assert uni(torch.randn(2, 2, 16, 24), torch.randn(2, 1, 16, 24), torch.tensor([5, 9])).shape == (2, 2, 16, 24)


def test_a_pretrained_3d_backbone_becomes_the_image_encoder_of_a_3d_medsegdiff():
    """After ``load_image_encoder`` the image branch computes the backbone's encoder features (same time
    embedding, same stages); the mask branch is untouched; other widths and 2D networks are refused."""
    from DiffusionSegLib.methods.blocks import timestep_embedding
    from DiffusionSegLib.methods.pretrain3d.denoising import DenoisingBackbone

    torch.manual_seed(0)
    backbone = DenoisingBackbone((8, 16, 32), norm_groups=4)
    net = MedSegDiffUNet(spatial_dims=3, channels=(8, 16, 32, 64), norm_groups=4)
    mask_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("mask_encoder.")}
    names = net.load_image_encoder(backbone.state_dict())
    assert "image_encoder.stem.weight" in names and "time_mlp.0.weight" in names
    assert not any(n.startswith(("mask_encoder.", "decoder.", "bottleneck.")) for n in names)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in mask_before.items())
    x, t = torch.randn(2, 1, 8, 8, 8), torch.tensor([0, 500])
    with torch.no_grad():
        expected = backbone.encode(x, t)
        temb = net.time_mlp(timestep_embedding(t, 8))
        h = net.image_encoder.stem(x)
        for i in range(3):
            h = net.image_encoder.stages[i](h, temb)
            torch.testing.assert_close(h, expected[i])
            if i < 2:
                h = net.image_encoder.downs[i](h)
    with pytest.raises(ValueError, match="does not fit"):
        MedSegDiffUNet(spatial_dims=3, channels=(16, 32, 64), norm_groups=4).load_image_encoder(backbone.state_dict())
    with pytest.raises(ValueError, match="3D networks only"):
        MedSegDiffUNet(spatial_dims=2, channels=(8, 16, 32), norm_groups=4).load_image_encoder(backbone.state_dict())
