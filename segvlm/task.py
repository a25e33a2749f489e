"""The training task: the model, its criterion and the auxiliary objectives, one ``nn.Module`` (open_clip / timm
style), and ``LossConfig``, the one config of every loss weight.

``SegmentationTask.forward(batch)`` runs the model and returns a dict of named scalar terms plus ``loss`` (the
weighted total), so a training loop computes, logs and back-propagates the loss without knowing which terms
exist::

    task = build_task(model, cfg.loss)            # model: a SegVLM
    terms = task(batch)                           # {"loss", "bce", "focal", "dice", "words_region", ...}
    terms["loss"].backward()
    save_checkpoint(task.model, ...)              # inference checkpoints hold the model only
    torch.save(task.aux_state_dict(), ...)        # training-only heads, for resuming

Auxiliary objectives own their heads (the word objective owns the word head), so the model and its inference
checkpoints hold what inference reads and nothing else, and a head exists exactly when its loss has a weight:
under DDP every trainable parameter of the task is reached by the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from segvlm.config import ConfigError
from segvlm.layers import WordHead
from segvlm.losses import RAFLoss, content_token_mask, region_word_loss, word_prediction_loss
from segvlm.model import SegVLM, SegVLMOutput

__all__ = ["LOSS_PRESETS", "LossConfig", "SegmentationTask", "WordObjective", "build_task"]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Every loss weight of training: the RAF criterion
    ``bce·BCE + focal·Focal(focal_alpha, focal_gamma) + dice·AdaptiveDice(dice_alpha, dice_smooth)`` and the
    weight of each auxiliary objective (0 = the objective and its head do not exist)."""

    bce: float = 1.0
    focal: float = 1.0
    dice: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_alpha: float = 1.0  # exponent a of the self-adjusting factor (1 - p)^a
    dice_smooth: float = 1.0
    # weight of the word objective (WordObjective), on the sum of its two terms: the target region
    # (words_region) and the phrase (words_phrase) each name the words of the phrase's subject, its attributes
    # and name, among the text tower's token embeddings
    words: float = 0.0

    def validate(self) -> None:
        if self.words < 0:
            raise ConfigError(f"loss.words must be >= 0, got {self.words}")
        weights = (self.bce, self.focal, self.dice)
        if min(weights) < 0 or sum(weights) == 0:
            raise ConfigError(f"loss weights must be >= 0 and not all zero, got {weights}")
        if not 0 <= self.focal_alpha <= 1:
            raise ConfigError(f"loss.focal_alpha must lie in [0, 1], got {self.focal_alpha}")


# CLIPSeg's baseline is BCE only; "raf" is the SegVLM default. Presets are plain LossConfigs.
LOSS_PRESETS: dict[str, LossConfig] = {
    "raf": LossConfig(),
    "bce": LossConfig(bce=1.0, focal=0.0, dice=0.0),
    "bce_dice": LossConfig(bce=1.0, focal=0.0, dice=1.0),
}


class WordObjective(nn.Module):
    """The word losses, with the word head (:class:`~segvlm.layers.WordHead`) as this objective's module.

    Terms (unweighted): ``words_region`` (:func:`~segvlm.losses.region_word_loss`: each task's target region,
    pooled from the head's map of the deepest visual tokens, names the target's words) and ``words_phrase``
    (:func:`~segvlm.losses.word_prediction_loss` of the head's map of the pooled phrase). Both score against
    the text tower's token-embedding table. The target words come from ``batch["target_words"]``
    (B strings, tokenised here with the model's tokenizer).
    """

    terms = ("words_region", "words_phrase")

    def __init__(self, vision_width: int, *, phrase_dim: int, word_dim: int) -> None:
        super().__init__()
        self.head = WordHead(vision_width, phrase_dim=phrase_dim, word_dim=word_dim)

    @classmethod
    def for_model(cls, model: SegVLM) -> WordObjective:
        """The objective sized to ``model``'s backbone."""
        backbone = model.backbone
        return cls(backbone.vision_width, phrase_dim=backbone.projection_dim, word_dim=backbone.text_width)

    def forward(self, out: SegVLMOutput, batch: Mapping[str, Any], model: SegVLM) -> dict[str, Tensor]:
        """``{"words_region", "words_phrase"}`` float32 scalars for the model output ``out`` of ``batch``
        (``masks`` B×1×H×W, ``target_words`` B strings)."""
        masks = batch["masks"]
        words = model.backbone.tokenize(list(batch["target_words"]))
        word_ids = words["input_ids"].to(masks.device)
        word_mask = content_token_mask(words["attention_mask"]).to(masks.device)
        feats = out.backbone
        patch = model.backbone.patch_size
        grid = (out.logits.shape[-2] // patch, out.logits.shape[-1] // patch)
        # the per-token map runs once per image and is gathered per phrase after (as the decoder does)
        region = self.head.region_map(feats.activations[-1], grid)  # N×Ct×h×w
        if feats.image_index is not None:
            region = region.index_select(0, feats.image_index)  # B×Ct×h×w
        vocabulary = model.backbone.token_embedding  # V×Ct
        return {
            "words_region": region_word_loss(region, vocabulary, masks, word_ids, word_mask),
            "words_phrase": word_prediction_loss(
                self.head.phrase(feats.text_embedding), vocabulary, word_ids, word_mask
            ),
        }


class SegmentationTask(nn.Module):
    """Referring segmentation training: ``model`` + ``criterion`` (RAF) + weighted auxiliary ``objectives``.

    Args:
        model: the SegVLM (what inference checkpoints store).
        criterion: the mask loss on B×1×H×W logits and targets, returning ``{"loss", <terms>}``.
        objectives: name → module with ``forward(out: SegVLMOutput, batch, model) -> {term: scalar}``;
            the objective's modules (heads) are trained with the model and saved with ``aux_state_dict``.
        weights: name → weight of each objective, multiplying the sum of its terms in the total.
    """

    def __init__(
        self,
        model: SegVLM,
        criterion: nn.Module,
        objectives: Mapping[str, nn.Module] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        objectives = dict(objectives or {})
        weights = dict(weights or {})
        if set(objectives) != set(weights):
            raise ValueError(f"objectives {sorted(objectives)} and weights {sorted(weights)} differ")
        self.model = model
        self.criterion = criterion
        self.objectives = nn.ModuleDict(objectives)
        self.weights = weights

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The loss terms of one batch.

        Args:
            batch: tensors on the model's device: ``pixel_values`` N×3×H×W, ``input_ids`` and
                ``attention_mask`` B×L, ``image_index`` B (optional: None pairs phrase b with image b),
                ``masks`` B×1×H×W in {0, 1}; plus what the objectives read (``target_words``: B strings).

        Returns:
            ``{"loss": weighted total, <term>: unweighted scalar, ...}``: the criterion's terms, then each
            objective's.
        """
        out = self.model.forward_features(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch.get("image_index")
        )
        terms = dict(self.criterion(out.logits, batch["masks"]))
        total = terms.pop("loss")
        for name, objective in self.objectives.items():
            extra = objective(out, batch, self.model)
            clash = (set(extra) & set(terms)) | ({"loss"} & set(extra))
            if clash:
                raise ValueError(f"objective {name!r} returns terms {sorted(clash)} already taken")
            total = total + self.weights[name] * sum(extra.values())
            terms.update(extra)
        return {"loss": total, **terms}

    def aux_state_dict(self) -> dict[str, Tensor]:
        """The objectives' state (training-only heads), for train checkpoints; the model's is saved apart."""
        return self.objectives.state_dict()

    def load_aux_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`aux_state_dict`; every key must fit (raises ``RuntimeError`` naming the keys)."""
        self.objectives.load_state_dict(dict(state), strict=True)


def build_task(model: SegVLM, loss_cfg: LossConfig | str | None = None) -> SegmentationTask:
    """The training task of ``model`` for ``loss_cfg`` (a ``LossConfig``, a :data:`LOSS_PRESETS` name, or
    None for the defaults): the RAF criterion, and the word objective when ``loss_cfg.words > 0``, its head
    on the model's device."""
    if loss_cfg is None:
        loss_cfg = LossConfig()
    elif isinstance(loss_cfg, str):
        if loss_cfg not in LOSS_PRESETS:
            raise KeyError(f"unknown loss preset {loss_cfg!r}; known: {sorted(LOSS_PRESETS)}")
        loss_cfg = LOSS_PRESETS[loss_cfg]
    loss_cfg.validate()
    criterion = RAFLoss(
        bce=loss_cfg.bce,
        focal=loss_cfg.focal,
        dice=loss_cfg.dice,
        focal_alpha=loss_cfg.focal_alpha,
        focal_gamma=loss_cfg.focal_gamma,
        dice_alpha=loss_cfg.dice_alpha,
        dice_smooth=loss_cfg.dice_smooth,
    )
    objectives: dict[str, nn.Module] = {}
    weights: dict[str, float] = {}
    if loss_cfg.words > 0:
        objectives["words"], weights["words"] = WordObjective.for_model(model), loss_cfg.words
    device = next(model.parameters(), torch.empty(0)).device
    return SegmentationTask(model, criterion, objectives, weights).to(device)
