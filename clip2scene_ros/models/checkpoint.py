"""Import torchsparse-layout SPVCNN checkpoints (CLIP2Scene, spvnas) into our SPVCNN.

Our modules keep torchsparse's names and ``[K, Cin, Cout]`` kernels, so import is a key
rename plus a report. Files are read with safetensors or ``torch.load(weights_only=True)``:
a checkpoint that needs arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, IntegrityError

#: Prefixes that wrappers add to the network's keys (CLIP2Scene's trainer, DDP, Lightning).
PREFIXES = ("model_points.", "module.", "model.")
#: Entries of CLIP2Scene's SPVCNN that are not network weights here: the text embeddings become
#: the bundle's text bank, and point_mapping_global_random is never used by CLIP2Scene.
NOT_WEIGHTS = ("text_embeddings", "point_mapping_global_random.")
#: Where trainers nest the network's state dict inside a checkpoint.
NESTED = ("model_points", "state_dict", "model")


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list)
    ignored: list[str] = field(default_factory=list)
    text_bank: torch.Tensor | None = None  # [C, D] from CLIP2Scene's text_embeddings (row 0 off)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.text_bank is not None:
            lines.append(f"text bank {tuple(self.text_bank.shape)} from text_embeddings")
        for name, items in (("ignored", self.ignored), ("missing", self.missing),
                            ("unexpected", self.unexpected)):
            if items:
                lines.append(f"{name} ({len(items)}): {', '.join(items[:8])}"
                             + (" ..." if len(items) > 8 else ""))
        for key, theirs, ours in self.shape_mismatch:
            lines.append(f"shape mismatch {key}: checkpoint {theirs}, model {ours}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The network's tensors from a .safetensors file or a weights-only torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for unsafe files
        raise IntegrityError("checkpoint", f"{path} cannot be read without unpickling arbitrary "
                             f"objects, which we never do ({type(exc).__name__}); convert it to "
                             "safetensors where you trust it", str(path)) from exc
    for key in NESTED:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise IntegrityError("checkpoint", f"{path} holds no state dict of tensors", str(path))
    return data


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def import_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = False
                      ) -> ImportReport:
    """Load ``state`` into ``model`` by name; ``strict`` raises unless every weight matches."""
    report = ImportReport()
    ours = model.state_dict()
    usable: dict[str, torch.Tensor] = {}
    for raw_key, value in state.items():
        key = _strip(raw_key)
        if key == "text_embeddings" and value.dim() == 2 and value.shape[0] > 1:
            report.text_bank = value[1:].float().clone()  # row 0 is CLIP2Scene's "ignore" row
        if key.startswith(NOT_WEIGHTS):
            report.ignored.append(key)
        elif key not in ours:
            report.unexpected.append(key)
        elif ours[key].shape != value.shape:
            report.shape_mismatch.append((key, tuple(value.shape), tuple(ours[key].shape)))
        else:
            usable[key] = value
    report.missing = sorted(set(ours) - set(usable) - {k for k, *_ in report.shape_mismatch})
    report.loaded = sorted(usable)
    if strict and not report.complete:
        raise ConfigError("checkpoint", "does not match the model:\n" + report.summary())
    model.load_state_dict(usable, strict=False)
    return report
