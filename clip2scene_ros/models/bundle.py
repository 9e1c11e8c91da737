"""The model bundle: the one format a trained model travels in (trainer → export → node).

A bundle is a directory::

    model.safetensors   weights (``model.*``) and the text bank (``text_bank``, ``[C, D]``)
    model.yaml          bundle version, architecture, input preprocessing, vocabulary, engine
                        profile, provenance
    model.onnx          optional: the network exported with kernel maps as inputs
    engines/            optional: TensorRT engines cached by the runtime

Nothing is unpickled: tensors come from safetensors, everything else from YAML with the safe
loader. A bundle is written into a temporary sibling directory and renamed into place, so a
reader never sees half a bundle.

Since bundle version 2, ``model.yaml`` ends with a ``files`` section recording the size and
SHA-256 of ``model.safetensors``; :func:`load_bundle` checks both before reading a tensor, so a
truncated copy, a file from another bundle or a cut-off ``model.yaml`` (which loses ``files``,
written last) is refused naming the file. Version 1 bundles predate the section: they are still
read (``SUPPORTED_VERSIONS``), with a warning that their files are unverified, and saving one
again writes version 2. ``model.onnx`` is not listed: ``clip2scene export`` rewrites it in place
and it carries the checksum of the weights it was exported from, which the ONNX backends check.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ..config import load_config, read_yaml, to_dict
from ..errors import ConfigError, IntegrityError
from ..files import file_sha256
from .profile import DEFAULT_VOXEL_RATIOS

log = logging.getLogger(__name__)

#: Version written by this release; ``SUPPORTED_VERSIONS`` are the ones it can read.
#: 2 added the ``files`` section (sizes and checksums); 1 had none.
BUNDLE_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
#: The ``model.yaml`` key (outside :class:`BundleSpec`) holding ``{file: {bytes, sha256}}``.
FILES_KEY = "files"

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.yaml"
ONNX_FILE = "model.onnx"
TEXT_BANK_KEY = "text_bank"
MODEL_PREFIX = "model."

#: Per-point input channels a network can be given, in the names Frame uses.
INPUT_FEATURES = ("x", "y", "z", "intensity", "time", "ring")


@dataclass(frozen=True)
class InputSpec:
    """Preprocessing shared by training, evaluation and the node (one path, DESIGN rule 4).

    Feature ``i`` fed to the network is ``(features[i] - offset[i]) * scale[i]``; empty ``offset``
    and ``scale`` mean 0 and 1.
    """

    voxel_size: float = 0.1
    features: tuple[str, ...] = ("intensity",)
    offset: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    sweeps: int = 1
    max_points: int = 400_000

    def validate(self) -> None:
        if not self.voxel_size > 0:
            raise ConfigError("voxel_size", f"must be > 0, got {self.voxel_size}")
        if not self.features:
            raise ConfigError("features", "must name at least one input channel")
        unknown = [f for f in self.features if f not in INPUT_FEATURES]
        if unknown:
            raise ConfigError("features", f"unknown {unknown}; choose from {INPUT_FEATURES}")
        for name in ("offset", "scale"):
            values = getattr(self, name)
            if values and len(values) != len(self.features):
                raise ConfigError(name, f"has {len(values)} values for {len(self.features)} "
                                  "features")
        if self.sweeps < 1:
            raise ConfigError("sweeps", f"must be >= 1, got {self.sweeps}")
        if self.max_points < 1:
            raise ConfigError("max_points", f"must be >= 1, got {self.max_points}")


@dataclass(frozen=True)
class ArchitectureSpec:
    """The 3D network. ``widths`` are SPVCNN's nine stage widths before scaling by ``cr``."""

    name: Literal["spvcnn"] = "spvcnn"
    cr: float = 1.0
    widths: tuple[int, ...] = (32, 32, 64, 128, 256, 256, 128, 96, 96)
    blocks: int = 2
    clip_dim: int = 512

    def validate(self) -> None:
        if not self.cr > 0:
            raise ConfigError("cr", f"must be > 0, got {self.cr}")
        if len(self.widths) != 9 or min(self.widths) < 1:
            raise ConfigError("widths", f"needs 9 positive widths, got {list(self.widths)}")
        if self.blocks < 1:
            raise ConfigError("blocks", f"must be >= 1, got {self.blocks}")
        if self.clip_dim < 1:
            raise ConfigError("clip_dim", f"must be >= 1, got {self.clip_dim}")


@dataclass(frozen=True)
class EngineSpec:
    """The TensorRT optimisation profile the bundle's graph is built for.

    ``min_points``/``opt_points``/``max_points``: points per cloud (``max_points`` 0: the input's
    ``max_points``; ``opt_points`` is capped at the max). ``voxel_ratios``: the most voxels per
    point at strides 1, 2, 4, 8, 16 (:mod:`.profile`, measured on real scans); a stride's voxel
    axis is profiled up to ``ratio * max_points``.
    """

    min_points: int = 1
    opt_points: int = 100_000
    max_points: int = 0
    voxel_ratios: tuple[float, ...] = DEFAULT_VOXEL_RATIOS

    def validate(self) -> None:
        if self.min_points < 1:
            raise ConfigError("min_points", f"must be >= 1, got {self.min_points}")
        if self.opt_points < self.min_points:
            raise ConfigError("opt_points", f"must be >= min_points ({self.min_points}), got "
                              f"{self.opt_points}")
        if self.max_points and self.max_points < self.min_points:
            raise ConfigError("max_points", f"must be 0 or >= min_points ({self.min_points}), "
                              f"got {self.max_points}")
        if not self.voxel_ratios or not all(0 < r <= 1 for r in self.voxel_ratios):
            raise ConfigError("voxel_ratios", f"needs ratios in (0, 1], got "
                              f"{list(self.voxel_ratios)}")

    def profile(self, input_max_points: int) -> tuple[int, int, int]:
        """(min, opt, max) points, the max defaulting to (and never above) the input's."""
        high = min(self.max_points or input_max_points, input_max_points)
        low = min(self.min_points, high)
        return low, max(low, min(self.opt_points, high)), high


@dataclass(frozen=True)
class VocabularySpec:
    """The classes the text bank's rows stand for, in row order, and their colours.

    ``things``: the classes the vocabulary flags ``thing: true`` (countable objects); empty in
    bundles written before vocabularies carried the flag, and for vocabularies that flag none.
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    prompts: str | None = None
    things: tuple[str, ...] = ()

    def validate(self) -> None:
        if not self.classes:
            raise ConfigError("classes", "must list at least one class")
        if len(self.palette) != len(self.classes):
            raise ConfigError("palette", f"has {len(self.palette)} colours for "
                              f"{len(self.classes)} classes")
        unknown = [t for t in self.things if t not in self.classes]
        if unknown:
            raise ConfigError("things", f"{unknown} are not classes {list(self.classes)}")


@dataclass(frozen=True)
class BundleSpec:
    """Everything in ``model.yaml``."""

    architecture: ArchitectureSpec
    input: InputSpec
    vocabulary: VocabularySpec
    bundle_version: int = BUNDLE_VERSION
    engine: EngineSpec = field(default_factory=EngineSpec)
    text_bank: dict[str, Any] = field(default_factory=dict)  # model, pretrained, templates...
    provenance: dict[str, Any] = field(default_factory=dict)  # training run, data, date, git


@dataclass(frozen=True)
class Bundle:
    spec: BundleSpec
    state_dict: dict[str, torch.Tensor]
    text_bank: torch.Tensor  # [C, D] float32, rows L2-normalised
    path: Path | None = None

    @property
    def onnx_path(self) -> Path | None:
        if self.path is None or not (self.path / ONNX_FILE).is_file():
            return None
        return self.path / ONNX_FILE

    def with_text_bank(self, text_bank: torch.Tensor, vocabulary: VocabularySpec) -> Bundle:
        """The same network answering to another vocabulary (open vocabulary, no retraining)."""
        _check_bank(text_bank, vocabulary, self.spec.architecture.clip_dim)
        return replace(self, text_bank=text_bank, spec=replace(self.spec, vocabulary=vocabulary))


def _check_bank(text_bank: torch.Tensor, vocabulary: VocabularySpec, clip_dim: int,
                error: type[ConfigError] | type[IntegrityError] = ConfigError) -> None:
    """A bank that does not fit raises ``error``: ConfigError for a bank given to swap in or
    save (the caller's choice), IntegrityError for the one inside a bundle being read."""
    if text_bank.dim() != 2 or text_bank.shape != (len(vocabulary.classes), clip_dim):
        raise error(TEXT_BANK_KEY, f"has shape {tuple(text_bank.shape)}; the vocabulary "
                    f"has {len(vocabulary.classes)} classes and the model {clip_dim} dims")
    if not torch.isfinite(text_bank).all():
        raise error(TEXT_BANK_KEY, "has non-finite values")


def save_bundle(
    path: str | Path,
    spec: BundleSpec,
    state_dict: dict[str, torch.Tensor],
    text_bank: torch.Tensor,
    *,
    onnx: bytes | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle atomically; an existing bundle is replaced only with ``overwrite``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    _check_bank(text_bank, spec.vocabulary, spec.architecture.clip_dim)
    reduced = sorted(k for k, v in state_dict.items()
                     if v.is_floating_point() and v.dtype != torch.float32)
    if reduced:  # reduced precision is an inference-time conversion, never a bundle's
        raise IntegrityError("model.safetensors", f"bundles hold float32 weights; {reduced[0]} "
                             f"is {state_dict[reduced[0]].dtype}", str(path))
    spec = replace(spec, bundle_version=BUNDLE_VERSION)  # a re-saved v1 bundle gains checksums
    tensors = {MODEL_PREFIX + k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tensors[TEXT_BANK_KEY] = text_bank.detach().to(torch.float32).contiguous().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        weights = tmp / WEIGHTS_FILE
        save_file(tensors, str(weights), metadata={"bundle_version": str(spec.bundle_version)})
        # the version first and the checksums last: a cut-off model.yaml keeps the one and
        # loses the other, so it is refused as such
        raw = {"bundle_version": spec.bundle_version, **to_dict(spec), FILES_KEY: {
            WEIGHTS_FILE: {"bytes": weights.stat().st_size, "sha256": file_sha256(weights)}}}
        text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
        (tmp / SPEC_FILE).write_text(text, encoding="utf-8")
        if onnx is not None:
            (tmp / ONNX_FILE).write_bytes(onnx)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.replace(old)
            tmp.replace(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_spec(path: str | Path) -> BundleSpec:
    """Read and check ``model.yaml``; the version is checked before anything else."""
    return _read_spec(path)[0]


def _read_spec(path: str | Path) -> tuple[BundleSpec, dict[str, Any] | None, Path]:
    """``(spec, files, spec_file)``; ``files`` is None for a version 1 bundle (none recorded)."""
    path = Path(path)
    spec_file = path / SPEC_FILE if path.is_dir() else path
    if not spec_file.is_file():
        raise FileNotFoundError(f"{path} is not a model bundle: {SPEC_FILE} is missing (a bundle "
                                "is a directory written by `clip2scene export` or the trainer)")
    where = str(spec_file)
    try:
        raw = read_yaml(spec_file)
    except ConfigError as exc:  # YAML that no longer parses: a model.yaml cut short or damaged
        raise IntegrityError(exc.key, exc.reason, exc.source or where) from None
    if not isinstance(raw, dict):
        raise IntegrityError("<root>", f"must be a mapping ({spec_file.name} is empty or cut "
                             "short?)", where)
    version = raw.get("bundle_version")
    if version is None:
        raise IntegrityError("bundle_version", f"is missing: {spec_file.name} is cut short or not "
                             "a bundle's; copy or export the bundle again", where)
    if version not in SUPPORTED_VERSIONS:
        newer = isinstance(version, int) and version > BUNDLE_VERSION
        hint = ("it was written by a newer clip2scene_ros: upgrade this one"
                if newer else "re-export it with this release's `clip2scene export`")
        raise IntegrityError("bundle_version", f"{version!r} is not supported (this release reads "
                             f"{list(SUPPORTED_VERSIONS)}); {hint}", where)
    files = raw.pop(FILES_KEY, None)
    if version >= 2:
        entry = files.get(WEIGHTS_FILE) if isinstance(files, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            raise IntegrityError(FILES_KEY, f"has no size and sha256 of {WEIGHTS_FILE}: "
                                 f"{spec_file.name} is cut short or was edited; copy or export the "
                                 "bundle again", where)
    try:
        spec = load_config(BundleSpec, raw)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.reason, exc.source or where) from None
    return spec, files if version >= 2 else None, spec_file


def _verify_weights(weights: Path, files: dict[str, Any] | None, spec_file: Path) -> None:
    """Size, then SHA-256, of ``weights`` against ``model.yaml``, before any tensor is read."""
    if files is None:
        log.warning("bundle %s is version 1: its files carry no checksums and are not verified; "
                    "save it again (e.g. `clip2scene export`) to add them", spec_file.parent)
        return
    want = files[WEIGHTS_FILE]
    size = weights.stat().st_size
    if size != want["bytes"]:
        raise IntegrityError(WEIGHTS_FILE, f"is {size} bytes but {spec_file.name} records "
                             f"{want['bytes']}: truncated or replaced; copy the bundle again",
                             str(weights))
    if file_sha256(weights) != want["sha256"]:
        raise IntegrityError(WEIGHTS_FILE, f"does not match the sha256 in {spec_file.name} "
                             "(corrupt, or from another bundle); copy the bundle again",
                             str(weights))


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle without unpickling anything. A damaged, cut short or foreign bundle (size,
    checksum, version, tensors) raises IntegrityError, an invalid spec value in ``model.yaml``
    ConfigError; both name the key.

    ``model.safetensors`` is checked against the size and SHA-256 in ``model.yaml`` before it
    is read (bundle version 2).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    spec, files, spec_file = _read_spec(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"bundle {path} has no {WEIGHTS_FILE}")
    _verify_weights(weights, files, spec_file)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(WEIGHTS_FILE, f"cannot be read: {exc}", str(path)) from exc
    if TEXT_BANK_KEY not in tensors:
        raise IntegrityError(TEXT_BANK_KEY, f"missing from {WEIGHTS_FILE}", str(path))
    text_bank = tensors.pop(TEXT_BANK_KEY)
    _check_bank(text_bank, spec.vocabulary, spec.architecture.clip_dim, IntegrityError)
    stray = sorted(k for k in tensors if not k.startswith(MODEL_PREFIX))
    if stray:
        raise IntegrityError(WEIGHTS_FILE, f"unexpected tensors {stray[:5]}", str(path))
    state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items()}
    return Bundle(spec=spec, state_dict=state, text_bank=text_bank, path=path)
