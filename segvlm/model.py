"""SegVLM: a CLIP backbone and a segmentation decoder, assembled from finished parts.

Built segment-anything style (``SegVLM(backbone, decoder)``); ``segvlm.registry.build_model(cfg)`` builds
both parts from a ``ModelConfig``. ``forward`` returns mask logits, never a loss.
"""

from __future__ import annotations

from torch import Tensor, nn

from segvlm.backbone import CLIPBackbone
from segvlm.decoder import SegDecoder

__all__ = ["SegVLM", "count_parameters"]


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
        *,
        return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Mask logits for each (image, phrase) pair.

        Args:
            pixel_values: N×3×H×W CLIP-normalised images, H and W multiples of the patch size.
            input_ids: B×L token ids (``self.backbone.tokenize``).
            attention_mask: B×L, 1 for real tokens, 0 for padding.
            image_index: B int64, phrase b's image is ``pixel_values[image_index[b]]``, so an image with
                several phrases is encoded once; None pairs phrase b with image b (N = B).
            return_aux: also return the decoder's auxiliary tensors (``SegDecoder.forward``), e.g. what the
                region–phrase loss reads, and with the decoder's word head ``vocabulary``: the text tower's
                V×text_width token embeddings, what the word losses score against.

        Returns:
            B×1×H×W logits (apply a sigmoid for probabilities), or ``(logits, aux)``.
        """
        feats = self.backbone(pixel_values, input_ids, attention_mask, image_index=image_index)
        out = self.decoder(
            feats.activations,
            feats.text_embedding,
            feats.text_tokens,
            feats.text_mask,
            image_size=(pixel_values.shape[-2], pixel_values.shape[-1]),
            stem_features=feats.stem_features,
            image_index=feats.image_index,
            return_aux=return_aux,
        )
        if return_aux and self.decoder.word_head is not None:
            out[1]["vocabulary"] = self.backbone.token_embedding
        return out

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
