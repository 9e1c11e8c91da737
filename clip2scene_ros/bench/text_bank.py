"""Text bank encoding time: truncated text tower, the full-length one it replaces, and the cache.

``python -m clip2scene_ros.bench.text_bank`` encodes a vocabulary with its prompt set (default:
SemanticKITTI × the 85 MaskCLIP templates, 4,675 prompts) through a random-weight open_clip
text tower (speed does not depend on the weights) and prints JSON:

* ``encode``: :func:`encode_text_bank` as the teacher runs it (each batch up to its longest
  prompt, prompts batched by length), at ``--precision``;
* ``full_length`` (with ``--full-length``): the same bank with every prompt padded to the
  context length, as before the truncation, and the largest difference between the two banks;
* ``cache_miss`` / ``cache_hit``: :func:`cached_text_bank` into an empty temporary cache folder,
  then again (the hit includes the text tower's weight checksum).

Each time is given as wall seconds and as this process's CPU seconds; on a shared machine the
CPU seconds are the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import print_report


def _timed(func: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = func()
    return out, {"wall_s": round(time.perf_counter() - wall, 3),
                 "cpu_s": round(time.process_time() - cpu, 3)}


class _FullLength(torch.nn.Module):
    """Hides the CLIP class from the truncation check: every prompt runs at full length."""

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.clip = clip

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        encode: Callable[[torch.Tensor], torch.Tensor] = self.clip.encode_text
        return encode(tokens)


def bench_text_bank(model: str = "ViT-B-16", vocab: str = "semantickitti",
                    prompts: str | None = None, precision: str = "fp32",
                    full_length: bool = False) -> dict[str, Any]:
    from ..teacher.clip_loader import load_clip
    from ..teacher.prompts import DEFAULT_PROMPTS, load_prompts
    from ..teacher.text_bank import cached_text_bank, encode_text_bank, resolve_vocabulary
    from ..teacher.text_tower import causal_tower

    vocabulary = resolve_vocabulary(vocab)
    templates = load_prompts(prompts or vocabulary.prompts or DEFAULT_PROMPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        torch.manual_seed(0)
        clip, tokenizer = load_clip(model, "random")
    sentences = sum(len(templates) * (1 + len(c.synonyms)) for c in vocabulary.classes)
    result: dict[str, Any] = {
        "model": model, "vocabulary": vocabulary.name, "templates": len(templates),
        "prompts": sentences, "precision": precision, "threads": torch.get_num_threads(),
        "truncated": causal_tower(clip) is not None,
    }
    bank, result["encode"] = _timed(
        lambda: encode_text_bank(clip, tokenizer, vocabulary, templates, precision=precision))
    if full_length:
        full, result["full_length"] = _timed(lambda: encode_text_bank(
            _FullLength(clip), tokenizer, vocabulary, templates, precision=precision))
        result["max_abs_difference"] = float((full - bank).abs().max())
        cpu = result["full_length"]["cpu_s"], result["encode"]["cpu_s"]
        result["speedup_cpu"] = round(cpu[0] / cpu[1], 2) if cpu[1] > 0 else None
    previous = os.environ.get("CLIP2SCENE_CACHE")
    with tempfile.TemporaryDirectory(prefix="clip2scene_bank_bench_") as folder:
        os.environ["CLIP2SCENE_CACHE"] = folder
        try:
            for name in ("cache_miss", "cache_hit"):
                _, result[name] = _timed(lambda: cached_text_bank(
                    clip, tokenizer, vocabulary, templates, model_name=model,
                    pretrained="random", precision=precision))
        finally:
            if previous is None:
                os.environ.pop("CLIP2SCENE_CACHE", None)
            else:
                os.environ["CLIP2SCENE_CACHE"] = previous
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip2scene_ros.bench.text_bank",
                                     description="text bank encoding time (JSON)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights)")
    parser.add_argument("--vocab", default="semantickitti", help="vocabulary name or YAML")
    parser.add_argument("--prompts", help="prompt set (default: the vocabulary's)")
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"),
                        help="text tower precision (default fp32)")
    parser.add_argument("--full-length", action="store_true",
                        help="also encode at full length (the time before the truncation)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench_text_bank(args.model, args.vocab, args.prompts, args.precision,
                             args.full_length)
    print_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
