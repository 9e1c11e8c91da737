"""Load an open_clip model and its tokenizer, online or offline, with errors a user can act on.

``pretrained`` is either an open_clip pretrained tag ("openai", "laion2b_s34b_b79k", ...), a path
to a local weights file (safetensors, or a torch state dict read with ``weights_only=True``;
nothing is ever fully unpickled), or ``None`` / ``"random"`` for random weights (tests only).

Tags are resolved to a file here rather than inside open_clip, for two reasons: offline, the
Hugging Face client retries each missing file for ~45 s before failing, so we probe the hub once
(a few seconds at most) and otherwise look only in the local caches; and a tag that cannot be
fetched must become one ``ConfigError`` that tells the user both ways out (a tag on a machine
with internet, or ``--pretrained /path/to/weights`` offline).

``tiny-vit`` and ``tiny-rn`` are registered as extra open_clip model names: a few-layer ViT and
ModifiedResNet with a one-layer text tower, so tests build a real CLIP in milliseconds.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import urlparse

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: An open_clip CLIP model: an ``nn.Module`` with ``visual``, ``encode_text`` and
#: ``encode_image``. open_clip ships no type information, so its attributes are dynamic.
ClipModel: TypeAlias = Any

#: Tiny model names registered with open_clip on first use, and the tower they use.
TINY_MODELS: dict[str, Literal["vit", "resnet"]] = {"tiny-vit": "vit", "tiny-rn": "resnet"}
#: ``pretrained`` values meaning "random weights".
RANDOM = ("random", "none", "")
#: Seed of random CLIP weights: reruns and resumed runs must see the same "teacher".
RANDOM_WEIGHTS_SEED = 0
#: Suffixes that make a ``pretrained`` value a path even if the file is missing.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
#: Examples listed when a model name is unknown.
COMMON_MODELS = ("ViT-B-16", "ViT-B-32", "ViT-L-14", "RN50", "RN101")

_registered = False
_T = TypeVar("_T")


def tiny_model_config(kind: Literal["vit", "resnet"]) -> dict[str, Any]:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) a few KB big.

    The text tower keeps CLIP's real tokenizer geometry (context 77, vocabulary 49408) so the
    standard tokenizer works; only widths and depths shrink.
    """
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    if kind == "vit":
        # open_clip derives ViT heads as width // head_width: 64 // 32 = 2 heads.
        vision_cfg: dict[str, Any] = {"image_size": 64, "layers": 2, "width": 64,
                                      "head_width": 32, "patch_size": 16}
    elif kind == "resnet":
        # A list of layers selects ModifiedResNet; its attention-pool heads are
        # width * 32 // head_width = 16 * 32 // 64 = 8, as in CLIP's RN models.
        vision_cfg = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None}
    else:
        raise ConfigError("model", f"tiny model kind must be 'vit' or 'resnet', got {kind!r}")
    return {"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def register_tiny_models() -> None:
    """Make ``tiny-vit`` and ``tiny-rn`` known to ``open_clip.create_model``/``get_tokenizer``.

    open_clip's public way to add a model is a JSON file; it reads the file at once, so a
    temporary folder is enough (later rescans skip the vanished folder and keep the entries).
    """
    global _registered
    import open_clip

    if _registered and all(name in open_clip.list_models() for name in TINY_MODELS):
        return
    with tempfile.TemporaryDirectory(prefix="clip2scene_tiny_") as tmp:
        for name, kind in TINY_MODELS.items():
            (Path(tmp) / f"{name}.json").write_text(json.dumps(tiny_model_config(kind)))
        open_clip.add_model_config(tmp)
    _registered = True


def both_options(model: str) -> str:
    """The two ways to get CLIP weights, named in every weights error."""
    return (f"either pass an open_clip pretrained tag (e.g. --pretrained openai) on a machine with "
            f"internet access, or download the {model} weights elsewhere and pass "
            f"--pretrained /path/to/weights (.safetensors or a torch state dict) offline")


def _is_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(WEIGHT_SUFFIXES)


def _hub_reachable(url: str, timeout: float = 3.0) -> bool:
    """One quick TCP probe of the download host; proxies are trusted to know better."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(url).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_weights(cfg: dict[str, Any]) -> str | None:
    """The tag's weights if an earlier download left them in the HF or open_clip cache."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import download_pretrained_from_url

    hub = cfg.get("hf_hub", "")
    if hub:
        model_id, filename = os.path.split(hub)
        # open_clip's default file names, safetensors first (what download_pretrained prefers)
        names = [filename] if filename else []
        names = [n.rsplit(".", 1)[0] + ".safetensors" for n in names if n.endswith(".bin")] + names
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(model_id, name)
            if isinstance(found, str) and Path(found).is_file():
                return found
    url = cfg.get("url", "")
    if url:
        target = Path("~/.cache/clip").expanduser() / Path(urlparse(url).path).name
        if target.is_file():
            # open_clip verifies the SHA-256 of a cached file and returns it without networking
            return download_pretrained_from_url(url)
    return None


def _resolve_tag(model: str, tag: str) -> tuple[str, dict[str, Any]]:
    """Local file of an open_clip pretrained tag: downloaded, or from the cache when offline."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ConfigError("pretrained", f"{tag!r} is not a file and not an open_clip pretrained "
                          f"tag for {model} (tags: {tags or 'none'}); {both_options(model)}")
    host = "https://huggingface.co" if cfg.get("hf_hub") else cfg.get("url", "")
    cached = _cached_weights(cfg)
    if cached:
        return cached, cfg
    if not _hub_reachable(host):
        raise ConfigError("pretrained", f"cannot download open_clip weights {model}/{tag}: no "
                          f"network and no cached copy; {both_options(model)}")
    try:
        # open_clip looks up module attributes at call time, so tests can stub the download
        path = oc_pretrained.download_pretrained(cfg)
    except Exception as exc:  # network, HTTP and hub errors all mean "not downloadable"
        raise ConfigError("pretrained", f"cannot download open_clip weights {model}/{tag} "
                          f"({type(exc).__name__}: {exc}); {both_options(model)}") from exc
    if not path or not Path(path).is_file():
        raise ConfigError("pretrained", f"open_clip returned no weights for {model}/{tag}; "
                          f"{both_options(model)}")
    return path, cfg


def _check_weights_file(path: Path, model: str) -> None:
    """Refuse, before open_clip reads it, anything that would need a full unpickle."""
    if path.suffix == ".safetensors":
        return  # safetensors holds raw tensors only
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ConfigError("pretrained", f"{path} is neither safetensors nor a torch state dict "
                          f"readable with weights_only=True ({type(exc).__name__}); TorchScript "
                          "archives such as OpenAI's original ViT-B-16.pt must be converted to "
                          f"a state dict first; {both_options(model)}") from exc


def _canonical_model(model: str) -> str:
    import open_clip

    register_tiny_models()
    name = model.replace("/", "-")  # OpenAI spells them "ViT-B/16"
    known = open_clip.list_models()
    if name not in known:
        raise ConfigError("model", f"unknown open_clip model {model!r}; e.g. "
                          f"{', '.join(COMMON_MODELS)}, {', '.join(TINY_MODELS)} "
                          f"(all {len(known)}: open_clip.list_models())")
    return name


@dataclass(frozen=True)
class Weights:
    """Where ``load_clip`` takes a model's weights from, and what a pretrained tag adds."""

    checkpoint: Path | None  # None: random weights
    #: open_clip ``create_model`` overrides a tag implies (``force_quick_gelu``, ...)
    overrides: dict[str, Any]


def resolve_weights(name: str, pretrained: str | None) -> Weights:
    """The weights file of ``pretrained`` (a tag is downloaded or found in a cache), or None
    for random weights; see :func:`load_clip` for the errors."""
    if pretrained is None or pretrained.strip().lower() in RANDOM:
        return Weights(None, {})
    if Path(pretrained).expanduser().is_file():
        checkpoint = Path(pretrained).expanduser()
        _check_weights_file(checkpoint, name)
        return Weights(checkpoint, {})
    if _is_path(pretrained):
        raise ConfigError("pretrained", f"weights file {pretrained!r} does not exist; "
                          f"{both_options(name)}")
    file, cfg = _resolve_tag(name, pretrained)
    # What open_clip would apply for the tag itself: OpenAI weights were trained with
    # QuickGELU (plain "ViT-B-16" + "openai" otherwise silently runs the wrong activation),
    # and the tag's own image normalisation.
    return Weights(Path(file), {
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
        "force_preprocess_cfg": {k: cfg[k] for k in ("mean", "std", "interpolation",
                                                     "resize_mode") if k in cfg}})


def weights_identity(model: str, pretrained: str | None) -> dict[str, Any] | None:
    """What decides the numbers :func:`seeded_clip` loads, found without loading them: the
    model, the open_clip and torch versions (architecture and random draws), and the seed or
    the weights file (path, size, modification time and its first and last MiB). A tag counts
    by the file an earlier download left; None for a tag with no such file (nothing is
    downloaded here) or a name that is not a file or tag."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    from .store import file_edges_hash

    name = _canonical_model(model)
    identity: dict[str, Any] = {"model": name, "open_clip": open_clip.__version__,
                                "torch": torch.__version__}
    if pretrained is None or pretrained.strip().lower() in RANDOM:
        return {**identity, "random_seed": RANDOM_WEIGHTS_SEED}
    path = Path(pretrained).expanduser()
    if not path.is_file():
        cfg = oc_pretrained.get_pretrained_cfg(name, pretrained)
        found = _cached_weights(cfg) if cfg and not _is_path(pretrained) else None
        if found is None:
            return None
        identity["tag"] = pretrained
        path = Path(found)
    stat = path.resolve().stat()
    return {**identity, "file": str(path.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "edges": file_edges_hash(path)}


def load_clip(model: str, pretrained: str | None, device: str = "cpu"
              ) -> tuple[ClipModel, Any]:
    """``(model, tokenizer)`` for an open_clip model name, in eval mode on ``device``.

    Args:
        model: an open_clip model name ("ViT-B-16", "RN50", "tiny-vit", ...).
        pretrained: an open_clip pretrained tag, a local weights file, or ``None``/``"random"``.
        device: torch device for the model.
    Raises:
        ConfigError: unknown model, unknown tag, missing or unreadable file, or a tag that cannot
            be downloaded (the message names both ways to get weights).
    """
    import open_clip

    name = _canonical_model(model)
    weights = resolve_weights(name, pretrained)
    checkpoint = weights.checkpoint
    if checkpoint is None:
        warnings.warn(f"CLIP {name} has random weights: its text bank and labels are meaningless "
                      "(use this for tests only)", UserWarning, stacklevel=2)
    try:
        clip = open_clip.create_model(name, pretrained=str(checkpoint) if checkpoint else None,
                                      device=device, weights_only=True, **weights.overrides)
    except ConfigError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        # strict state-dict loading: the file is for another architecture
        raise ConfigError("pretrained", f"cannot load {checkpoint} into {name}: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
    clip.eval()
    tokenizer = open_clip.get_tokenizer(name)
    log.info("loaded CLIP %s (%s) on %s", name, checkpoint or "random weights", device)
    return clip, tokenizer


def load_image_tower(model: str, pretrained: str | None, device: str = "cpu"
                     ) -> torch.nn.Module | None:
    """CLIP's image tower alone, equal to ``load_clip(model, pretrained)[0].visual`` (same
    weights, same ``preprocess_cfg``), without building the text tower; None where that cannot
    be promised, and the caller loads the whole model.

    What labels images with a cached text bank needs only this: building ViT-B/16's text tower
    costs about as much as its image tower. open_clip has no public image-only constructor, so
    this calls the function its ``CLIP`` builds the tower with, only for configs that become a
    plain ``CLIP`` (no custom, Hugging Face or timm tower); the tests pin the equality with
    ``load_clip``. Random weights are equal when both are drawn from the same seed (``CLIP``
    builds its image tower first). A weights file whose image keys do not load strictly, as
    they are, gives None.
    """
    import open_clip
    from open_clip.factory import load_state_dict
    from open_clip.model import _build_vision_tower, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    name = _canonical_model(model)
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    if (cfg is None or cfg.get("custom_text") or "multimodal_cfg" in cfg
            or "timm_model_name" in cfg["vision_cfg"] or "hf_model_name" in cfg["text_cfg"]):
        return None
    weights = resolve_weights(name, pretrained)
    quick_gelu = bool(cfg.get("quick_gelu") or weights.overrides.get("force_quick_gelu"))
    if weights.checkpoint is None:
        warnings.warn(f"CLIP {name} has random weights: its labels are meaningless (use this "
                      "for tests only)", UserWarning, stacklevel=2)
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu)
    else:
        # on the meta device: no time spent drawing random weights the file replaces
        with torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu)
        state = load_state_dict(str(weights.checkpoint), weights_only=True)
        # the dtypes open_clip's copy into the built tower gives (a file may hold fp16)
        dtypes = {k: v.dtype for k, v in visual.state_dict().items()}
        own = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        own = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in own.items()}
        try:
            visual.load_state_dict(own, strict=True, assign=True)
        except RuntimeError as exc:
            log.info("image tower of %s: %s does not load as it is (%s); loading all of CLIP",
                     name, weights.checkpoint, str(exc).splitlines()[0][:200])
            return None
        if any(t.is_meta for t in (*visual.parameters(), *visual.buffers())):
            return None
    preprocess = merge_preprocess_dict(PreprocessCfg(), {"size": visual.image_size,
                                       **weights.overrides.get("force_preprocess_cfg", {})})
    set_model_preprocess_cfg(visual, preprocess)
    log.info("loaded the image tower of CLIP %s (%s) on %s", name,
             weights.checkpoint or "random weights", device)
    return visual.to(device).eval()


def _seeded(load: Callable[[str, str | None, str], _T], model: str, pretrained: str | None,
            device: str) -> _T:
    # random weights from a fixed seed, without touching the caller's RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return load(model, pretrained, device)


def seeded_clip(model: str, pretrained: str | None, device: str = "cpu") -> tuple[Any, Any]:
    """CLIP and its tokenizer; random weights come from a fixed seed without touching the
    caller's RNG state, so reruns and resumed runs see the same teacher and the same bank."""
    return _seeded(load_clip, model, pretrained, device)


def seeded_image_tower(model: str, pretrained: str | None, device: str = "cpu"
                       ) -> torch.nn.Module | None:
    """:func:`load_image_tower` with :func:`seeded_clip`'s random weights."""
    return _seeded(load_image_tower, model, pretrained, device)
