"""The one loader of weights, given files crafted to break it: no traceback, no pickle run, no memory bomb."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from _media import grey_frames
from _models import TINY_MEGAN, TINY_SIZES
from _official import official_state_dict
from megan_fast.cli.main import main
from megan_fast.errors import CheckpointError
from megan_fast.models import MEGAN, MEGANConfig, load_model
from megan_fast.models import loading as loading_module
from megan_fast.models import megan as megan_module
from megan_fast.models.loading import read_state_dict
from megan_fast.training.checkpoints import load_checkpoint


def _fuzz_files(folder, count=320, seed=1234):
    """Short files of random bytes, random bytes after a pickle's opening, and bits of a real torch.save file."""
    rng = random.Random(seed)
    torch.save({"conv_first.weight": torch.zeros(2, 3)}, folder / "real.pth")
    real = (folder / "real.pth").read_bytes()
    paths = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        elif kind == 1:  # pickle protocol 2 opening, then noise: the unpickler goes further in
            data = b"\x80\x02" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        elif kind == 2:  # a real file cut short
            data = real[: rng.randrange(1, len(real))]
        else:  # a real file with a few bytes changed
            data = bytearray(real)
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        path = folder / f"f{i}.pth"
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_fuzzed_pth_files_are_one_checkpoint_error_each(tmp_path):
    (tmp_path / "text.pth").write_text("hello\n")  # KeyError: 101 in the unpickler
    (tmp_path / "idx.pth").write_bytes(b"\x86%\xdf")  # IndexError
    named = [tmp_path / "text.pth", tmp_path / "idx.pth"]
    for path in named + _fuzz_files(tmp_path):
        try:
            read_state_dict(str(path))
        except CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
        # A file that happens to load as a state dict is fine too: only an escaped exception fails the test.
    for path in named:
        with pytest.raises(CheckpointError, match=r"not a readable PyTorch weights file \(not the bytes torch.save"):
            read_state_dict(str(path))


def test_the_training_checkpoint_reader_is_the_same_reader(tmp_path):
    (tmp_path / "iter_1.pt").write_text("hello\n")
    with pytest.raises(CheckpointError, match=r"iter_1.pt: not a megan-fast training checkpoint \(not the bytes"):
        load_checkpoint(str(tmp_path / "iter_1.pt"))


@pytest.mark.parametrize("command", [["convert", "{f}", "out"], ["upscale", "in", "out.mp4", "--checkpoint", "{f}"],
                                     ["eval", "--checkpoint", "{f}", "--data", "."]])
def test_a_text_file_as_checkpoint_is_one_line(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.pth").write_text("hello\n")
    grey_frames(tmp_path / "in", [0, 50, 100, 150])
    rc = main([a.replace("{f}", "text.pth") for a in command])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "text.pth: not a readable PyTorch weights file" in err
    assert not (tmp_path / "out").exists()


def test_a_pickle_payload_is_named_without_torch_allowlisting_advice(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("raise SystemExit(9)",))

    torch.save({"conv_first.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "evil.pth")
    msg = str(info.value)
    assert "holds Python objects (exec)" in msg and "add_safe_globals" not in msg and "allowlist" not in msg


# --------------------------------------------------------------------------- memory bombs


def test_expanded_views_are_refused_before_anything_is_built(tmp_path, monkeypatch):
    state = official_state_dict(nf=64, front=1, back=1, groups=8)
    base = torch.zeros(1)
    for i in range(1, 300):  # 300 blocks of 64 x 64 x 3 x 3 claimed, one float stored
        for conv in ("conv1", "conv2"):
            state[f"recon_trunk.{i}.{conv}.weight"] = base.expand(64, 64, 3, 3)
            state[f"recon_trunk.{i}.{conv}.bias"] = base.expand(64)
    torch.save(state, tmp_path / "bomb.pth")
    built = []
    monkeypatch.setattr(megan_module.MEGAN, "__init__", lambda self, *a, **k: built.append(1))
    with pytest.raises(CheckpointError, match=r"bomb.pth: its tensors claim [\d,.]+ MiB of values but the file "
                                              r"stores [\d,.]+ MiB \(views of shared or expanded storage\)"):
        load_model(tmp_path / "bomb.pth")
    assert built == []


def test_a_config_wider_than_its_weights_is_refused_from_the_header(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    MEGAN(MEGANConfig.zooming_slowmo(**TINY_SIZES)).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "nf": 1024}))  # 1024-wide: gigabytes if built
    real_init = megan_module.MEGAN.__init__
    devices = []

    def init(self, *args, **kwargs):
        devices.append(torch.empty(0).device.type)  # the default device the model would be built on
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(megan_module.MEGAN, "__init__", init)
    with pytest.raises(CheckpointError, match=r"config.json: the config's residual blocks alone have more parameters "
                                              r"than model.safetensors holds values"):
        load_model(folder)
    assert devices == []  # refused from the header alone
    (folder / "config.json").write_text(json.dumps({**cfg, "nf": 16}))  # small enough: compared on the meta device
    with pytest.raises(CheckpointError, match=r"model.safetensors: the weights do not fit this model's config "
                                              r"\(config.json\): \d+ tensor\(s\) of another shape"):
        load_model(folder)
    assert devices == ["meta"]


def test_a_model_larger_than_the_available_memory_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    MEGAN(MEGANConfig.zooming_slowmo(**TINY_SIZES)).save_pretrained(folder)
    state = {k: v.half() for k, v in official_state_dict(nf=64, front=1, back=1, groups=8).items()}
    torch.save(state, tmp_path / "z.pth")  # float16: the file reads, the float32 model does not fit
    params = sum(v.numel() for v in state.values())
    for path, free in ((folder, 1000), (tmp_path / "z.pth", 3 * params)):
        monkeypatch.setattr(loading_module, "available_memory", lambda free=free: free)
        with pytest.raises(CheckpointError, match=r"the model has [\d,]+ parameters and needs about [\d.]+ GiB to "
                                                  r"load; this machine has 0.0 GiB available"):
            load_model(path)


def test_available_memory_follows_the_address_space_limit():
    script = ("import resource, torch\n"
              "from megan_fast.models.loading import available_memory\n"
              "mapped = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
              "resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, resource.RLIM_INFINITY))\n"
              "print(available_memory())\n")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reading the process's mapped size needs /proc (Linux)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert 0 < int(out) <= 2**30


# --------------------------------------------------------------------------- messages


def test_an_official_file_of_another_width_says_only_nf_64_is_supported(tmp_path):
    # The official code at nf = 32: every layer 32 wide but upconv2, HRconv and conv_last, which stay 64 wide.
    torch.save(official_state_dict(nf=32, front=1, back=1, groups=8), tmp_path / "nf32.pth")
    with pytest.raises(CheckpointError, match=r"an official Zooming Slow-Mo file of nf = 32 \(conv_first.weight\); "
                                              r"only nf = 64 official files"):
        load_model(tmp_path / "nf32.pth")


def test_fp8_weights_are_an_unsupported_dtype(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtypes")
    state = official_state_dict(nf=64, front=1, back=1, groups=8)
    state["conv_first.weight"] = state["conv_first.weight"].to(torch.float8_e4m3fn)
    torch.save(state, tmp_path / "fp8.pth")
    with pytest.raises(CheckpointError, match="has dtype float8_e4m3fn, which is not supported; expected float16, "
                                              "bfloat16, float32 or float64"):
        load_model(tmp_path / "fp8.pth")


def test_official_files_are_recognised_by_names_and_shapes(tmp_path):
    from _official import official_state_dict as official

    zsm = official(nf=64, front=1, back=1, groups=8)
    tmnet = official(nf=64, front=1, back=1, groups=8, tmnet=True)
    # TMNet with a few of its own tensors missing is still TMNet; Zooming Slow-Mo with a stray one is not
    cut = {k: v for i, (k, v) in enumerate(tmnet.items()) if not (k.startswith("layersFusion.") and i % 2)}
    stray = {**zsm, "layersFusion.0.weight": tmnet["layersFusion.0.weight"]}
    for name, state, network in (("cut", cut, "TMNet"), ("stray", stray, "Zooming Slow-Mo")):
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=f"not the {network} network"):
            load_model(tmp_path / f"{name}.pth")
    torch.save({"conv_first.weight": torch.zeros(64, 3, 3, 3), "recon_trunk.0.conv1.weight": torch.zeros(3)},
               tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"not an official Zooming Slow-Mo or TMNet file: its tensors differ, "
                                              r"by name or shape, from Zooming Slow-Mo in \d+ of its \d+, TMNet in"):
        load_model(tmp_path / "none.pth")


def test_create_model_by_name_and_pretrained_through_the_one_loader(tmp_path):
    from megan_fast.errors import ConfigError
    from megan_fast.models import create_model, list_models

    assert list_models() == ["megan", "tmnet", "zooming_slowmo"] and list_models("*mo*") == ["zooming_slowmo"]
    tiny = TINY_SIZES
    model = create_model("tmnet", **tiny)
    assert model.training and model.config == MEGANConfig.tmnet(**tiny)
    model.save_pretrained(tmp_path / "tm")
    again = create_model("tmnet", pretrained=tmp_path / "tm", memory_seed=3)
    assert again.config.memory_seed == 3
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    torch.save(official_state_dict(nf=64, front=1, back=1, groups=8), tmp_path / "zsm.pth")
    assert create_model("zooming_slowmo", pretrained=tmp_path / "zsm.pth").config.family_name == "Zooming Slow-Mo"
    with pytest.raises(CheckpointError, match=r"holds a Zooming Slow-Mo network, not TMNet \('tmnet'\); "
                                              r"create_model\('zooming_slowmo', pretrained=...\) loads it"):
        create_model("tmnet", pretrained=tmp_path / "zsm.pth")
    with pytest.raises(CheckpointError, match="the overrides change the shapes of its weights"):
        create_model("tmnet", pretrained=tmp_path / "tm", nf=16)
    with pytest.raises(ConfigError, match="unknown model 'megan2'; known models: megan, tmnet, zooming_slowmo"):
        create_model("megan2")
    with pytest.raises(ConfigError, match="unknown field 'nff'"):
        create_model("megan", nff=3)
    with pytest.raises(CheckpointError, match="text.pth: not a readable PyTorch weights file"):
        (tmp_path / "text.pth").write_text("hello")
        create_model("megan", pretrained=tmp_path / "text.pth")


def test_torch_hub_loads_the_models_from_the_repository(tmp_path):
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = torch.hub.load(repo, "tmnet", source="local", **TINY_SIZES)
    assert model.config == MEGANConfig.tmnet(**TINY_SIZES)
    zsm = torch.hub.load(repo, "zooming_slowmo", source="local", **TINY_SIZES)
    assert zsm.config.family_name == "Zooming Slow-Mo"


def test_damaged_compressed_and_oversized_archives_are_refused_before_torch_reads_them(tmp_path):
    import zipfile

    torch.save(official_state_dict(nf=64, front=1, back=1, groups=8), tmp_path / "z.pth")
    data = bytearray((tmp_path / "z.pth").read_bytes())
    with zipfile.ZipFile(tmp_path / "z.pth") as archive:  # flip bytes inside the largest stored tensor
        member = max(archive.infolist(), key=lambda m: m.file_size)
        start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    for i in range(start, start + 64, 7):
        data[i] ^= 0x5A
    (tmp_path / "flipped.pth").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped.pth: not a readable PyTorch weights file \(CRC mismatch in "):
        load_model(tmp_path / "flipped.pth")
    with zipfile.ZipFile(tmp_path / "z.pth") as src, \
            zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(CheckpointError, match=r"member '.*' is compressed; torch.save stores its members uncompressed"):
        load_model(tmp_path / "deflated.pth")


def test_block_names_on_empty_tensors_do_not_build_a_huge_model(tmp_path):
    state = official_state_dict(nf=64, front=1, back=1, groups=8)
    for i in range(1, 3000):  # 3,000 block names on empty tensors: not 3,000 blocks
        state[f"recon_trunk.{i}.conv1.weight"] = torch.zeros(0)
    torch.save(state, tmp_path / "many.pth")
    with pytest.raises(CheckpointError, match=r"not an official Zooming Slow-Mo or TMNet file: .* Zooming Slow-Mo in 2999 "):
        load_model(tmp_path / "many.pth")
    folder = tmp_path / "m"
    MEGAN(MEGANConfig.zooming_slowmo(**TINY_SIZES)).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    for field, value, words in (("back_blocks", 20000, "more blocks than model.safetensors has tensors"),
                                ("nf", 10**9, "more parameters than model.safetensors holds values"),
                                ("memory_seed", 2**64, "memory_seed must be <= ")):
        (folder / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(CheckpointError, match=words):
            load_model(folder)
    (folder / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CheckpointError, match="not a readable JSON file"):
        load_model(folder)
    megan = tmp_path / "megan"
    MEGAN(**TINY_MEGAN).save_pretrained(megan)
    cfg_m = json.loads((megan / "config.json").read_text())
    (megan / "config.json").write_text(json.dumps({**cfg_m, "nonlocal_inner": 2**70}))  # overflows torch's sizes
    with pytest.raises(CheckpointError, match="a config this package cannot build"):
        load_model(megan)
    # 20,000 blocks beside as many empty tensors: the header has the tensors, not the values
    from safetensors.torch import save_file

    (folder / "config.json").write_text(json.dumps({**cfg, "back_blocks": 20000}))
    save_file({f"t{i}": torch.zeros(0) for i in range(80100)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="more parameters than model.safetensors holds values"):
        load_model(folder)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_tensors_a_model_cannot_hold_are_named_before_their_shapes_are_read(tmp_path):
    state = official_state_dict(nf=64, front=1, back=1, groups=8)
    state["conv_first.weight"] = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    torch.save(state, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="'conv_first.weight' is a nested tensor; expected plain dense weights"):
        load_model(tmp_path / "nested.pth")
