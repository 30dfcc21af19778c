"""The official Zooming Slow-Mo and TMNet networks, written out a second time, independently of megan_fast.models.

Their tensor names come from the module definitions of the authors' code
(Zooming Slow-Mo's ``LunaTokis``, TMNet's ``TMNet``: facts, names, shapes and
forward order), and their forward is plain functional code over a state dict
with those names, with torchvision's DCN, F.interpolate and two separate
ConvLSTM passes (one per direction), frame by frame and time by time as the
official loops run.  Our model, given the same file through ``load_model``,
must compute the same frames (tests/test_zooming_slowmo.py, tests/test_tmnet.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def official_shapes(nf=64, front=5, back=40, groups=8, tmnet=False) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official file with its shape, from the module definitions."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k=3, bias=True):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            shapes[f"{name}.bias"] = (cout,)

    def pcd(prefix):
        for j in ("1", "2"):
            conv(f"{prefix}.L3_offset_conv1_{j}", 2 * nf, nf)
            conv(f"{prefix}.L3_offset_conv2_{j}", nf, nf)
            for lvl in ("3", "2", "1"):
                if lvl != "3":
                    conv(f"{prefix}.L{lvl}_offset_conv1_{j}", 2 * nf, nf)
                    conv(f"{prefix}.L{lvl}_offset_conv2_{j}", 2 * nf, nf)
                    conv(f"{prefix}.L{lvl}_offset_conv3_{j}", nf, nf)
                    conv(f"{prefix}.L{lvl}_fea_conv_{j}", 2 * nf, nf)
                conv(f"{prefix}.L{lvl}_dcnpack_{j}", nf, nf)  # DCN_sep weight and bias
                conv(f"{prefix}.L{lvl}_dcnpack_{j}.conv_offset_mask", nf, 3 * groups * 9)

    def pyramid(prefix):
        for lvl in ("2", "3"):
            conv(f"{prefix}fea_L{lvl}_conv1", nf, nf)
            conv(f"{prefix}fea_L{lvl}_conv2", nf, nf)

    conv("conv_first", 3, nf)
    for i in range(front):
        conv(f"feature_extraction.{i}.conv1", nf, nf)
        conv(f"feature_extraction.{i}.conv2", nf, nf)
    pyramid("")
    pcd("pcd_align")
    conv("fusion", 2 * nf, nf, 1)
    for s in ("h", "c"):
        pyramid(f"ConvBLSTM.forward_net.pcd_{s}.")
        pcd(f"ConvBLSTM.forward_net.pcd_{s}.pcd_align")
        conv(f"ConvBLSTM.forward_net.pcd_{s}.fusion", 2 * nf, nf, 1)
    conv("ConvBLSTM.forward_net.cell_list.0.conv", 2 * nf, 4 * nf)
    conv("ConvBLSTM.conv_1x1", 2 * nf, nf, 1)
    for i in range(back):
        conv(f"recon_trunk.{i}.conv1", nf, nf)
        conv(f"recon_trunk.{i}.conv2", nf, nf)
    conv("upconv1", nf, 4 * nf)
    conv("upconv2", nf, 4 * 64)
    conv("HRconv", 64, 64)
    conv("conv_last", 64, 3)
    if tmnet:
        for branch in ("A", "B"):
            for lvl in ("1", "2", "3"):
                tmb = f"pcd_align.TMB_{branch}_l{lvl}"
                conv(f"{tmb}.t_process.0", 1, 64, 1, bias=False)
                conv(f"{tmb}.t_process.2", 64, 64, 1, bias=False)
                conv(f"{tmb}.t_process.4", 64, 64, 1, bias=False)
                conv(f"{tmb}.f_process.0", 64, 64)
                conv(f"{tmb}.f_process.2", 64, 64)
        for pair in ("AtB", "CtB"):
            conv(f"layers{pair}Offset.0", 128, 64)
            conv(f"layers{pair}Offset.2", 64, 64)
            conv(f"layers{pair}", 64, 64)
            conv(f"layers{pair}.conv_offset_mask", 64, 3 * 8 * 9)
        for i, (cin, cout) in zip(("0", "2", "4", "6"), ((192, 192), (192, 192), (192, 192), (192, 64))):
            conv(f"layersFusion.{i}", cin, cout, 1)
    return shapes


def official_state_dict(seed=0, **sizes) -> dict[str, torch.Tensor]:
    """Random weights under the official names; every offset conv off its zero init, so the offsets matter."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(**sizes).items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 16
        scale = (0.5 if "conv_offset_mask" in name else 1.0) / fan_in ** 0.5
        state[name] = torch.randn(shape, generator=gen) * scale
    return state


def official_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, groups: int,
                     t: torch.Tensor | None = None) -> torch.Tensor:
    """The official forward, written from its description, on a state dict with the official names.

    TMNet (a state dict with ``layersFusion``): ``t`` is the official (b, k) tensor of times; with t None
    the official code skips the temporal modulation.
    """
    from torchvision.ops import deform_conv2d

    tmnet = "layersFusion.0.weight" in sd
    lrelu = lambda v: F.leaky_relu(v, 0.1)  # noqa: E731
    up = lambda v: F.interpolate(v, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731

    def conv(name, v, padding=None):
        w = sd[f"{name}.weight"]
        return F.conv2d(v, w, sd.get(f"{name}.bias"), padding=w.shape[-1] // 2 if padding is None else padding)

    def conv_s2(name, v):
        return F.conv2d(v, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=2, padding=1)

    def resblock(name, v):
        return v + conv(f"{name}.conv2", F.relu(conv(f"{name}.conv1", v)))

    def dcn_sep(name, v, fea):
        o1, o2, m = torch.chunk(conv(f"{name}.conv_offset_mask", fea), 3, dim=1)
        return deform_conv2d(v, torch.cat((o1, o2), 1), sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1,
                             mask=torch.sigmoid(m))

    def tmb(name, v, time):
        feature = lrelu(conv(f"{name}.f_process.2", lrelu(conv(f"{name}.f_process.0", v))))
        vec = time
        for i in ("0", "2", "4"):
            vec = lrelu(conv(f"{name}.t_process.{i}", vec, padding=0))
        return feature * vec

    def pyramid(prefix, l1):
        l2 = lrelu(conv(f"{prefix}fea_L2_conv2", lrelu(conv_s2(f"{prefix}fea_L2_conv1", l1))))
        l3 = lrelu(conv(f"{prefix}fea_L3_conv2", lrelu(conv_s2(f"{prefix}fea_L3_conv1", l2))))
        return [l1, l2, l3]

    def pcd_align(p, fea1, fea2, times=None):
        out = []
        for j, (a, b), branch in (("1", (fea1, fea2), "A"), ("2", (fea2, fea1), "B")):
            time = None if times is None else times[int(j) - 1]

            def modulated(value, lvl, before):
                return value if time is None else value + tmb(f"{p}.TMB_{branch}_l{lvl}", before, time)

            o = lrelu(conv(f"{p}.L3_offset_conv1_{j}", torch.cat([a[2], b[2]], 1)))
            off3 = modulated(lrelu(conv(f"{p}.L3_offset_conv2_{j}", o)), "3", o)
            fea3 = lrelu(dcn_sep(f"{p}.L3_dcnpack_{j}", a[2], off3))
            off2 = lrelu(conv(f"{p}.L2_offset_conv1_{j}", torch.cat([a[1], b[1]], 1)))
            off2 = lrelu(conv(f"{p}.L2_offset_conv2_{j}", torch.cat([off2, up(off3) * 2], 1)))
            off2 = modulated(lrelu(conv(f"{p}.L2_offset_conv3_{j}", off2)), "2", off2)
            fea2_ = lrelu(conv(f"{p}.L2_fea_conv_{j}", torch.cat([dcn_sep(f"{p}.L2_dcnpack_{j}", a[1], off2), up(fea3)], 1)))
            off1 = lrelu(conv(f"{p}.L1_offset_conv1_{j}", torch.cat([a[0], b[0]], 1)))
            off1 = lrelu(conv(f"{p}.L1_offset_conv2_{j}", torch.cat([off1, up(off2) * 2], 1)))
            off1 = modulated(lrelu(conv(f"{p}.L1_offset_conv3_{j}", off1)), "1", off1)
            out.append(conv(f"{p}.L1_fea_conv_{j}", torch.cat([dcn_sep(f"{p}.L1_dcnpack_{j}", a[0], off1), up(fea2_)], 1)))
        return torch.cat(out, 1)

    def easy_pcd(prefix, f1, f2):
        b = f1.shape[0]
        levels = pyramid(f"{prefix}.", torch.stack([f1, f2], 1).flatten(0, 1))
        fea1 = [lvl.view(b, 2, *lvl.shape[1:])[:, 0] for lvl in levels]
        fea2 = [lvl.view(b, 2, *lvl.shape[1:])[:, 1] for lvl in levels]
        return conv(f"{prefix}.fusion", pcd_align(f"{prefix}.pcd_align", fea1, fea2), padding=0)

    def lstm(seq):
        h = torch.zeros_like(seq[:, 0])
        c = torch.zeros_like(seq[:, 0])
        outs = []
        for i in range(seq.shape[1]):
            xt = seq[:, i]
            h_t = easy_pcd("ConvBLSTM.forward_net.pcd_h", xt, h)
            c_t = easy_pcd("ConvBLSTM.forward_net.pcd_c", xt, c)
            gi, gf, go, gg = torch.split(conv("ConvBLSTM.forward_net.cell_list.0.conv", torch.cat([xt, h_t], 1)),
                                         h.shape[1], 1)
            c = torch.sigmoid(gf) * c_t + torch.sigmoid(gi) * torch.tanh(gg)
            h = torch.sigmoid(go) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, 1)

    def comparison(seq):
        """The non-linear comparison: frame by frame, neighbours clamped at the ends."""
        length = seq.shape[1]
        fused = []
        for i in range(length):
            f0, f1, f2 = seq[:, max(i - 1, 0)], seq[:, i], seq[:, min(i + 1, length - 1)]
            a_off = conv("layersAtBOffset.2", lrelu(conv("layersAtBOffset.0", torch.cat([f0, f1], 1))))
            c_off = conv("layersCtBOffset.2", lrelu(conv("layersCtBOffset.0", torch.cat([f2, f1], 1))))
            v = torch.cat([lrelu(dcn_sep("layersAtB", f0, a_off)), f1, lrelu(dcn_sep("layersCtB", f2, c_off))], 1)
            for j in ("0", "2", "4"):
                v = lrelu(conv(f"layersFusion.{j}", v, padding=0))
            fused.append(conv("layersFusion.6", v, padding=0))
        return torch.stack(fused, 1)

    b, n, _, hh, ww = x.shape
    ph, pw = (-hh) % 4, (-ww) % 4  # the official test script: zeros at the bottom and right, cropped back
    xp = F.pad(x.flatten(0, 1), (0, pw, 0, ph)).view(b, n, 3, hh + ph, ww + pw)
    H, W = hh + ph, ww + pw
    l1 = lrelu(conv("conv_first", xp.flatten(0, 1)))
    for i in range(sum(1 for k in sd if k.startswith("feature_extraction.") and k.endswith("conv1.weight"))):
        l1 = resblock(f"feature_extraction.{i}", l1)
    levels = [lvl.view(b, n, *lvl.shape[1:]) for lvl in pyramid("", l1)]
    times = [None]
    if t is not None:
        forward_t, backward_t = t / 0.5 - 1, (1 - t) / 0.5 - 1
        times = [(forward_t[:, i].view(b, 1, 1, 1), backward_t[:, i].view(b, 1, 1, 1)) for i in range(t.shape[1])]
    seq = []
    for i in range(n - 1):
        fea1, fea2 = [lvl[:, i] for lvl in levels], [lvl[:, i + 1] for lvl in levels]
        if i == 0:
            seq.append(fea1[0])
        for time in times:
            seq.append(conv("fusion", pcd_align("pcd_align", fea1, fea2, time), padding=0))
        seq.append(fea2[0])
    seq = torch.stack(seq, 1)
    lstm_in = seq + comparison(seq) if tmnet else seq
    fwd, rev = lstm(lstm_in), lstm(lstm_in.flip(1)).flip(1)
    length = seq.shape[1]
    feats = conv("ConvBLSTM.conv_1x1", torch.cat([fwd, rev], 2).flatten(0, 1), padding=0)
    for i in range(sum(1 for k in sd if k.startswith("recon_trunk.") and k.endswith("conv1.weight"))):
        feats = resblock(f"recon_trunk.{i}", feats)
    if tmnet:
        feats = feats + seq.flatten(0, 1)  # the features before the comparison and the ConvLSTM
    out = lrelu(F.pixel_shuffle(conv("upconv1", feats), 2))
    out = lrelu(F.pixel_shuffle(conv("upconv2", out), 2))
    out = conv("conv_last", lrelu(conv("HRconv", out)))
    return out.view(b, length, 3, 4 * H, 4 * W)[..., : 4 * hh, : 4 * ww]


def assert_native_equals_reference(model, forward) -> list:
    """``forward(model)``'s output and every parameter gradient (of its mean square) with the native kernels
    equal those with the plain-PyTorch reference (float64 tolerances); returns the native gradients."""
    from megan_fast.ops import use_backend

    res = {}
    for backend in ("native", "reference"):
        model.zero_grad(set_to_none=True)
        with use_backend(backend):
            out = forward(model)
            out.square().mean().backward()
        res[backend] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(res["native"][0], res["reference"][0], rtol=1e-10, atol=1e-12)
    for a, e in zip(res["native"][1], res["reference"][1]):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-12)
    return res["native"][1]
