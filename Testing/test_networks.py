"""Denoising networks: shapes in 2D/3D at odd sizes, the paper's fusion, FF-Parser, ablations, weights round trip."""

from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.modelcard import LabelInfo, ModelCard, load_model, save_model
from DiffusionSegLib.networks import build_network
from DiffusionSegLib.networks.medsegdiff import DynamicConditionalEncoding, FFParser, MedSegDiffUNet
from DiffusionSegLib.networks.vanilla import VanillaConditionalDPM


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


def test_ff_parser_dc_weight_removes_the_mean_at_the_reference_size():
    """A filter learned to remove the mean (W = 0 at DC only) removes exactly the mean."""
    ff = FFParser(2, channels=2, reference_size=64)
    with torch.no_grad():
        ff.weight_real[:, 0, 0] = 0.0
    x = torch.randn(1, 2, 64, 64) + 3.0
    assert torch.allclose(ff(x), x - x.mean(dim=(2, 3), keepdim=True), atol=1e-4)


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
