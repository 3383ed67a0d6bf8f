"""Model factory: per-group lr/wd as configured, no decay on bias/norm, frozen parts stay frozen
(weights and BatchNorm statistics), local weights load through timm's pretrained path, missing
weights are one sentence and exit code 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from curation.config import PRESETS, Hyper, ModelSpec, TrainSettings
from models import factory
from models.fit import build


def spec(arch="test_resnet", mode="finetune", **kw) -> ModelSpec:
    return ModelSpec(name="m", arch=arch, mode=mode, pretrained=False, **kw)


def by_name(groups: factory.Groups) -> dict[str, dict]:
    return {g["name"]: g for g in groups.optim}


def test_resnet_finetune_groups_are_the_seeds():
    model = factory.create(spec(), 5)
    hyper = Hyper(**PRESETS["resnet34-finetune"]["hyper"])  # fc 5e-3 / 1e-3, layer4 5e-4 / 1e-2
    g = by_name(factory.param_groups(model, spec(), hyper))
    assert (g["head"]["lr"], g["head"]["weight_decay"]) == (5e-3, 1e-3)
    assert (g["backbone"]["lr"], g["backbone"]["weight_decay"]) == (pytest.approx(5e-4), 1e-2)
    assert g["head_no_decay"]["weight_decay"] == 0 and g["backbone_no_decay"]["weight_decay"] == 0
    assert g["backbone_no_decay"]["lr"] == pytest.approx(5e-4)
    assert g["head"]["names"] == ["fc.weight"] and g["head_no_decay"]["names"] == ["fc.bias"]
    assert all(n.startswith("layer4.") for n in g["backbone"]["names"] + g["backbone_no_decay"]["names"])
    # every bias and norm parameter trained is in a no-decay group, every matrix in a decaying one
    params = dict(model.named_parameters())
    for key in g:
        for n in g[key]["names"]:
            assert (params[n].ndim <= 1) == key.endswith("no_decay"), n
    trained = {n for key in g for n in g[key]["names"]}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("layer3.", "conv1", "bn1")) for n in trained)


def test_efficientnet_finetune_takes_last_stage_and_head_conv():
    model = factory.create(spec("test_efficientnet"), 3)
    s = spec("test_efficientnet")
    prefixes = factory.finetune_prefixes(model, s)
    assert prefixes == ["blocks.4", "conv_head", "bn2"]  # like the seed's features.6 + features.7
    g = by_name(factory.param_groups(model, s, Hyper(lr=0.004, backbone_factor=8, wd_head=0.1, wd_backbone=0.2)))
    assert g["backbone"]["lr"] == pytest.approx(0.0005) and g["backbone"]["weight_decay"] == 0.2
    assert g["head"]["names"] == ["classifier.weight"]
    explicit = spec("test_efficientnet", finetune_modules=["blocks.3", "blocks.4"])
    assert factory.finetune_prefixes(model, explicit) == ["blocks.3", "blocks.4"]


def test_head_mode_trains_only_the_classifier():
    model = factory.create(spec(mode="head"), 4)
    g = factory.param_groups(model, spec(mode="head"))
    assert {x["name"] for x in g.optim} == {"head", "head_no_decay"}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("mode", ["head", "finetune"])
def test_frozen_weights_and_bn_statistics_do_not_move(mode):
    torch.manual_seed(0)
    settings = TrainSettings(models=[], freeze_bn_stats=True)
    module = build(spec(mode=mode), Hyper(lr=0.05, backbone_factor=1), settings, 3)
    model = module.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = {n: b.detach().clone() for n, b in model.named_buffers() if "running" in n}
    assert frozen and stats
    opt = module.configure_optimizers()["optimizer"]
    module.train()  # what Lightning calls at the start of every epoch
    assert not model.layer4[0].bn1.training and not model.bn1.training and model.fc.training
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32) * 3 + 1, torch.randint(0, 3, (8,))
        loss, _, _ = module.model_step((x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, before in frozen.items():
        assert torch.equal(before, dict(model.named_parameters())[n]), n
    for n, before in stats.items():
        assert torch.equal(before, dict(model.named_buffers())[n]), n
    assert any(not torch.equal(v, dict(model.named_parameters())[n]) for n, v in trained.items())


def test_bn_statistics_move_when_not_frozen():
    """The control for the test above: with freeze_bn_stats off the same steps move them."""
    module = build(spec(mode="finetune"), Hyper(), TrainSettings(models=[], freeze_bn_stats=False), 3)
    before = module.model.bn1.running_mean.clone()
    module.train()
    module.model_step((torch.randn(8, 3, 32, 32) + 1, torch.randint(0, 3, (8,))))
    assert not torch.equal(before, module.model.bn1.running_mean)


def test_local_weights_file_loads_through_timm(tmp_path):
    import timm

    src = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    got = factory.create(ModelSpec(name="m", arch="test_efficientnet", weights=path), 3)
    assert torch.equal(got.conv_stem.weight, src.conv_stem.weight)
    assert torch.equal(got.blocks[4][0].conv_pw.weight, src.blocks[4][0].conv_pw.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"nothing": torch.zeros(1)}, bad)
    with pytest.raises(factory.WeightsUnavailable, match="does not fit"):
        factory.create(ModelSpec(name="m", arch="test_efficientnet", weights=bad), 3)


def test_missing_weights_is_one_sentence_and_exit_2(tmp_path, published):
    from curation.cli import app

    with pytest.raises(factory.WeightsUnavailable) as e:
        factory.create(ModelSpec(name="m", arch="test_resnet", pretrained=True), 3)
    assert "cannot be downloaded" in str(e.value) and "\n" not in str(e.value)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "name: toy\nclasses: [{name: red}, {name: green}, {name: blue}]\n"
        "train:\n  models: [{name: r, arch: test_resnet, weights: missing.pth}]\n  image_size: 32\n")
    res = CliRunner().invoke(app, ["train", "--manifest", str(manifest), "--workdir", str(tmp_path / "ws")])
    assert res.exit_code == 2, res.output
    err = res.output.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the weights file") and "missing.pth" in err[0]
    assert np.isscalar(res.exit_code)


def test_unreachable_hub_fails_fast_and_still_loads_cached_weights(tmp_path):
    """HF_HUB_OFFLINE unset and the hub down: one short probe, not ~50 s of retries. Weights already
    in the cache load at once; missing ones fail at once, with the whole sentence."""
    import timm
    from safetensors.torch import save_file

    from tests.unreachable_hub import load_in_fresh_process

    src = timm.create_model("test_resnet", pretrained=False)
    repo = tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"  # huggingface_hub's cache layout
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, repo / "snapshots" / commit / "model.safetensors")

    cached, missing = load_in_fresh_process("timm", tmp_path / "hf")
    assert cached["error"] is None and cached["seconds"] < 5, cached
    assert missing["error"] == "WeightsUnavailable" and missing["seconds"] < 5, missing
    msg = missing["message"]
    assert "\n" not in msg and "cannot be reached (ConnectError" in msg and "Connection refused" in msg
    assert msg.endswith("set train.models[m].weights to a local file or pretrained: false."), msg
