"""CLIP's text tower run only on the tokens a text bank needs.

The tokenizer pads every prompt to the context length (77), but a prompt of the text bank is 6 to
14 tokens. In a tower whose attention mask is causal and which pools the end-of-text token (CLIP's,
as open_clip builds it: ``text_pool_type`` "argmax" or "eos"), the pooled output at position ``p``
sees positions ``<= p`` only, so the positions after it can be left out: the same numbers from
~8x fewer token rows (:meth:`CausalTextTower.encode`). Everything else is per token (LayerNorm,
MLP); the positional embedding and the causal mask are sliced to the same length, as open_clip's
own ``TextTransformer._embeds`` does. For the same reason the tokens a template puts before the
class name have the same states in every prompt of the template, so a bank computes them once
per template (:meth:`CausalTextTower.encode_grouped`, another ~2.4x on SemanticKITTI × 85).

Both are taken only when the model is open_clip's ``CLIP`` (or ``CustomTextCLIP`` over a plain
``TextTransformer``) with its own ``encode_text`` and a causal mask; any other tower (a
bidirectional one, first/last/mean pooling, CoCa's appended class token, a padding mask, a
Hugging Face text encoder, a subclass that overrides ``encode_text``) runs at full length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .clip_loader import ClipModel

#: Poolings that read the end-of-text token's position from the tokens themselves.
EOT_POOLS = ("argmax", "eos")
#: Tokens per packed sequence in :meth:`CausalTextTower.encode_grouped`.
ROW_TOKENS = 256


@dataclass(frozen=True)
class CausalTextTower:
    """The parts of a causal, end-token-pooled open_clip text tower (see :func:`causal_tower`)."""

    token_embedding: Any
    positional_embedding: torch.Tensor
    transformer: Any
    ln_final: Any
    text_projection: Any
    attn_mask: torch.Tensor
    pool_type: str
    eos_id: int | None

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    def pooled_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B]`` position each row is pooled at, as open_clip's ``text_global_pool`` picks it."""
        if self.pool_type == "argmax" or self.eos_id is None:
            return tokens.argmax(dim=-1)
        return torch.eq(tokens, self.eos_id).int().argmax(dim=-1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``encode_text(tokens)`` computed on ``tokens[:, :L]``, L = last pooled position + 1."""
        from open_clip.transformer import text_global_pool

        length = int(self.pooled_positions(tokens).max()) + 1 if len(tokens) else 1
        tokens = tokens[:, :length]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        return self._project(text_global_pool(x, tokens, self.pool_type,
                                              eos_token_id=self.eos_id))

    def encode_grouped(self, tokens: torch.Tensor, groups: Sequence[Sequence[int]],
                       row_tokens: int = ROW_TOKENS) -> torch.Tensor:
        """``[N, D]`` = ``encode_text(tokens)``, each group's common prefix computed once.

        The prompts of one template share the tokens before the class name ("<start> a photo
        of a"). Under a causal mask those positions have the same states in every prompt of
        the group, so a packed sequence holds the prefix once and then each prompt's own
        tokens (with their own positions), and a block mask lets each prompt's tokens see the
        prefix and themselves only: the same keys and values the prompt sees alone. Groups are
        cut and packed into sequences of at most ``row_tokens`` (unless one prompt is longer):
        the masked-out attention grows with the square of the length. Rows of ``tokens`` in no
        group are not encoded (zeros).
        """
        pooled = self.pooled_positions(tokens).tolist()
        cpu_tokens = tokens.cpu()
        rows: list[list[tuple[list[int], int]]] = [[]]
        size = 0
        for group in (list(g) for g in groups if len(g)):
            block = cpu_tokens[group]
            # the prefix ends before the earliest pooled token: every prompt keeps its own
            common = (block == block[:1]).all(dim=0)[:min(pooled[i] for i in group)]
            prefix = int(common.int().cumprod(dim=0).sum())
            for chunk, length in _chunks(group, prefix, pooled, row_tokens):
                if rows[-1] and size + length > row_tokens:
                    rows.append([])
                    size = 0
                rows[-1].append((chunk, prefix))
                size += length
        out: torch.Tensor | None = None
        for row in rows:
            if not row:
                continue
            sentences, embedded = self._encode_row(cpu_tokens, pooled, row)
            if out is None:
                out = embedded.new_zeros(len(tokens), embedded.shape[-1])
            out[torch.as_tensor(sentences, device=out.device)] = embedded
        if out is None:
            raise ValueError("encode_grouped needs at least one non-empty group")
        return out

    def _encode_row(self, tokens: torch.Tensor, pooled: list[int],
                    row: list[tuple[list[int], int]]) -> tuple[list[int], torch.Tensor]:
        """One packed sequence: ``(sentences, [len(sentences), D] outputs)``."""
        ids: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        segment: list[int] = []   # which piece each packed token belongs to
        owner: list[int] = []     # which group
        shared: list[bool] = []   # whether it is its group's prefix
        sentences: list[int] = []
        ends: list[int] = []
        for g, (group, prefix) in enumerate(row):
            pieces = [(None, 0, prefix)] + [(i, prefix, pooled[i] + 1) for i in group]
            for i, start, stop in pieces:
                source = group[0] if i is None else i
                ids.append(tokens[source, start:stop])
                positions.append(torch.arange(start, stop))
                count = stop - start
                segment += [len(ids)] * count
                owner += [g] * count
                shared += [i is None] * count
                if i is not None:
                    sentences.append(i)
                    ends.append(len(segment) - 1)
        device = self.positional_embedding.device
        seg, grp = torch.tensor(segment), torch.tensor(owner)
        allowed = torch.ones(len(seg), len(seg), dtype=torch.bool).tril_() & (
            (seg[:, None] == seg[None, :])
            | (torch.tensor(shared)[None, :] & (grp[:, None] == grp[None, :])))
        mask = torch.zeros(allowed.shape, dtype=self.attn_mask.dtype)
        mask.masked_fill_(~allowed, float("-inf"))
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(torch.cat(ids).to(device)[None]).to(cast_dtype)
        x = x + self.positional_embedding[torch.cat(positions).to(device)].to(cast_dtype)
        x = self.transformer(x, attn_mask=mask.to(device))
        pooled_rows = self.ln_final(x[0, torch.tensor(ends, device=device)])
        return sentences, self._project(pooled_rows)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, torch.nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


def _chunks(group: list[int], prefix: int, pooled: list[int], row_tokens: int
            ) -> list[tuple[list[int], int]]:
    """``group`` cut into pieces of at most ``row_tokens`` packed tokens (at least one prompt
    each), with their packed lengths: a long vocabulary's group repeats its prefix rather than
    growing one sequence whose attention grows with the square of its length."""
    chunks: list[tuple[list[int], int]] = [([], prefix)]
    for i in group:
        own = pooled[i] + 1 - prefix
        if chunks[-1][0] and chunks[-1][1] + own > row_tokens:
            chunks.append(([], prefix))
        members, length = chunks[-1]
        chunks[-1] = ([*members, i], length + own)
    return chunks


def _is_causal(mask: Any, context: int) -> bool:
    """``mask`` is open_clip's additive causal mask: -inf strictly above the diagonal, 0 else."""
    if not isinstance(mask, torch.Tensor) or mask.shape != (context, context):
        return False
    above = torch.ones(context, context, dtype=torch.bool, device=mask.device).triu_(1)
    return bool(torch.isneginf(mask[above]).all() and (mask[~above] == 0).all())


def causal_tower(model: ClipModel) -> CausalTextTower | None:
    """The model's text tower if truncating its input is exact, else None (run at full length)."""
    try:
        from open_clip.model import CLIP, CustomTextCLIP
        from open_clip.transformer import TextTransformer
    except ImportError:
        return None
    if isinstance(model, CLIP) and type(model).encode_text is CLIP.encode_text:
        parts: dict[str, Any] = {
            "token_embedding": model.token_embedding, "transformer": model.transformer,
            "positional_embedding": model.positional_embedding, "ln_final": model.ln_final,
            "text_projection": model.text_projection, "attn_mask": model.attn_mask,
            "pool_type": model.text_pool_type, "eos_id": getattr(model, "text_eos_id", None),
        }
    elif (isinstance(model, CustomTextCLIP)
          and type(model).encode_text is CustomTextCLIP.encode_text
          and type(model.text) is TextTransformer):
        text = model.text
        # CoCa-style appended class token, a padding mask or token outputs change the forward
        if (getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False)
                or getattr(text, "output_tokens", False)):
            return None
        parts = {
            "token_embedding": text.token_embedding, "transformer": text.transformer,
            "positional_embedding": text.positional_embedding, "ln_final": text.ln_final,
            "text_projection": text.text_projection, "attn_mask": text.attn_mask,
            "pool_type": text.pool_type, "eos_id": getattr(text, "eos_id", None),
        }
    else:
        return None
    if parts["pool_type"] not in EOT_POOLS or (parts["pool_type"] == "eos"
                                                and parts["eos_id"] is None):
        return None
    positional = parts["positional_embedding"]
    if not isinstance(positional, torch.Tensor) or positional.dim() != 2:
        return None
    if not _is_causal(parts["attn_mask"], int(positional.shape[0])):
        return None
    return CausalTextTower(**parts)


def encode_tokens(model: ClipModel, tokens: torch.Tensor,
                  tower: CausalTextTower | None = None) -> torch.Tensor:
    """``model.encode_text(tokens)``, through ``tower`` (truncated) when it is given and the
    tokens have the tower's full context length."""
    if tower is None or tokens.shape[-1] != tower.context_length:
        return model.encode_text(tokens)
    return tower.encode(tokens)
