"""MaskCLIP: dense pixel features in CLIP's joint image-text space, from a frozen open_clip model.

CLIP pools an image into one vector; MaskCLIP (Zhou et al., ECCV 2022) keeps every spatial
position by skipping the query-key mixing of the last attention layer. Each token goes through
the *value* path only, so the per-position outputs stay aligned with CLIP's text embeddings:

* ViT: the last block becomes ``v = out_proj(v_proj(ln_1(x))) + x; v = v + mlp(ln_2(v))``,
  then ``ln_post`` and ``proj`` on the patch tokens (CLIP2Scene's teacher, reference §1.6).
* ModifiedResNet: the attention pool's ``v_proj`` and ``c_proj`` become two 1×1 convolutions on
  the ``layer4`` map. The pool's positional embedding is *not* added: MaskCLIP's RN head takes
  the raw ``layer4`` features, and the embedding was learnt for the 7×7 global-pool input of a
  224 image (plus a mean token), so using it at other sizes would need an interpolation that
  CLIP never saw. Through the (linear) value path it would only add a per-position bias anyway.

Unlike CLIP2Scene, images are normalised with CLIP's mean/std here (reference §1.6 notes that
CLIP2Scene fed raw [0, 1] pixels). Optional MaskCLIP refinements (key smoothing, prompt
denoising) are off by default, as in CLIP2Scene.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: OpenAI CLIP's image normalisation (every released CLIP model was trained with it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Logit given to classes removed by prompt denoising: finite, so bilinear upsampling and
#: softmax stay NaN-free, but far below any cosine similarity (which lies in [-1, 1]).
DROPPED_LOGIT = -1e4
#: Floor for probabilities before taking logs after key smoothing.
_PROB_FLOOR = 1e-12


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def interpolate_positional_embedding(
    pos: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> Tensor:
    """Resize a ViT positional embedding ``[1 + gh*gw, C]`` to another patch grid.

    The class-token row is kept; the grid part is resized bicubically (``align_corners=False``),
    as CLIP2Scene/MaskCLIP do for 224×416 inputs (14×14 → 14×26).
    """
    (gh, gw), (h, w) = src_grid, dst_grid
    if pos.shape[0] != 1 + gh * gw:
        raise ValueError(f"positional embedding has {pos.shape[0]} rows, expected 1 + {gh}x{gw}")
    if (h, w) == (gh, gw):
        return pos
    cls_pos, grid = pos[:1], pos[1:]
    grid = grid.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)


def is_plain_block(block: nn.Module) -> bool:
    """Whether ``block`` is open_clip's standard ``ResidualAttentionBlock`` (packed
    ``nn.MultiheadAttention``, no cross-attention), the only kind ``plain_block_forward`` runs.

    Custom blocks (NormFormer, head scaling, cosine attention, ...) and subclasses fail the
    check and keep their own ``forward``.
    """
    cls = type(block)
    if cls.__name__ != "ResidualAttentionBlock" or not cls.__module__.startswith("open_clip"):
        return False
    attn = getattr(block, "attn", None)
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
        and not hasattr(block, "ln_1_kv")
        and all(hasattr(block, name) for name in ("ln_1", "ln_2", "ls_1", "ls_2", "mlp"))
    )


def plain_block_forward(block: Any, x: Tensor) -> Tensor:
    """``block(x)`` for a plain block (``is_plain_block``) on batch-first ``x [N, L, C]``,
    without attention mask or dropout, as in a ViT tower in eval mode.

    On CPU, nn.MultiheadAttention's inference path materialises the full softmax matrix
    through two batched matmuls; torch's fused ``scaled_dot_product_attention`` does not and
    is about twice as fast at MaskCLIP's 365 tokens. Results match ``block(x)`` to float
    rounding.
    """
    attn: nn.MultiheadAttention = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, C / heads]
    a = attn.out_proj(a.transpose(1, 2).reshape(n, length, width))
    # The residual sums go into the fresh branch outputs (same values, no new buffers).
    x = block.ls_1(a).add_(x)
    return block.ls_2(mlp_forward(block.mlp, block.ln_2(x))).add_(x)


def mlp_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    """``mlp(x)``; open_clip's standard ``c_fc → GELU → c_proj`` runs its GELU in place.

    The hidden activations (``[N*L, 4C]``, 27 MB per ViT-B block at MaskCLIP's size) are then
    written once instead of twice into fresh memory; the result is bit-identical.
    """
    names = [name for name, _ in mlp.named_children()]
    if not isinstance(mlp, nn.Sequential) or names != ["c_fc", "gelu", "c_proj"]:
        return mlp(x)
    fc, act, proj = mlp
    if type(act) is not nn.GELU or not isinstance(fc, nn.Linear):
        return mlp(x)
    hidden = fc(x)
    if hidden.requires_grad:  # autograd needs GELU's input
        return proj(act(hidden))
    torch.ops.aten.gelu_(hidden, approximate=act.approximate)
    return proj(hidden)


class MaskCLIP(nn.Module):
    """Dense CLIP features for a batch of camera images.

    Args:
        clip_model: an open_clip ``CLIP`` model (its ``.visual`` is used) or the visual tower
            itself (``VisionTransformer`` or ``ModifiedResNet``). It is cast to float32, frozen
            and kept in eval mode; the module is shared, not copied.
        normalize: apply the mean/std normalisation inside ``forward`` (images come in [0, 1]).
        mean, std: override the normalisation; default: the model's ``preprocess_cfg`` if
            open_clip attached one, else OpenAI CLIP's values.
        key_smoothing: MaskCLIP's key smoothing in ``logits`` (needs the keys).
        smoothing_threshold: only positions whose max class probability is below this are
            smoothed (MaskCLIP's ``ks_thresh``; 1.0 smooths all but certain positions).
        prompt_denoising: MaskCLIP's prompt denoising in ``logits``.
        denoise_threshold: a class is dropped from an image when its probability stays below
            this at every position (MaskCLIP's ``pd_thresh``).
        temperature: softmax temperature of the refinements (0.01 = CLIP's logit scale 100).
    """

    #: open_clip's towers are untyped: their submodules are reached by name.
    visual: Any
    mean: Tensor  # buffers, registered in __init__
    std: Tensor

    def __init__(
        self,
        clip_model: nn.Module,
        *,
        normalize: bool = True,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        key_smoothing: bool = False,
        smoothing_threshold: float = 1.0,
        prompt_denoising: bool = False,
        denoise_threshold: float = 0.5,
        temperature: float = 0.01,
    ) -> None:
        super().__init__()
        visual: Any = getattr(clip_model, "visual", clip_model)
        if hasattr(visual, "attnpool"):
            self.kind = "rn"
        elif all(hasattr(visual, a) for a in ("conv1", "class_embedding", "transformer")):
            if getattr(visual, "attn_pool", None) is not None:
                raise TypeError("ViTs with an attentional pooler (CoCa) have no MaskCLIP path")
            if getattr(visual, "proj", None) is None:
                raise TypeError("the ViT has no output projection (proj is None)")
            self.kind = "vit"
        else:
            raise TypeError(
                f"unsupported visual tower {type(visual).__name__}: "
                "expected open_clip VisionTransformer or ModifiedResNet"
            )
        self.visual = visual.float().eval().requires_grad_(False)
        if self.kind == "vit":
            self.patch_size = _pair(getattr(visual, "patch_size", visual.conv1.kernel_size))
            self.embed_dim = int(visual.proj.shape[1])
        else:
            self.patch_size = (32, 32)  # stem /4, layer2..4 /2 each
            self.embed_dim = int(visual.attnpool.c_proj.out_features)

        pp = getattr(visual, "preprocess_cfg", None) or {}
        mean = mean or tuple(pp.get("mean", CLIP_MEAN))
        std = std or tuple(pp.get("std", CLIP_STD))
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self.key_smoothing = key_smoothing
        self.smoothing_threshold = smoothing_threshold
        self.prompt_denoising = prompt_denoising
        self.denoise_threshold = denoise_threshold
        self.temperature = temperature

    def train(self, mode: bool = True) -> MaskCLIP:
        # The teacher is frozen: BatchNorm/dropout of the CLIP tower must never leave eval mode.
        super().train(mode)
        self.visual.eval()
        return self

    # ------------------------------------------------------------------ features

    def forward(self, images: Tensor) -> Tensor:
        """``images [N, 3, H, W]`` in [0, 1] → dense features ``[N, D, H/p, W/p]``."""
        return self._features(images, with_keys=False)[0]

    def forward_with_keys(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Dense features ``[N, D, h, w]`` and the last attention layer's keys ``[N, K, h, w]``
        (what key smoothing compares)."""
        features, keys = self._features(images, with_keys=True)
        assert keys is not None
        return features, keys

    def _features(self, images: Tensor, with_keys: bool) -> tuple[Tensor, Tensor | None]:
        # Plain labelling never reads the keys: skipping them saves one projection.
        x = self._prepare(images)
        return self._vit(x, with_keys) if self.kind == "vit" else self._resnet(x, with_keys)

    def _prepare(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        ph, pw = self.patch_size
        if height < ph or width < pw:
            raise ValueError(f"image size {height}x{width} is smaller than one {ph}x{pw} patch")
        if height % ph or width % pw:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}"
            )
        x = images.to(device=self.mean.device, dtype=torch.float32)
        if self.normalize:
            x = (x - self.mean) / self.std
        return x

    def _vit(self, x: Tensor, with_keys: bool) -> tuple[Tensor, Tensor | None]:
        vis = self.visual
        x = vis.conv1(x)  # [N, C, h, w]
        n, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(x.dtype).expand(n, 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + interpolate_positional_embedding(vis.positional_embedding, vis.grid_size, (h, w))
        x = vis.ln_pre(x)

        blocks = list(vis.transformer.resblocks)
        batch_first = getattr(vis.transformer, "batch_first", True)
        for block in blocks[:-1]:
            if is_plain_block(block):
                x = plain_block_forward(block, x)
            elif batch_first:
                x = block(x)
            else:  # older open_clip runs the stack sequence-first
                x = block(x.transpose(0, 1)).transpose(0, 1)

        # The value path is token-local, so the class token can go before the last block.
        x = x[:, 1:]
        last = blocks[-1]
        y = last.ln_1(x)
        _, wk, wv, _, bk, bv = self._qkv_weights(last.attn)
        keys = F.linear(y, wk, bk) if with_keys else None
        a = self._attn_output(last.attn, F.linear(y, wv, bv))
        if hasattr(last, "ln_attn"):  # CustomResidualAttentionBlock (NormFormer-style)
            a = last.ln_attn(a)
        x = x + last.ls_1(a)
        x = x + last.ls_2(mlp_forward(last.mlp, last.ln_2(x)))
        x = vis.ln_post(x) @ vis.proj

        def grid(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(n, -1, h, w)

        return grid(x), grid(keys) if keys is not None else None

    @staticmethod
    def _qkv_weights(attn: Any) -> tuple[Tensor, Tensor, Tensor,
                                         Tensor | None, Tensor | None, Tensor | None]:
        """(wq, wk, wv, bq, bk, bv) of nn.MultiheadAttention or open_clip's custom Attention."""
        if getattr(attn, "in_proj_weight", None) is not None:
            wq, wk, wv = attn.in_proj_weight.chunk(3, dim=0)
        else:  # nn.MultiheadAttention with separate projections (kdim/vdim != embed_dim)
            wq, wk, wv = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
        bias = getattr(attn, "in_proj_bias", None)
        bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
        return wq, wk, wv, bq, bk, bv

    @staticmethod
    def _attn_output(attn: Any, v: Tensor) -> Tensor:
        """What the attention module does to its per-head values after mixing (here: none)."""
        head_scale = getattr(attn, "head_scale", None)
        if head_scale is not None:
            v = (v.unflatten(-1, (attn.num_heads, -1)) * head_scale.view(-1, 1)).flatten(-2)
        if hasattr(attn, "ln_inner"):
            v = attn.ln_inner(v)
        return attn.out_proj(v)

    def _resnet(self, x: Tensor, with_keys: bool) -> tuple[Tensor, Tensor | None]:
        vis = self.visual
        x = vis.stem(x)
        x = vis.layer4(vis.layer3(vis.layer2(vis.layer1(x))))
        pool = vis.attnpool

        def conv1x1(t: Tensor, linear: nn.Linear) -> Tensor:
            return F.conv2d(t, linear.weight[:, :, None, None], linear.bias)

        keys = conv1x1(x, pool.k_proj) if with_keys else None
        return conv1x1(conv1x1(x, pool.v_proj), pool.c_proj), keys

    # ------------------------------------------------------------------ labels

    def logits(
        self,
        features: Tensor,
        text_bank: Tensor,
        image_size: tuple[int, int],
        keys: Tensor | None = None,
    ) -> Tensor:
        """Cosine similarity of every position with every text row, upsampled to the image.

        ``features [N, D, h, w]``, ``text_bank [C, D]`` → ``[N, C, H, W]``. Refinements run at
        feature resolution, before the bilinear upsampling (as in MaskCLIP). After key
        smoothing the values are ``temperature * log p`` of the smoothed probabilities, so
        ``labels_and_confidence`` at the same temperature returns exactly those probabilities.
        """
        if text_bank.ndim != 2 or text_bank.shape[1] != features.shape[1]:
            raise ValueError(
                f"text bank {tuple(text_bank.shape)} does not match feature dim {features.shape[1]}"
            )
        f = F.normalize(features.float(), dim=1)
        t = F.normalize(text_bank.to(f), dim=1)
        out = torch.einsum("ndhw,cd->nchw", f, t)
        if self.prompt_denoising:
            out = self._denoise(out)
        if self.key_smoothing:
            if keys is None:
                raise ValueError("key smoothing needs the keys from forward_with_keys")
            out = self._smooth(out, keys)
        return F.interpolate(out, size=tuple(image_size), mode="bilinear", align_corners=False)

    def _denoise(self, out: Tensor) -> Tensor:
        # A class that is never confident anywhere in the image is most likely absent; dropping
        # it stops it from winning near-ties. The image's most confident class is always kept.
        class_max = torch.softmax(out / self.temperature, dim=1).flatten(2).amax(dim=-1)
        keep = class_max >= self.denoise_threshold
        keep[torch.arange(out.shape[0]), class_max.argmax(dim=1)] = True
        return out.masked_fill(~keep[:, :, None, None], DROPPED_LOGIT)

    def _smooth(self, out: Tensor, keys: Tensor) -> Tensor:
        # Positions whose keys look alike belong to the same object: average their class
        # probabilities. Unlike MaskCLIP's raw key Gram matrix, negative similarities are cut
        # and rows normalised, so the result stays a distribution (the argmax is what matters).
        n, c, h, w = out.shape
        if keys.shape[0] != n or keys.shape[-2:] != (h, w):
            raise ValueError(f"keys {tuple(keys.shape)} do not match logits {tuple(out.shape)}")
        probs = torch.softmax(out / self.temperature, dim=1).flatten(2).transpose(1, 2)
        k = F.normalize(keys.float().flatten(2).transpose(1, 2), dim=-1)  # [N, hw, K]
        affinity = (k @ k.transpose(1, 2)).clamp_min(0)
        affinity = affinity / affinity.sum(dim=-1, keepdim=True).clamp_min(_PROB_FLOOR)
        smoothed = affinity @ probs
        unsure = probs.amax(dim=-1, keepdim=True) < self.smoothing_threshold
        probs = torch.where(unsure, smoothed, probs)
        logp = self.temperature * probs.clamp_min(_PROB_FLOOR).log()
        return logp.transpose(1, 2).reshape(n, c, h, w)

    @staticmethod
    def labels_and_confidence(logits: Tensor, temperature: float = 0.01) -> tuple[Tensor, Tensor]:
        """Per-pixel label (argmax over C) and confidence ``max softmax(logits / temperature)``."""
        conf, labels = torch.softmax(logits / temperature, dim=1).max(dim=1)
        return labels, conf

    def dense_logits(self, images: Tensor, text_bank: Tensor) -> Tensor:
        """``images [N, 3, H, W]`` → logits ``[N, C, H, W]`` (forward + logits, with keys)."""
        features, keys = self.forward_with_keys(images)
        return self.logits(features, text_bank, (images.shape[-2], images.shape[-1]), keys=keys)
