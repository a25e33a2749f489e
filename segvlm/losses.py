"""The RAF (Referring-Aware Fusion) loss: ``λ_bce·BCE + λ_focal·Focal(α, γ) + λ_dice·AdaptiveDice(a, s)``.

Like open_clip's losses, :class:`RAFLoss` returns a dict of named scalars (``loss`` plus every term on its own)
so that the caller can log each term without knowing the formula. The weights come from ``segvlm.task.LossConfig``,
read by the training task (``segvlm.task.build_task``) only.

Layouts: ``logits`` and ``targets`` are B×1×H×W (what the decoder emits) or B×H×W; every term flattens them
to B×N (N = H·W) before reducing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RAFLoss",
    "adaptive_dice_loss",
    "bce_loss",
    "content_token_mask",
    "region_word_loss",
    "sigmoid_focal_loss",
    "word_prediction_loss",
]


def _flatten(x: Tensor, batch: int) -> Tensor:
    """B×1×H×W or B×H×W (or any B×…) → B×N."""
    return x.reshape(batch, -1)


def _weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Mean over all pixels, or ``Σ w·v / Σ w`` when a per-pixel weight is given (weights of 0 ignore pixels)."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(torch.finfo(values.dtype).tiny)


def bce_loss(logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
    """Pixel-mean binary cross-entropy on logits (``F.binary_cross_entropy_with_logits``, reduction="mean")."""
    return _weighted_mean(F.binary_cross_entropy_with_logits(logits, targets, reduction="none"), weight)


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Focal loss (Lin et al. 2017), term for term ``torchvision.ops.sigmoid_focal_loss(..., reduction="mean")``.

    ``FL = α_t · (1 − p_t)^γ · BCE`` with ``p_t = p·y + (1 − p)·(1 − y)``, ``α_t = α·y + (1 − α)·(1 − y)``;
    ``alpha < 0`` disables the class weighting exactly as torchvision does. Re-implemented (rather than
    imported) only to add the optional per-pixel ``weight``; without it the value is torchvision's.
    """
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _weighted_mean(loss, weight)


def adaptive_dice_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    smooth: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Self-adjusting Dice loss of Li et al. 2020 ("Dice Loss for Data-imbalanced NLP Tasks", eq. for DSC).

    Per sample b over its pixels i (logits/targets B×N)::

        q_i  = (1 − p_i)^a · p_i                              # p = sigmoid(logit)
        L_b  = 1 − (2·Σ_i q_i·y_i + s) / (Σ_i q_i + Σ_i y_i + s)
        loss = mean_b L_b

    Choices, and why:

    * Sums are **per sample**, then averaged over the batch: a referring phrase is one decision per image,
      and pooling all pixels of a batch would let large objects drown small ones (and would let a negative
      be "explained" by other samples' positives).
    * ``s > 0`` keeps empty targets (synthetic negatives, Σy = 0) finite and meaningful: the loss becomes
      ``1 − s / (Σq + s)`` — 0 for an empty prediction, rising towards 1 as the (soft) false-positive mass
      Σq grows past s. The self-adjusting factor ``(1 − p)^a`` makes q small both for p → 0 and p → 1, so a
      region of moderately confident false positives (p ≈ 0.5–0.9 over many pixels) gives a loss near 1,
      while *extremely* confident errors (p → 1) fade from this term by design (Li et al.'s "easy example"
      down-weighting) and are penalised by the BCE and focal terms instead.
    * The gradient flows through ``(1 − p)^a`` as in the paper (no detach).
    * ``weight`` (B×N, optional) multiplies every pixel's contribution to the three sums.
    """
    prob = torch.sigmoid(logits)
    q = (1 - prob) ** alpha * prob if alpha != 0 else prob
    if weight is not None:
        q = q * weight
        targets = targets * weight
    numerator = 2 * (q * targets).sum(dim=1) + smooth
    denominator = q.sum(dim=1) + targets.sum(dim=1) + smooth
    return (1 - numerator / denominator).mean()


class RAFLoss(nn.Module):
    """RAF loss: ``bce·BCE + focal·Focal(focal_alpha, focal_gamma) + dice·AdaptiveDice(dice_alpha, dice_smooth)``.

    ``forward`` returns ``{"loss": weighted total, "bce": …, "focal": …, "dice": …}``, every value a float32
    scalar. The three terms are the *unweighted* values so that runs with different weights stay comparable
    in the logs.

    A term whose weight is 0 is left out of the total and out of the autograd graph; by default
    (``report_disabled=True``) it is still computed under ``torch.no_grad()`` and reported detached, because
    its value is cheap next to a forward pass and lets e.g. the BCE-only CLIPSeg baseline be compared with
    RAF runs on Dice. With ``report_disabled=False`` it is reported as a constant 0 instead.
    """

    terms = ("bce", "focal", "dice")

    def __init__(
        self,
        *,
        bce: float = 1.0,
        focal: float = 1.0,
        dice: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        dice_alpha: float = 1.0,
        dice_smooth: float = 1.0,
        report_disabled: bool = True,
    ) -> None:
        super().__init__()
        if min(bce, focal, dice) < 0 or bce + focal + dice == 0:
            raise ValueError(f"RAF weights must be >= 0 and not all zero, got {(bce, focal, dice)}")
        self.weights = {"bce": float(bce), "focal": float(focal), "dice": float(dice)}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.dice_alpha, self.dice_smooth = dice_alpha, dice_smooth
        self.report_disabled = report_disabled

    def _term(self, name: str, logits: Tensor, targets: Tensor, weight: Tensor | None) -> Tensor:
        if name == "bce":
            return bce_loss(logits, targets, weight)
        if name == "focal":
            return sigmoid_focal_loss(logits, targets, self.focal_alpha, self.focal_gamma, weight)
        return adaptive_dice_loss(logits, targets, self.dice_alpha, self.dice_smooth, weight)

    def extra_repr(self) -> str:
        w = self.weights
        return (
            f"bce={w['bce']}, focal={w['focal']}, dice={w['dice']}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}, dice_alpha={self.dice_alpha}, dice_smooth={self.dice_smooth}"
        )

    def forward(
        self, logits: Tensor, targets: Tensor, weight_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Loss terms for ``logits`` (B×1×H×W or B×H×W) against ``targets`` of the same shape in {0, 1}.

        ``targets`` may be float or bool. ``weight_mask`` (same shape, optional, ≥ 0) weights pixels: BCE and
        focal become ``Σ w·ℓ / Σ w`` and every Dice sum is taken over ``w``-weighted pixels.
        """
        if logits.shape[0] != targets.shape[0] or logits.numel() != targets.numel():
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
        batch = logits.shape[0]
        # Autocast would run BCE/exp/pow in bf16/fp16 and lose the small focal and Dice values; every term
        # is computed in float32 with autocast off, whatever the caller's context.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = _flatten(logits, batch).float()
            y = _flatten(targets, batch).float()
            w = None if weight_mask is None else _flatten(weight_mask, batch).float()
            out: dict[str, Tensor] = {}
            total = x.new_zeros(())
            for name in self.terms:
                lam = self.weights[name]
                if lam != 0:
                    value = self._term(name, x, y, w)
                    total = total + lam * value
                elif self.report_disabled:
                    with torch.no_grad():
                        value = self._term(name, x, y, w)
                else:
                    value = x.new_zeros(())
                out[name] = value
        return {"loss": total, **out}


def content_token_mask(attention_mask: Tensor) -> Tensor:
    """B×L 0/1 attention mask of CLIP-tokenized texts → B×L bool, True for the tokens between the start and
    end tokens (CLIP's tokenizers wrap every text, even an empty one, in BOS … EOS)."""
    real = attention_mask.bool()
    positions = torch.arange(real.shape[1], device=real.device)
    last = (real * positions).amax(dim=1, keepdim=True)  # the EOS of each row
    return real & (positions > 0) & (positions < last)


def word_prediction_loss(
    embedding: Tensor,
    vocabulary: Tensor,
    word_ids: Tensor,
    word_mask: Tensor,
    valid: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of embeddings against the words that name their targets.

    Args:
        embedding: B×C, one embedding per task (a pooled region, or the phrase).
        vocabulary: V×C token embeddings of the text tower (the classifier's weights, shared with it).
        word_ids: B×L token ids of the words naming task b's target; word_mask: B×L, True where
            ``word_ids`` holds one (``content_token_mask`` of the tokenized words).
        valid: B bool, tasks to count (default: all).

    Task b's logits are ``vocabulary @ embedding_b`` (V) and its label is the uniform distribution over its
    distinct word ids. Returns the mean over valid tasks with at least one word of
    ``−Σ_v label_v · log softmax(logits)_v``; 0 (in the graph) when there is none. Float32 under autocast.
    """
    with torch.autocast(device_type=embedding.device.type, enabled=False):
        logits = embedding.float() @ vocabulary.float().T  # B×V
        counts = torch.zeros_like(logits).scatter_add_(1, word_ids.clamp_min(0), word_mask.float())
        label = (counts > 0).float()  # a word named twice counts once
        words = label.sum(1)
        counted = words > 0 if valid is None else valid & (words > 0)
        per_task = -(label * logits.log_softmax(dim=1)).sum(1) / words.clamp_min(1)
        return (per_task * counted).sum() / counted.sum().clamp_min(1)


def region_word_loss(
    word_embedding: Tensor,
    vocabulary: Tensor,
    targets: Tensor,
    word_ids: Tensor,
    word_mask: Tensor,
) -> Tensor:
    """:func:`word_prediction_loss` of each task's target region.

    Args:
        word_embedding: B×C×h×w dense embeddings (``WordHead.region_map``), one map per task.
        vocabulary, word_ids, word_mask: as in :func:`word_prediction_loss`.
        targets: B×1×H×W (or B×H×W) target masks in {0, 1}.

    Task b's region is the mean of its map weighted by its target averaged down to h×w; tasks with an empty
    target (negatives) are left out.
    """
    b, _, h, w = word_embedding.shape
    with torch.autocast(device_type=word_embedding.device.type, enabled=False):
        weight = F.adaptive_avg_pool2d(targets.reshape(b, 1, *targets.shape[-2:]).float(), (h, w)).flatten(1)
        area = weight.sum(1)  # B
        region = torch.einsum("bcn,bn->bc", word_embedding.float().flatten(2), weight)
        region = region / area.clamp_min(1e-12)[:, None]  # B×C
    return word_prediction_loss(region, vocabulary, word_ids, word_mask, valid=area > 0)
