"""CLIPSeg's decoder with SegVLM's switches.

With every SegVLM switch off, :class:`SegDecoder` computes exactly what transformers'
``CLIPSegDecoder`` computes and uses its parameter names, so a CLIPSeg checkpoint's ``decoder.*`` keys
load 1:1. Each switch adds freshly initialised modules whose last step is zero (a ``tanh`` gate, a
LayerScale, a 1×1 conv), so with the same CLIPSeg weights the output at init is unchanged: fine-tuning
starts from CLIPSeg's quality.

Per extracted layer i, deepest first (CLIPSeg)::

    a = reduces[i](h_i) (+ a)                       B×(1+N)×D
    a = film(a, film_mul(c), film_add(c))            at i == conditional_layer
    a = layers[i](a)                                 post-norm self-attention + ReLU MLP [relative_position: offset bias]
    a = cross_attn[i](a, text)                       [cross_attention] gated, identity at init
    x = a[:, 1:] as B×D×h×w                          drop CLS
    x = projector(x, phrase)                         [projector] + 0-init 1×1 conv of a similarity map
    x = relational(x, text)                          [relational_context] where the reference object lies
    x = refine(x, phrase)                            [deformable / se / residual]
    logits = head(x (+ stem))                        [stem_skip] after the first ConvT
    logits = <head features, kernel(phrase)> + bias  [head="text_kernel"] at 1/4 resolution, then ×4:
                                                     bilinear, or [upsample="convex"] guided by the pixels

``SegDecoder.forward`` returns a :class:`DecoderOutput`: the logits and what the switches computed on the way
(deformable offsets and modulation, the projector's similarity map, the relational context's reference
map). Training-only heads live with their objectives (``segvlm.task``), not here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segvlm.config import ConfigError, DecoderConfig
from segvlm.layers import (
    ConvexUpsample,
    GatedCrossAttention,
    RelationalContext,
    RelativePositionBias,
    ResidualRefinementBlock,
    TextImageProjector,
    film,
    get_act_layer,
    get_norm_layer,
    sincos_1d,
    sincos_2d,
)

__all__ = ["HEADS", "DecoderOutput", "SegDecoder", "register_head"]

LAYER_NORM_EPS = 1e-5  # CLIP's; CLIPSeg's decoder layers inherit it from the vision config


@dataclasses.dataclass(frozen=True)
class DecoderOutput:
    """What :meth:`SegDecoder.forward` computes, one row per phrase (B); h×w is the token grid.

    Attributes:
        logits: B×1×H×W mask logits (apply a sigmoid for probabilities).
        offsets: B×18×h×w offsets (Δy, Δx per 3×3 tap) of the deformable conv, with grad; None without it.
        modulation: B×9×h×w modulation masks in (0, 1) of the deformable conv; None without it.
        similarity: B×1×h×w scaled phrase–location cosine similarity of the projector; None without it.
        reference: B×h×w distribution of the phrase's reference object over the token grid (relational
            context); None without it.
    """

    logits: Tensor
    offsets: Tensor | None = None
    modulation: Tensor | None = None
    similarity: Tensor | None = None
    reference: Tensor | None = None


# ------------------------------------------------------------------------------------------------ heads
# A head builder returns the modules the head adds to the decoder, keyed by attribute name: the names are
# the state-dict prefixes, so CLIPSeg's ``transposed_convolution.*`` load 1:1 whatever the head.
HeadBuilder = Callable[..., dict[str, nn.Module]]
HEADS: dict[str, HeadBuilder] = {}


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator adding a head builder ``(cfg, *, dim, patch_size, cond_dim) -> {attribute: module}`` to
    :data:`HEADS` under ``name`` (the value of ``DecoderConfig.head``)."""

    def wrap(fn: HeadBuilder) -> HeadBuilder:
        if name in HEADS:
            raise ValueError(f"decoder head {name!r} is already registered")
        HEADS[name] = fn
        return fn

    return wrap


def _upsampler(cfg: DecoderConfig, dim: int, patch_size: int, *, last: bool) -> nn.Module:
    """CLIPSeg's ``transposed_convolution``: B×D×h×w → B×1×(h·patch)×(w·patch); without its ``last`` ConvT
    it ends at B×D/2×(h·patch/4)×(w·patch/4) (ReLU'd features, for the text kernel)."""
    if not cfg.complex_transposed_convolution:
        return nn.ConvTranspose2d(dim, 1, kernel_size=patch_size, stride=patch_size)
    if patch_size % 4:
        raise ValueError(f"the complex transposed convolution needs patch_size % 4 == 0, got {patch_size}")
    # CLIPSeg uses (patch/4, patch/4), i.e. (4, 4) at patch 16; (patch/4, 4) equals that there and keeps the
    # total at ×patch and the middle at 1/4 resolution (where stem features join) for any patch
    k1, k2 = patch_size // 4, 4
    layers: list[nn.Module] = [
        nn.Conv2d(dim, dim, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(dim, dim // 2, kernel_size=k1, stride=k1),
        nn.ReLU(),
    ]
    if last:
        layers.append(nn.ConvTranspose2d(dim // 2, 1, kernel_size=k2, stride=k2))
    return nn.Sequential(*layers)


@register_head("convt")
def convt_head(cfg: DecoderConfig, *, dim: int, patch_size: int, cond_dim: int) -> dict[str, nn.Module]:
    """CLIPSeg's head: conv3×3 → ReLU → ConvT → ReLU → ConvT (or one ConvT without the complex head)."""
    return {"transposed_convolution": _upsampler(cfg, dim, patch_size, last=True)}


@register_head("text_kernel")
def text_kernel_head(cfg: DecoderConfig, *, dim: int, patch_size: int, cond_dim: int) -> dict[str, nn.Module]:
    """CLIPSeg's head up to its last ConvT, then a 1×1 conv whose kernel (D/2) and bias (1) are a linear map
    of the phrase (``text_kernel``: B×cond_dim → B×(D/2 + 1))."""
    return {
        "transposed_convolution": _upsampler(cfg, dim, patch_size, last=False),
        "text_kernel": nn.Linear(cond_dim, dim // 2 + 1),
    }


class DecoderAttention(nn.Module):
    """CLIPSeg's multi-head self-attention over B×N×D tokens (parameter names q/k/v/out_proj)."""

    def __init__(self, dim: int, *, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``bias``: an additive attention bias broadcastable to B×heads×N×N (relative positions)."""
        b, n, d = x.shape
        # B×N×D → B×heads×N×D/heads
        q, k, v = (
            p(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class DecoderMLP(nn.Module):
    def __init__(self, dim: int, *, hidden_dim: int, act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DecoderLayer(nn.Module):
    """CLIPSeg's decoder layer: a *post*-norm transformer layer (``nn.TransformerEncoderLayer`` of the
    original CLIPSeg), ReLU MLP. HF's port forces ``hidden_act="relu"`` whatever its config says."""

    def __init__(
        self, dim: int, *, num_heads: int, intermediate_size: int, eps: float = LAYER_NORM_EPS
    ) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(dim, num_heads=num_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = DecoderMLP(dim, hidden_dim=intermediate_size, act_layer=nn.ReLU)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x = self.layer_norm1(x + self.self_attn(x, bias))
        return self.layer_norm2(x + self.mlp(x))


class SegDecoder(nn.Module):
    """CLIPSeg decoder + SegVLM switches (see the module docstring for the data flow).

    Args:
        cfg: the decoder config; all of cross_attention / projector / deformable / se / residual /
            stem_skip off is CLIPSeg.
        vision_width: width of the backbone's tokens; text_width: width of the text encoder's tokens;
        projection_dim: width of the pooled phrase embedding ``cond`` (CLIP's projection);
        num_layers: number of extracted backbone layers; patch_size: backbone patch size;
        stem_channels: channels of the conv stem's 1/4-resolution features (``cfg.stem_skip`` only).

    Parameters created per switch (nothing else changes):
        cross_attention → ``cross_attn.{i}`` after every decoder layer, and ``cross_attn_text``
        (Linear text_width → D) unless the projector supplies the tokens; projector → ``projector``;
        deformable / se / residual → ``refine`` (see :class:`ResidualRefinementBlock`); stem_skip →
        ``stem_proj``; relational_context → ``relational``; relative_position → ``rel_pos.{i}`` (one bias per
        decoder layer); ``head="text_kernel"`` → ``text_kernel`` in place of ``transposed_convolution.4``
        (the one choice that removes a CLIPSeg parameter: the last ConvT); upsample="convex" → ``upsampler``.
    """

    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        vision_width: int,
        text_width: int,
        projection_dim: int,
        num_layers: int,
        patch_size: int,
        stem_channels: int | None = None,
    ) -> None:
        super().__init__()
        cfg.validate()
        d = cfg.reduce_dim
        self.cfg = cfg
        self.num_layers = num_layers
        self.patch_size = patch_size
        self.conditional_layer = cfg.conditional_layer
        if not 0 <= cfg.conditional_layer < num_layers:
            raise ValueError(f"conditional_layer {cfg.conditional_layer} outside 0..{num_layers - 1}")

        # ---- CLIPSeg (names match transformers' CLIPSegDecoder)
        self.film_mul = nn.Linear(projection_dim, d)
        self.film_add = nn.Linear(projection_dim, d)
        self.reduces = nn.ModuleList(nn.Linear(vision_width, d) for _ in range(num_layers))
        self.layers = nn.ModuleList(
            DecoderLayer(d, num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size)
            for _ in range(num_layers)
        )
        # ---- the head (a registered builder; its modules become attributes, so their names are CLIPSeg's)
        if cfg.head not in HEADS:
            raise ConfigError(f"decoder.head must be one of {sorted(HEADS)}, got {cfg.head!r}")
        self.text_kernel: nn.Linear | None = None
        head_modules = HEADS[cfg.head](
            cfg, dim=d, patch_size=patch_size, cond_dim=d if cfg.projector else projection_dim
        )
        for name, module in head_modules.items():
            setattr(self, name, module)

        # ---- SegVLM additions, each identity at init
        self.projector = (
            TextImageProjector(
                d, text_width=text_width, cond_dim=projection_dim, project_tokens=cfg.cross_attention
            )
            if cfg.projector
            else None
        )
        self.cross_attn = (
            nn.ModuleList(GatedCrossAttention(d, num_heads=cfg.num_heads) for _ in range(num_layers))
            if cfg.cross_attention
            else None
        )
        self.cross_attn_text = nn.Linear(text_width, d) if cfg.cross_attention and not cfg.projector else None
        self.rel_pos = (
            nn.ModuleList(RelativePositionBias(cfg.num_heads) for _ in range(num_layers))
            if cfg.relative_position
            else None
        )
        self.relational = RelationalContext(d, text_width=text_width) if cfg.relational_context else None
        self.refine = (
            ResidualRefinementBlock(
                d,
                cond_dim=d if cfg.projector else projection_dim,
                deformable=cfg.deformable,
                se=cfg.se,
                residual=cfg.residual,
                norm_layer=get_norm_layer(cfg.norm),
                act_layer=get_act_layer(cfg.act),
                se_reduction=cfg.se_reduction,
                deform_impl=cfg.deform_impl,  # type: ignore[arg-type]
            )
            if cfg.deformable or cfg.se or cfg.residual
            else None
        )
        self.stem_proj = None
        if cfg.stem_skip:
            if not stem_channels:
                raise ValueError("decoder.stem_skip needs stem_channels")
            self.stem_proj = nn.Conv2d(stem_channels, d // 2, kernel_size=1)
            nn.init.zeros_(self.stem_proj.weight)
            nn.init.zeros_(self.stem_proj.bias)
        # the text kernel's logits are at 1/4 resolution: ×4 back to the pixels
        self.upsampler = (
            ConvexUpsample(4, feature_channels=stem_channels or 0) if cfg.upsample == "convex" else None
        )

    def forward(
        self,
        activations: list[Tensor],
        cond: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        image_size: tuple[int, int],
        stem_features: Tensor | None = None,
        image_index: Tensor | None = None,
        pixel_values: Tensor | None = None,
    ) -> DecoderOutput:
        """Segmentation logits, one map per phrase, with the switches' intermediate maps.

        Args:
            activations: ``num_layers`` tensors N×(1+h·w)×vision_width, shallow → deep, CLS first: one row
                per image (N = B without ``image_index``).
            cond: B×projection_dim pooled projected phrase embedding (FiLM input).
            text_tokens: B×L×text_width last hidden states of the text encoder.
            text_mask: B×L bool, True = real token.
            image_size: (H, W) of the input pixels; the token grid is (H/patch, W/patch).
            stem_features: N×stem_channels×H/4×W/4 (``cfg.stem_skip`` only).
            image_index: B int64, phrase b's image row; None pairs phrase b with row b. The per-token
                linear maps of the image features (``reduces``, ``stem_proj``) run once per image, before
                the rows are gathered per phrase.
            pixel_values: N×3×H×W input pixels (``cfg.upsample="convex"`` only: they guide the upsampling).

        Returns:
            :class:`DecoderOutput`: logits B×1×H×W, and ``offsets`` / ``modulation`` (deformable) and
            ``similarity`` (projector), ``reference`` (relational context) when those are on.
        """
        if len(activations) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} activations, got {len(activations)}")
        b = cond.shape[0]
        H, W = image_size
        h, w = H // self.patch_size, W // self.patch_size
        if activations[0].shape[1] != 1 + h * w:
            raise ValueError(
                f"activations hold {activations[0].shape[1]} tokens; image {H}x{W} at patch {self.patch_size} "
                f"needs 1 + {h}x{w}"
            )
        phrase = cond  # conditioning vector of the refinement block
        text = None  # B×L×D keys / values of the cross-attention
        if self.projector is not None:
            phrase, text = self.projector.project_text(
                cond, text_tokens if self.cross_attn is not None else None
            )
        if self.cross_attn is not None:
            if self.cross_attn_text is not None:
                text = self.cross_attn_text(text_tokens)
            d = text.shape[-1]
            # CLS has no grid position: zero encoding
            pos = torch.cat((text.new_zeros(1, d), sincos_2d(h, w, d, device=text.device).to(text.dtype)))
            text_pos = sincos_1d(text.shape[1], d, device=text.device).to(text.dtype)

        def per_phrase(x: Tensor) -> Tensor:  # N×… image rows → B×… phrase rows
            return x if image_index is None else x.index_select(0, image_index)

        a = None
        for i, (activation, layer, reduce) in enumerate(zip(activations[::-1], self.layers, self.reduces)):
            reduced = per_phrase(reduce(activation))  # B×(1+h·w)×D
            a = reduced if a is None else reduced + a
            if i == self.conditional_layer:
                a = film(a, self.film_mul(cond), self.film_add(cond))
            a = layer(a, None if self.rel_pos is None else self.rel_pos[i](h, w))
            if self.cross_attn is not None:
                a = self.cross_attn[i](a, text, text_mask, pos, text_pos)

        x = a[:, 1:, :].transpose(1, 2).reshape(b, -1, h, w)  # B×D×h×w, row-major tokens
        similarity = offsets = modulation = reference = None
        if self.projector is not None:
            x, similarity = self.projector(x, phrase)
        if self.relational is not None:
            x, reference = self.relational(x, text_tokens, text_mask)
        if self.refine is not None:
            x, offsets, modulation = self.refine(x, phrase)
        skip = None
        if self.stem_proj is not None:
            if stem_features is None:
                raise ValueError("decoder.stem_skip is on but no stem_features were given")
            skip = per_phrase(self.stem_proj(stem_features))  # B×D/2×H/4×W/4
        logits = self._head(x, skip, phrase)
        if self.upsampler is not None:  # the text kernel's 1/4-resolution logits ×4, guided by the pixels
            if pixel_values is None:
                raise ValueError("decoder.upsample='convex' needs the pixel_values")
            grid = logits.shape[-2:]  # H/4 × W/4 unless H, W are not multiples of the patch: then resize
            s = self.upsampler.scale
            if pixel_values.shape[-2:] != (grid[0] * s, grid[1] * s):
                pixel_values = F.interpolate(
                    pixel_values, size=(grid[0] * s, grid[1] * s), mode="bilinear", align_corners=False
                )
            if stem_features is not None and stem_features.shape[-2:] != grid:
                stem_features = F.interpolate(stem_features, size=grid, mode="bilinear", align_corners=False)
            weights = self.upsampler.weights(pixel_values, stem_features)  # once per image
            logits = self.upsampler(logits, weights, image_index)
        if logits.shape[-2:] != (H, W):  # text kernel (1/4 resolution), or H, W not multiples of the patch
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        return DecoderOutput(
            logits, offsets=offsets, modulation=modulation, similarity=similarity, reference=reference
        )

    def _head(self, x: Tensor, skip: Tensor | None, phrase: Tensor) -> Tensor:
        """B×D×h×w → B×1×(h·patch)×(w·patch) logits, or B×1×(h·patch/4)×(w·patch/4) with the text kernel.
        The projected stem features (``skip``, B×D/2×H/4×W/4) join after the first ConvT (1/4 resolution),
        before its ReLU, so the skip can suppress as well as excite."""
        if not self.cfg.complex_transposed_convolution:
            return self.transposed_convolution(x)
        conv, relu1, up1, relu2 = list(self.transposed_convolution)[:4]
        y = up1(relu1(conv(x)))  # B×D/2×(h·patch/4)×(w·patch/4)
        if skip is not None:
            if skip.shape[-2:] != y.shape[-2:]:
                skip = F.interpolate(skip, size=y.shape[-2:], mode="bilinear", align_corners=False)
            y = y + skip
        features = relu2(y)
        if self.text_kernel is None:
            return self.transposed_convolution[4](features)
        kernel = self.text_kernel(phrase)  # B×(D/2 + 1)
        # one 1×1 conv per phrase: B×D/2×h'×w' · B×D/2 → B×1×h'×w'
        return (
            torch.einsum("bchw,bc->bhw", features, kernel[:, :-1]).unsqueeze(1) + kernel[:, -1:, None, None]
        )
