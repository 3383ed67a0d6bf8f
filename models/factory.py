"""A ModelSpec in, a timm model with its trainable parameter groups out (head / last stages / frozen).

Groups follow the seed: the classifier at `lr` with `wd_head`; in finetune mode the backbone's last
stage(s) at `lr / backbone_factor` with `wd_backbone`; everything else frozen. Biases and norm
weights never decay (timm's rule: 1-d parameters). Works for any timm name: the classifier is the
model's own `pretrained_cfg['classifier']`, the stages come from its `feature_info`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from curation import hub
from curation.config import Hyper, ModelSpec, TrainMode
from curation.errors import JurassiclassError


class WeightsUnavailable(JurassiclassError, RuntimeError):
    """Pretrained weights cannot be loaded (offline, missing file); the message is one sentence."""


def _first_line(exc: BaseException) -> str:
    # Whole, never cut mid-word; the trailing full stop is ours to add.
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")


def create(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The timm model for ``spec`` with a fresh ``num_classes`` classifier."""
    import timm

    if spec.arch not in timm.list_models() and spec.arch.split(".")[0] not in timm.list_models():
        raise WeightsUnavailable(f"{spec.arch!r} is not a timm model name (see timm.list_models()).")
    if spec.weights is not None:
        path = Path(spec.weights)
        if not path.is_file():
            raise WeightsUnavailable(f"the weights file {path} for model {spec.name!r} does not exist.")
        try:
            # timm's own pretrained route: its key filtering, classifier replacement and checks apply.
            model = timm.create_model(spec.arch, pretrained=True, num_classes=num_classes,
                                      pretrained_cfg_overlay=dict(file=str(path)))
            _check_loaded(model, path)
            return model
        except WeightsUnavailable:
            raise
        except Exception as exc:
            raise WeightsUnavailable(
                f"the weights file {path} does not fit timm model {spec.arch!r}: {_first_line(exc)}."
            ) from exc
    if not spec.pretrained:
        return timm.create_model(spec.arch, pretrained=False, num_classes=num_classes)
    unreachable = None
    try:
        # An unreachable hub costs one short probe, not ~50 s of retries; cached weights still load.
        with hub.fail_fast() as unreachable:
            return timm.create_model(spec.arch, pretrained=True, num_classes=num_classes)
    except Exception as exc:
        why = f"they are not in the local cache and {unreachable}" if unreachable else _first_line(exc)
        raise WeightsUnavailable(
            f"pretrained weights for timm model {spec.arch!r} cannot be downloaded here ({why}); "
            f"set train.models[{spec.name}].weights to a local file or pretrained: false."
        ) from exc


def _check_loaded(model: nn.Module, path: Path) -> None:
    """timm loads non-strictly when it replaces the classifier: a file missing backbone tensors
    would silently leave them random. Every non-classifier tensor must come from the file."""
    from timm.models import load_state_dict

    have = set(load_state_dict(str(path)))
    head = classifier_prefixes(model)
    missing = [k for k in model.state_dict() if k not in have and not _under(k, head) and "num_batches_tracked" not in k]
    if missing:
        raise WeightsUnavailable(
            f"the weights file {path} does not fit timm model {model.default_cfg.get('architecture', type(model).__name__)!r}: "
            f"{len(missing)} backbone tensors missing (e.g. {missing[0]})."
        )


def classifier_prefixes(model: nn.Module) -> list[str]:
    """Module names of the classifier (timm's pretrained_cfg['classifier'], one or several)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "fc"
    names = [names] if isinstance(names, str) else list(names)
    mods = dict(model.named_modules())
    found = [n for n in names if n in mods]
    if not found:
        raise ValueError(f"cannot find the classifier {names} of {type(model).__name__}")
    return found


def stage_prefixes(model: nn.Module) -> list[str]:
    """Module names of the backbone's stages, first to last (timm's feature_info)."""
    info = getattr(model, "feature_info", None) or []
    out = []
    for entry in info:
        name = entry.get("module") if isinstance(entry, dict) else None
        if name and name not in out:
            out.append(name)
    return out


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def finetune_prefixes(model: nn.Module, spec: ModelSpec) -> list[str]:
    """Backbone parameter-name prefixes trained in finetune mode: explicit, else the last
    ``spec.last_stages`` stages plus every non-classifier module registered after them
    (EfficientNet's conv_head/bn2, like the seed's features.6 + features.7)."""
    if spec.finetune_modules:
        return list(spec.finetune_modules)
    head = classifier_prefixes(model)
    stages = stage_prefixes(model)
    if not stages:
        raise ValueError(f"{spec.arch} has no feature_info stages: set finetune_modules for model {spec.name!r}")
    first = stages[-spec.last_stages] if spec.last_stages <= len(stages) else stages[0]
    names = [n for n, _ in model.named_parameters()]
    start = next((i for i, n in enumerate(names) if _under(n, [first])), None)
    if start is None:
        raise ValueError(f"stage {first!r} of {spec.arch} has no parameters")
    out: list[str] = []
    for n in names[start:]:
        if _under(n, head):
            continue
        # the top-level child (or the stage itself) the parameter belongs to
        p = next((s for s in stages if _under(n, [s])), n.split(".")[0])
        if p not in out:
            out.append(p)
    return out


def no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


@dataclass
class Groups:
    """Optimizer parameter groups plus the frozen part, as named lists (inspectable in tests)."""

    optim: list[dict] = field(default_factory=list)  # {"name", "params", "lr", "weight_decay", "names"}
    frozen: list[str] = field(default_factory=list)  # parameter names with requires_grad False
    frozen_modules: list[str] = field(default_factory=list)  # module names whose norm stats stay frozen


def param_groups(model: nn.Module, spec: ModelSpec, hyper: Hyper | None = None) -> Groups:
    """Freeze what the mode does not train; return AdamW groups with the spec's lr/wd per group."""
    hyper = hyper or spec.hyper
    head = classifier_prefixes(model)
    if spec.mode is TrainMode.head:
        backbone: list[str] = []
    elif spec.mode is TrainMode.finetune:
        backbone = finetune_prefixes(model, spec)
    else:
        backbone = [n for n, _ in model.named_children() if n not in head]
    buckets: dict[str, tuple[list, list]] = {k: ([], []) for k in ("head", "head_no_decay", "backbone", "backbone_no_decay")}
    g = Groups()
    for name, p in model.named_parameters():
        part = "head" if _under(name, head) else "backbone" if _under(name, backbone) else None
        if part is None:
            p.requires_grad_(False)
            g.frozen.append(name)
            continue
        p.requires_grad_(True)
        key = part + ("_no_decay" if no_decay(name, p) else "")
        buckets[key][0].append(p)
        buckets[key][1].append(name)
    lr_bb = hyper.lr / hyper.backbone_factor
    settings = {"head": (hyper.lr, hyper.wd_head), "head_no_decay": (hyper.lr, 0.0),
                "backbone": (lr_bb, hyper.wd_backbone), "backbone_no_decay": (lr_bb, 0.0)}
    for key, (params, names) in buckets.items():
        if params:
            lr, wd = settings[key]
            g.optim.append({"name": key, "params": params, "lr": lr, "weight_decay": wd, "names": names})
    g.frozen_modules = [n for n, _ in model.named_children() if n not in head]
    return g


def norm_layers(model: nn.Module, prefixes: list[str]) -> list[nn.Module]:
    """BatchNorm-like layers (anything with running statistics) under the given module names."""
    out = []
    for name, m in model.named_modules():
        if _under(name, prefixes) and isinstance(m, nn.modules.batchnorm._NormBase):
            out.append(m)
    return out


def channels_last_ok(device: torch.device) -> bool:
    return device.type == "cuda"
