"""SegVLM: a CLIP backbone and a segmentation decoder, assembled from finished parts.

Built segment-anything style (``SegVLM(backbone, decoder)``); ``segvlm.registry.build_model(cfg)`` builds
both parts from a ``ModelConfig``. ``forward`` returns mask logits, never a loss; ``forward_features`` also
returns the backbone's and the decoder's outputs, what training objectives (``segvlm.task``) read.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from segvlm.backbone import BackboneOutput, CLIPBackbone
from segvlm.decoder import DecoderOutput, SegDecoder

__all__ = ["SegVLM", "SegVLMOutput", "count_parameters"]


@dataclasses.dataclass(frozen=True)
class SegVLMOutput:
    """:meth:`SegVLM.forward_features`: the backbone's features (image rows N, phrase rows B, paired by
    ``backbone.image_index``) and the decoder's output (phrase rows B)."""

    backbone: BackboneOutput
    decoder: DecoderOutput

    @property
    def logits(self) -> Tensor:
        """B×1×H×W mask logits."""
        return self.decoder.logits


def count_parameters(module: nn.Module) -> dict[str, int]:
    """``{"total": n, "trainable": n_requires_grad}`` over ``module``'s (deduplicated) parameters."""
    params = list(module.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


class SegVLM(nn.Module):
    """Referring image segmentation: image + phrase → mask logits.

    Args:
        backbone: CLIP image and text towers (``CLIPBackbone``).
        decoder: the decoder over the backbone's activations, conditioned on the phrase (``SegDecoder``).
    """

    def __init__(self, backbone: CLIPBackbone, decoder: SegDecoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_index: Tensor | None = None,
    ) -> Tensor:
        """Mask logits for each (image, phrase) pair.

        Args:
            pixel_values: N×3×H×W CLIP-normalised images, H and W multiples of the patch size.
            input_ids: B×L token ids (``self.backbone.tokenize``).
            attention_mask: B×L, 1 for real tokens, 0 for padding.
            image_index: B int64, phrase b's image is ``pixel_values[image_index[b]]``, so an image with
                several phrases is encoded once; None pairs phrase b with image b (N = B).

        Returns:
            B×1×H×W logits (apply a sigmoid for probabilities).
        """
        return self.forward_features(pixel_values, input_ids, attention_mask, image_index).logits

    def forward_features(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_index: Tensor | None = None,
    ) -> SegVLMOutput:
        """:meth:`forward` (same arguments), returning the backbone's output (``activations``: N×(1+h·w)×Cv
        per extracted layer, shallow → deep; ``text_embedding``: B×P pooled phrase; ...) and the decoder's
        (:class:`~segvlm.decoder.DecoderOutput`: B×1×H×W ``logits`` and the switches' maps) with them."""
        feats = self.backbone(pixel_values, input_ids, attention_mask, image_index=image_index)
        out = self.decoder(
            feats.activations,
            feats.text_embedding,
            feats.text_tokens,
            feats.text_mask,
            image_size=(pixel_values.shape[-2], pixel_values.shape[-1]),
            stem_features=feats.stem_features,
            image_index=feats.image_index,
            pixel_values=pixel_values,
        )
        return SegVLMOutput(backbone=feats, decoder=out)

    def num_parameters(self) -> dict:
        """Total and trainable parameter counts, overall and per module.

        Returns ``{"total", "trainable", "modules": {"backbone": {...}, "decoder": {...},
        "decoder.<child>": {...}}}``, each inner dict holding ``total`` and ``trainable``.
        """
        modules = {"backbone": count_parameters(self.backbone), "decoder": count_parameters(self.decoder)}
        for name, child in self.decoder.named_children():
            modules[f"decoder.{name}"] = count_parameters(child)
        for p_name, p in self.decoder.named_parameters(
            recurse=False
        ):  # parameters held by the decoder itself
            modules[f"decoder.{p_name}"] = {
                "total": p.numel(),
                "trainable": p.numel() if p.requires_grad else 0,
            }
        return {**count_parameters(self), "modules": modules}
