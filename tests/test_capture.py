"""MEGAN as one graph: the restructured blocks equal the previous formulation, no host syncs, compiled == eager.

docs/DESIGN.md section 3 ("Launch count and capture").
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megan_fast.models import MEGAN
from megan_fast.models.blocks import DeformableConvLSTM
from _models import TINY_MEGAN, TINY_SIZES
from megan_fast.models.blocks import LMGA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(TINY_MEGAN, num_input_frames=3)


def randomise(module: torch.nn.Module, std: float = 0.1) -> None:
    """Every parameter random (the zero-initialised offset convs and W_z would hide whole paths)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


# --------------------------------------------------------------------------- the previous formulation


def convlstm_two_passes(m: DeformableConvLSTM, x: torch.Tensor) -> torch.Tensor:
    """The bidirectional ConvLSTM as first written: each direction in its own loop, each step building the
    pyramids of cat(x, state), gates from four separate activations, x2 upsampling by F.interpolate."""

    def up2(t):
        return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

    def pyramid_align(pa, a, b):
        lrelu = lambda t: F.leaky_relu(t, 0.1)  # noqa: E731
        offset = lrelu(pa.l3_offset_conv2(lrelu(pa.l3_offset_conv1(torch.cat((a[2], b[2]), 1)))))
        fea = lrelu(dcn(pa.l3_dcn, a[2], offset))
        for i, lvl in ((1, "l2"), (0, "l1")):
            c1, c2, c3 = (getattr(pa, f"{lvl}_offset_conv{k}") for k in (1, 2, 3))
            new_offset = lrelu(c1(torch.cat((a[i], b[i]), 1)))
            new_offset = lrelu(c2(torch.cat((new_offset, up2(offset) * 2), 1)))
            offset = lrelu(c3(new_offset))
            fea = getattr(pa, f"{lvl}_fea_conv")(torch.cat((dcn(getattr(pa, f"{lvl}_dcn"), a[i], offset), up2(fea)), 1))
            if i == 1:
                fea = lrelu(fea)
        return fea

    def dcn(pack, t, feat):
        o1, o2, mk = torch.chunk(pack.conv_offset(feat), 3, dim=1)
        from megan_fast.ops import modulated_deform_conv2d

        return modulated_deform_conv2d(t, torch.cat((o1, o2), 1), pack.weight, pack.bias, pack.stride, pack.padding,
                                       pack.dilation, torch.sigmoid(mk))

    def easy_pcd(e, f1, f2):
        b = f1.shape[0]
        levels = e.pyramid(torch.cat((f1, f2), 0))
        a, c = tuple(t[:b] for t in levels), tuple(t[b:] for t in levels)
        return e.pcd.fusion(torch.cat((pyramid_align(e.pcd.align_1to2, a, c), pyramid_align(e.pcd.align_2to1, c, a)), 1))

    def run(frames):
        h = torch.zeros_like(frames[0])
        c = torch.zeros_like(frames[0])
        outs = []
        for f in frames:
            h = easy_pcd(m.pcd_h, f, h)
            c = easy_pcd(m.pcd_c, f, c)
            i, fg, o, g = torch.split(m.cell(torch.cat((f, h), 1)), m.nf, dim=1)
            c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return outs

    b, t, c, hh, ww = x.shape
    frames = list(x.unbind(1))
    fwd, bwd = run(frames), run(frames[::-1])[::-1]
    both = torch.cat((torch.stack(fwd, 1), torch.stack(bwd, 1)), 2).reshape(b * t, 2 * c, hh, ww)
    return m.fusion(both).reshape(b, t, c, hh, ww)


def test_convlstm_equals_the_two_pass_formulation_forward_and_gradients():
    torch.manual_seed(0)
    m = DeformableConvLSTM(8, 2).double()
    randomise(m)
    x = torch.randn(2, 5, 8, 8, 12, dtype=torch.float64, requires_grad=True)
    new = m(x)
    g_new = torch.autograd.grad(new.square().sum(), [x, *m.parameters()])
    old = convlstm_two_passes(m, x)
    g_old = torch.autograd.grad(old.square().sum(), [x, *m.parameters()])
    torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-12)
    for name, a, e in zip(["x", *(n for n, _ in m.named_parameters())], g_new, g_old):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda msg: f"{name}: {msg}")


def test_demo_checkpoint_gives_the_frames_it_gave_before_the_restructuring():
    from safetensors.torch import load_file

    ref = load_file(os.path.join(ROOT, "tests", "data", "demo_forward_reference.safetensors"))
    model = MEGAN.from_pretrained(os.path.join(ROOT, "megan_fast", "checkpoints", "demo")).eval()
    with torch.no_grad():
        out = model(ref["input"])
    torch.testing.assert_close(out, ref["output"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- LMGA memory frames


def test_eval_memory_frames_are_round_linspace():
    for t in [*range(1, 60), 200, 999]:
        for tau in [*range(1, 24), 40, 64]:
            want = [int(i) for i in torch.linspace(0, t - 1, tau).round().long()]
            assert LMGA.eval_indices(t, tau) == want, (t, tau)


def test_memory_indices_as_a_tensor_equal_the_list():
    torch.manual_seed(0)
    m = LMGA(8, tau=3, hidden=4).double()
    randomise(m)
    feats = torch.randn(2, 5, 8, 4, 6, dtype=torch.float64)
    m.train()
    torch.testing.assert_close(m(feats, torch.tensor([4, 0, 2])), m(feats, [4, 0, 2]), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"int64 \(or int32\) tensor of shape"):
        m(feats, torch.tensor([0.0, 1.0, 2.0]))


def test_training_draws_follow_the_module_generator_and_resume_exactly():
    a, b = LMGA(8, tau=3, seed=5), LMGA(8, tau=3, seed=5)
    draws = [a.draw_memory_indices(7) for _ in range(3)]
    state = b.generator.get_state()
    b.generator.set_state(state)
    assert all(torch.equal(d, b.draw_memory_indices(7)) for d in draws)
    assert draws[0].dtype == torch.int64 and draws[0].device.type == "cpu"
    assert sorted(LMGA(8, tau=4, seed=1).draw_memory_indices(2).tolist())[-1] < 2  # with replacement when T < tau


# --------------------------------------------------------------------------- no host syncs


class HostWatch(TorchDispatchMode):
    """Records ops that wait for the device (a value read on the host) or copy host memory into a device
    tensor (illegal inside CUDA-graph capture)."""

    SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose", "_assert_async"}

    def __init__(self):
        super().__init__()
        self.syncs, self.host_copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCS:
            self.syncs.append(name)
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in inputs) and any(t.device.type == "meta" for t in outputs):
            self.host_copies.append(name)
        return out


def test_no_host_sync_in_an_eval_forward_or_a_training_step():
    # On the meta device every value read on the host fails, and host-to-device copies are visible.
    with torch.device("meta"):
        model = MEGAN(**TINY, memory_seed=1)
        x = torch.rand(2, 3, 3, 8, 12)
    # a captured training step copies its fresh draw into a static device tensor before each replay
    idx = model.lmga.draw_memory_indices(model.config.num_output_frames).to("meta")
    watch = HostWatch()
    with watch:
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        loss = model(x, memory_indices=idx).square().mean()
        loss.backward()
    assert watch.syncs == [] and watch.host_copies == [], (watch.syncs, watch.host_copies)


def test_no_host_sync_in_tmnet_at_several_times():
    # times given as a list become fill kernels on the device, not host-to-device copies
    from megan_fast.models import MEGANConfig

    with torch.device("meta"):
        model = MEGAN(MEGANConfig.tmnet(**TINY_SIZES))
        x = torch.rand(1, 3, 3, 8, 8)
    watch = HostWatch()
    with watch:
        out = model(x, times=[0.25, 0.5, 0.75])
        out.square().mean().backward()
    assert out.shape == (1, 9, 3, 32, 32)
    assert watch.syncs == [] and watch.host_copies == [], (watch.syncs, watch.host_copies)


def test_the_watch_sees_a_host_sync():
    watch = HostWatch()
    with watch:
        torch.ones(3).sum().item()
        torch.ones(2).to("meta")
    assert watch.syncs == ["_local_scalar_dense"] and watch.host_copies


# --------------------------------------------------------------------------- torch.compile


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = MEGAN(**{**TINY, "num_input_frames": 2}, memory_seed=3)
    randomise(model)
    return model


def test_compiled_eval_forward_equals_eager(tiny_model, scalar_inductor):
    # The one test that compiles the whole forward with inductor (C++ code generation: a minute on 2 cores).
    x = torch.rand(1, 2, 3, 8, 12)
    tiny_model.eval()
    compiled = torch.compile(tiny_model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), tiny_model(x), rtol=1e-5, atol=1e-6)


def test_compiled_training_step_equals_eager(tiny_model):
    # fullgraph dynamo tracing and AOTAutograd's joint forward + backward graph, where the ops' fake kernels,
    # autograd formulas and the capturable LMGA draws matter; inductor's code generation (minutes for a
    # backward graph on 2 cores) is covered by the eval forward above.
    x, idx = torch.rand(2, 2, 3, 8, 12), torch.tensor([0, 2])
    tiny_model.train()
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    params = list(tiny_model.parameters())
    out_c = compiled(x, memory_indices=idx)
    g_c = torch.autograd.grad(out_c.square().mean(), params)
    out_e = tiny_model(x, memory_indices=idx)
    g_e = torch.autograd.grad(out_e.square().mean(), params)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- inference batches


class Replay(torch.nn.Module):
    """A model whose every call overwrites one output buffer, as a CUDA-graph replay does; records batch sizes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.buffer, self.batches = model, model.config, None, []

    def forward(self, x):
        out = self.model(x)
        self.batches.append(x.shape[0])
        if self.buffer is None or self.buffer.shape != out.shape:
            self.buffer = torch.empty_like(out)
        return self.buffer.copy_(out)


def test_fixed_shape_batches_copy_frames_out_of_a_reused_output_buffer():
    from megan_fast.inference import iter_upscale

    model = MEGAN(**TINY).eval()
    randomise(model)
    frames = torch.rand(9, 3, 8, 10).unbind(0)
    want = list(iter_upscale(model, frames, batch=2, fixed_shape=True))
    replay = Replay(model)
    got = list(iter_upscale(replay, frames, batch=2, fixed_shape=True))  # every frame kept until the end
    assert len(got) == 17 and replay.batches == [2, 2]  # 4 windows (the last aligned to the end), 2 per call
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    tiled = Replay(model)
    list(iter_upscale(tiled, frames, tile=16, batch=2, fixed_shape=True))  # a tile covering the frame: no tiles
    assert tiled.batches == [2, 2]
    cut = Replay(model)
    list(iter_upscale(cut, frames, tile=6, tile_overlap=2, batch=3, fixed_shape=True))  # 4 tiles per window
    assert cut.batches == [3, 3] * 4
