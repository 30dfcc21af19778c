"""ModulatedDeformConv2d and DCNPack modules."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops

from megan_fast.nn import DCNPack, ModulatedDeformConv2d


def test_parameters_match_torchvision_deformconv():
    torch.manual_seed(0)
    ours = ModulatedDeformConv2d(8, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    torch.manual_seed(0)
    tv = torchvision.ops.DeformConv2d(8, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    assert ours.state_dict().keys() == tv.state_dict().keys()
    for k, v in tv.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape
        torch.testing.assert_close(ours.state_dict()[k], v)  # same init, same RNG draws
    x = torch.randn(2, 8, 9, 10)
    offset = torch.randn(2, 18, 5, 5)
    mask = torch.rand(2, 9, 5, 5)
    torch.testing.assert_close(ours(x, offset, mask), tv(x, offset, mask), atol=1e-5, rtol=1e-5)
    assert "groups=2" in repr(ours)


def test_module_rejects_bad_groups():
    with pytest.raises(ValueError, match="in_channels \\(5\\) must be divisible by groups \\(2\\)"):
        ModulatedDeformConv2d(5, 4, 3, groups=2)
    with pytest.raises(ValueError, match="deformable_groups"):
        DCNPack(12, 4, deformable_groups=8)


def test_dcnpack_starts_as_a_half_masked_convolution():
    """conv_offset starts at zero: offsets 0 and mask sigmoid(0) = 0.5 -> 0.5 * conv2d."""
    pack = DCNPack(16, 8, deformable_groups=8)
    assert pack.conv_offset.weight.abs().max() == 0 and pack.conv_offset.bias.abs().max() == 0
    assert pack.conv_offset.out_channels == 3 * 8 * 9
    x, feat = torch.randn(2, 16, 6, 7), torch.randn(2, 16, 6, 7)
    expected = F.conv2d(x, pack.weight, None, padding=1) * 0.5 + pack.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(pack(x, feat), expected, atol=1e-5, rtol=1e-5)


def test_dcnpack_offsets_from_a_separate_feature():
    torch.manual_seed(1)
    pack = DCNPack(8, 8, deformable_groups=2, offset_in_channels=5)
    torch.nn.init.normal_(pack.conv_offset.weight, std=0.1)
    x, feat = torch.randn(1, 8, 6, 6), torch.randn(1, 5, 6, 6)
    out = pack(x, feat)
    o1, o2, m = torch.chunk(pack.conv_offset(feat), 3, dim=1)
    expected = torchvision.ops.deform_conv2d(
        x, torch.cat((o1, o2), 1), pack.weight, pack.bias, padding=1, mask=torch.sigmoid(m)
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    for name, p in pack.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
