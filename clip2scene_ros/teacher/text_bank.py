"""Text banks: one CLIP text embedding per vocabulary class, stored as safetensors + YAML.

Recipe (CLIP2Scene's ``utils/prompt_engineering.py``): every class name goes into every prompt
template, each sentence is encoded and L2-normalised, the sentences are averaged and the mean is
L2-normalised again. Synonyms extend the recipe: the names ``(name, *synonyms)`` all go through
the same templates and the average runs over names × templates at once (every name has the same
number of templates, so this equals averaging per-name means). A class without synonyms gives
exactly CLIP2Scene's embedding.

Names are used as written: CLIP2Scene encodes nuScenes' "traffic_cone" and "other_flat" with the
underscore, so no underscore-to-space rewriting happens here; a vocabulary that wants spaces
writes them (or adds the spaced form as a synonym).

On disk a bank ``FILE`` is ``FILE.safetensors`` (key ``text_bank``, ``[C, D]`` float32) next to
``FILE.yaml`` (vocabulary, palette, prompt set, model, weights, versions, date, checksum).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from ..config import load_config, to_dict
from ..errors import ConfigError, IntegrityError
from ..files import load_checked_tensors, save_checked_tensors
from ..models.bundle import TEXT_BANK_KEY, VocabularySpec
from ..precision import DTYPES, check_precision, resolve_precision
from ..vocabulary import Vocabulary, builtin_vocabulary, load_vocabulary, names_a_file
from .prompts import DEFAULT_PROMPTS, load_prompts, prompts_name, validate_templates
from .text_tower import causal_tower

if TYPE_CHECKING:
    from .clip_loader import ClipModel

log = logging.getLogger(__name__)

BANK_FORMAT = "clip2scene_text_bank"
BANK_VERSION = 1
#: Rows must have unit L2 norm within this tolerance (float32 after renormalisation).
NORM_TOLERANCE = 1e-3


def class_prompts(names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every name in every template, name-major: ``[t.format(n) for n in names for t in ...]``."""
    return [template.format(name) for name in names for template in templates]


@torch.no_grad()
def encode_text_bank(model: ClipModel, tokenizer: Callable[[list[str]], torch.Tensor],
                     vocabulary: Vocabulary, templates: Sequence[str],
                     batch_size: int = 256, precision: str = "fp32") -> torch.Tensor:
    """``[C, D]`` float32 text bank with unit rows, one row per class in vocabulary order.

    ``precision`` is the text tower's (see :mod:`clip2scene_ros.precision`; ``auto`` is bf16 on
    a CPU with bf16 matrix units); reduced precision runs under autocast, so the model itself is
    not changed. A causal, end-token-pooled tower computes each template's common prefix once
    and each prompt only up to its end token (:mod:`.text_tower`, exact); any other tower runs
    every prompt at full length in batches of ``batch_size``.
    """
    templates = validate_templates(list(templates))
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    resolved = resolve_precision(precision, device)
    sentences: list[str] = []
    counts: list[int] = []
    for cls in vocabulary.classes:
        prompts = class_prompts((cls.name, *cls.synonyms), templates)
        sentences.extend(prompts)
        counts.append(len(prompts))
    started = time.perf_counter()
    tokens = tokenizer(sentences)
    tower = causal_tower(model)
    with torch.autocast(device.type, dtype=DTYPES[resolved], enabled=resolved != "fp32"):
        if tower is not None:
            # sentences are name-major, so template t's prompts are t, t + T, t + 2T, ...
            groups = [list(range(t, len(sentences), len(templates)))
                      for t in range(len(templates))]
            embeddings = F.normalize(tower.encode_grouped(tokens.to(device), groups).float(),
                                     dim=-1)
        else:
            # Batches cut across classes: CLIP's text tower treats every sentence independently.
            embeddings = torch.cat([
                F.normalize(model.encode_text(tokens[start:start + batch_size].to(device))
                            .float(), dim=-1)
                for start in range(0, len(sentences), batch_size)])
    log.info("text bank: %d prompts of %d classes encoded in %.1f s (%s, %s)", len(sentences),
             len(counts), time.perf_counter() - started, resolved,
             "each template's prefix once, up to each prompt's end" if tower is not None
             else "full length")
    rows_out = [part.mean(dim=0) for part in torch.split(embeddings, counts)]
    return F.normalize(torch.stack(rows_out), dim=-1).cpu().contiguous()


def _base(path: str | Path) -> Path:
    """``FILE`` from ``FILE``, ``FILE.safetensors`` or ``FILE.yaml``."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".yaml", ".yml") else path


def bank_paths(path: str | Path) -> tuple[Path, Path]:
    base = _base(path)
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".yaml")


def vocabulary_spec(vocabulary: Vocabulary, prompts: str | None = None) -> VocabularySpec:
    """The bundle-side description of a vocabulary: names, palette, prompt set, thing classes."""
    return VocabularySpec(name=vocabulary.name, classes=tuple(vocabulary.names),
                          palette=tuple(_rgb(c.color) for c in vocabulary.classes),
                          prompts=prompts if prompts is not None else vocabulary.prompts,
                          things=vocabulary.thing_names)


def _rgb(color: Sequence[int]) -> tuple[int, int, int]:
    # plain ints (a colour read from YAML or an array may hold numpy ints); the length is the
    # vocabulary's to check
    return cast(tuple[int, int, int], tuple(int(v) for v in color))


def _check_bank(bank: torch.Tensor, classes: int, where: str,
                error: type[ConfigError] | type[IntegrityError] = IntegrityError) -> None:
    """A bank that is not [classes, D] unit rows of float32 raises ``error``: IntegrityError
    for a bank file read back, ConfigError for one handed to :func:`save_text_bank`."""
    if bank.dim() != 2 or bank.shape[0] != classes or bank.shape[1] < 1:
        raise error(TEXT_BANK_KEY, f"has shape {tuple(bank.shape)}; expected "
                    f"[{classes}, D] for {classes} classes", where)
    if bank.dtype != torch.float32:
        raise error(TEXT_BANK_KEY, f"must be float32, got {bank.dtype}", where)
    if not torch.isfinite(bank).all():
        raise error(TEXT_BANK_KEY, "contains NaN or Inf", where)
    norms = bank.norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=NORM_TOLERANCE):
        worst = float((norms - 1).abs().max())
        raise error(TEXT_BANK_KEY, f"rows must be L2-normalised (worst |norm-1| = "
                    f"{worst:.2e})", where)


def save_text_bank(path: str | Path, bank: torch.Tensor, vocabulary: Vocabulary,
                   provenance: dict[str, Any]) -> Path:
    """Write ``FILE.safetensors`` and ``FILE.yaml``; returns ``FILE`` (suffix stripped).

    ``provenance`` should carry ``model``, ``pretrained``, ``prompts`` and ``templates`` (count);
    ``date`` and ``open_clip`` (version) are filled in when absent.
    """
    bank = bank.detach().to("cpu", torch.float32).contiguous()
    _check_bank(bank, len(vocabulary.classes), str(path), ConfigError)
    tensor_path, yaml_path = bank_paths(path)
    provenance = dict(provenance)
    provenance.setdefault("date", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    if "open_clip" not in provenance:
        try:
            import open_clip

            provenance["open_clip"] = open_clip.__version__
        except ImportError:
            provenance["open_clip"] = None
    spec = vocabulary_spec(vocabulary, provenance.get("prompts"))
    save_checked_tensors(tensor_path, yaml_path, {TEXT_BANK_KEY: bank}, {
        "format": BANK_FORMAT,
        "version": BANK_VERSION,
        "shape": list(bank.shape),
        "vocabulary": to_dict(spec),
        "provenance": to_dict(provenance),
    })
    return _base(path)


def load_text_bank(path: str | Path) -> tuple[torch.Tensor, VocabularySpec, dict[str, Any]]:
    """Read a bank written by :func:`save_text_bank` (tensors from safetensors, never pickle)."""
    tensor_path, yaml_path = bank_paths(path)
    tensors, meta = load_checked_tensors(tensor_path, yaml_path, "text bank", BANK_FORMAT,
                                         BANK_VERSION)
    where = str(yaml_path)
    spec = load_config(VocabularySpec, meta.get("vocabulary"))
    if TEXT_BANK_KEY not in tensors:
        raise IntegrityError(TEXT_BANK_KEY, f"missing; keys are {sorted(tensors)}",
                             str(tensor_path))
    bank = tensors[TEXT_BANK_KEY]
    _check_bank(bank, len(spec.classes), str(tensor_path))
    if list(bank.shape) != meta.get("shape"):
        raise IntegrityError("shape", f"says {meta.get('shape')}, the tensor is "
                             f"{list(bank.shape)}", where)
    provenance = meta.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise IntegrityError("provenance", "must be a mapping", where)
    return bank, spec, provenance


def _read_cached(key: dict[str, Any], vocabulary: Vocabulary) -> torch.Tensor | None:
    """The bank the bank cache holds under ``key``, else None (a bank that cannot be read,
    fails its checks or was stored under another key is ignored with a warning)."""
    from . import bank_cache

    digest = bank_cache.key_digest(key)
    base = bank_cache.bank_file(key, vocabulary.name)
    tensor_path, yaml_path = bank_paths(base)
    if not (tensor_path.exists() or yaml_path.exists()):
        return None
    try:
        bank, spec, provenance = load_text_bank(base)
        stored = provenance.get("cache_key")
        if not isinstance(stored, dict) or bank_cache.key_digest(stored) != digest:
            raise IntegrityError("cache_key", "was stored under another key", str(yaml_path))
        if list(spec.classes) != vocabulary.names:
            raise IntegrityError("vocabulary", f"holds classes {list(spec.classes)}",
                                 str(yaml_path))
    except (ValueError, OSError) as exc:  # ConfigError and IntegrityError are ValueErrors
        log.warning("text bank cache: ignoring %s (%s); encoding the bank again", base, exc)
        return None
    log.info("text bank: using the cached bank %s (key %s)", base, digest[:16])
    return bank


def cached_text_bank(model: ClipModel, tokenizer: Callable[[list[str]], torch.Tensor],
                     vocabulary: Vocabulary, templates: Sequence[str], *, model_name: str,
                     pretrained: str | None, prompts: str | None = None,
                     precision: str = "auto", batch_size: int = 256,
                     weights: dict[str, Any] | None = None) -> torch.Tensor:
    """:func:`encode_text_bank`, read from the bank cache when it holds this bank (see
    :mod:`.bank_cache` for the folder and the key), else encoded and stored there.

    ``weights`` (``clip_loader.weights_identity``), when ``model`` was loaded by
    ``seeded_clip(model_name, pretrained)``, has the text tower's checksum remembered for
    :func:`cached_bank_without_text_tower`. A cached bank that cannot be read, fails its checks
    or was stored under another key is ignored with a warning and encoded again; a cache folder
    that cannot be written only costs the next run the encoding.
    """
    from . import bank_cache

    templates = validate_templates(list(templates))
    resolved = resolve_precision(precision, next(model.parameters()).device)
    tower = bank_cache.text_tower_sha256(model)
    if weights is not None:
        bank_cache.remember_text_tower(weights, tower)
    key = bank_cache.bank_key(model_name, pretrained, tower, vocabulary, templates, resolved)
    cached = _read_cached(key, vocabulary)
    if cached is not None:
        return cached
    bank = encode_text_bank(model, tokenizer, vocabulary, templates, batch_size=batch_size,
                            precision=resolved)
    provenance = {"model": model_name, "pretrained": pretrained or "random",
                  "prompts": prompts, "templates": len(templates),
                  "sentences": sum(len(templates) * (1 + len(c.synonyms))
                                   for c in vocabulary.classes),
                  "precision": resolved, "cache_key": key}
    base = bank_cache.bank_file(key, vocabulary.name)
    try:
        save_text_bank(base, bank, vocabulary, provenance)
    except OSError as exc:
        log.warning("text bank cache: cannot store the bank in %s (%s)", base.parent, exc)
    else:
        log.info("text bank: stored in the cache as %s (key %s)", base,
                 bank_cache.key_digest(key)[:16])
    return bank


def cached_bank_without_text_tower(weights: dict[str, Any] | None, vocabulary: Vocabulary,
                                   templates: Sequence[str], *, model_name: str,
                                   pretrained: str | None, device: str = "cpu",
                                   precision: str = "auto") -> torch.Tensor | None:
    """The bank :func:`cached_text_bank` would return for the weights ``weights`` names, when an
    earlier call remembered their text tower's checksum and the cache still holds the bank; else
    None (the caller loads CLIP and calls :func:`cached_text_bank`)."""
    from . import bank_cache

    tower = bank_cache.remembered_text_tower(weights) if weights is not None else None
    if tower is None:
        return None
    key = bank_cache.bank_key(model_name, pretrained, tower, vocabulary,
                              validate_templates(list(templates)),
                              resolve_precision(precision, device))
    return _read_cached(key, vocabulary)


def resolve_vocabulary(name_or_path: str | Path) -> Vocabulary:
    """A vocabulary file, or the name of one shipped in ``config/vocabularies/``."""
    path = Path(name_or_path)
    if not path.is_file():
        if names_a_file(path):
            raise ConfigError("vocab", f"vocabulary file {str(name_or_path)!r} does not exist")
        try:
            path = builtin_vocabulary(str(name_or_path))
        except FileNotFoundError as exc:
            raise ConfigError("vocab", str(exc)) from exc
    return load_vocabulary(path)


def build_text_bank(vocab: str | Path, model: str, pretrained: str | None, out: str | Path,
                    prompts: str | Path | None = None, device: str = "cpu",
                    batch_size: int = 256, precision: str = "auto") -> dict[str, Any]:
    """Load CLIP, encode ``vocab`` and write the bank to ``out``; returns a summary.

    With real weights the bank goes through the bank cache (:func:`cached_text_bank`), so a
    later teacher run with the same CLIP and vocabulary finds it. Random weights come from the
    teacher's fixed seed, so a rerun writes the same bank (they are not cached).
    """
    from .clip_loader import RANDOM, seeded_clip, weights_identity

    check_precision(precision)
    vocabulary = resolve_vocabulary(vocab)
    prompt_set = prompts or vocabulary.prompts or DEFAULT_PROMPTS
    templates = load_prompts(prompt_set)  # before loading CLIP: cheap errors first
    clip, tokenizer = seeded_clip(model, pretrained, device=device)
    if pretrained is None or pretrained.strip().lower() in RANDOM:
        bank = encode_text_bank(clip, tokenizer, vocabulary, templates, batch_size=batch_size,
                                precision=precision)
    else:
        bank = cached_text_bank(clip, tokenizer, vocabulary, templates, model_name=model,
                                pretrained=pretrained, prompts=prompts_name(prompt_set),
                                precision=precision, batch_size=batch_size,
                                weights=weights_identity(model, pretrained))
    provenance = {
        "model": model,
        "pretrained": pretrained if pretrained is not None else "random",
        "prompts": prompts_name(prompt_set),
        "templates": len(templates),
        "sentences": sum(len(templates) * (1 + len(c.synonyms)) for c in vocabulary.classes),
        "precision": resolve_precision(precision, device),
    }
    base = save_text_bank(out, bank, vocabulary, provenance)
    tensor_path, yaml_path = bank_paths(base)
    return {"vocabulary": vocabulary.name, "classes": len(vocabulary.classes),
            "dim": int(bank.shape[1]), "templates": len(templates),
            "files": [str(tensor_path), str(yaml_path)]}
