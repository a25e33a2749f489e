"""RAF loss: hand-computed BCE / focal / adaptive-Dice values, torchvision parity, empty targets, autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from segvlm.losses import RAFLoss, adaptive_dice_loss


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(x: float, y: int) -> float:
    # -[y·log σ(x) + (1−y)·log(1−σ(x))] = log(1 + e^{−x}) for y = 1, log(1 + e^{x}) for y = 0
    return math.log(1 + math.exp(-x)) if y else math.log(1 + math.exp(x))


def focal(x: float, y: int, alpha: float, gamma: float) -> float:
    p = sig(x)
    p_t = p if y else 1 - p
    alpha_t = alpha if y else 1 - alpha
    return alpha_t * (1 - p_t) ** gamma * bce(x, y)


def test_2x2_hand_values() -> None:
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])  # 1×1×2×2
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = RAFLoss()(logits, targets)

    exp_bce = (
        math.log(2) + math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))
    ) / 4
    # focal, α = 0.25, γ = 2: α_t·(1 − p_t)²·BCE per pixel
    exp_focal = (
        0.25 * 0.5**2 * math.log(2)
        + 0.75 * sig(2) ** 2 * math.log(1 + math.exp(2))
        + 0.75 * sig(-1) ** 2 * math.log(1 + math.exp(-1))
        + 0.25 * (1 - sig(3)) ** 2 * math.log(1 + math.exp(-3))
    ) / 4
    # adaptive Dice, a = 1, s = 1: q = (1 − p)·p
    q = [(1 - sig(v)) * sig(v) for v in (0.0, 2.0, -1.0, 3.0)]
    exp_dice = 1 - (2 * (q[0] + q[3]) + 1) / (sum(q) + 2 + 1)

    assert out["bce"].item() == pytest.approx(exp_bce, rel=1e-6)
    assert out["focal"].item() == pytest.approx(exp_focal, rel=1e-6)
    assert out["dice"].item() == pytest.approx(exp_dice, rel=1e-6)
    assert out["loss"].item() == pytest.approx(exp_bce + exp_focal + exp_dice, rel=1e-6)
    # sanity of the hand arithmetic itself
    assert exp_bce == pytest.approx(sum(bce(x, y) for x, y in [(0, 1), (2, 0), (-1, 0), (3, 1)]) / 4)


def test_4x4_batch_of_two_with_empty_target_custom_params() -> None:
    cfg = dict(
        bce=0.5, focal=2.0, dice=1.5, focal_alpha=0.5, focal_gamma=1.5, dice_alpha=2.0, dice_smooth=0.5
    )
    logits = torch.full((2, 1, 4, 4), -2.0)
    logits[0, 0, 0:2, 0:2] = 2.0  # predicted block
    targets = torch.zeros(2, 1, 4, 4)
    targets[0, 0, 0:2, 1:3] = 1.0  # overlaps the block in (0,1), (1,1)
    logits[1] = -3.0
    logits[1, 0, 3, 3] = 1.0  # sample 2: empty target, one mild false positive
    out = RAFLoss(**cfg)(logits, targets)

    # sample 1 pixel classes (logit, target, count): (2,1)×2, (2,0)×2, (−2,1)×2, (−2,0)×10
    s1 = [(2.0, 1, 2), (2.0, 0, 2), (-2.0, 1, 2), (-2.0, 0, 10)]
    s2 = [(1.0, 0, 1), (-3.0, 0, 15)]
    exp_bce = sum(n * bce(x, y) for x, y, n in s1 + s2) / 32
    exp_focal = sum(n * focal(x, y, 0.5, 1.5) for x, y, n in s1 + s2) / 32

    def q(x: float) -> float:  # (1 − p)^a · p with a = 2
        return (1 - sig(x)) ** 2 * sig(x)

    dice1 = 1 - (2 * (2 * q(2.0) + 2 * q(-2.0)) + 0.5) / ((4 * q(2.0) + 12 * q(-2.0)) + 4 + 0.5)
    dice2 = 1 - 0.5 / ((q(1.0) + 15 * q(-3.0)) + 0 + 0.5)
    exp_dice = (dice1 + dice2) / 2

    assert out["bce"].item() == pytest.approx(exp_bce, rel=1e-6)
    assert out["focal"].item() == pytest.approx(exp_focal, rel=1e-6)
    assert out["dice"].item() == pytest.approx(exp_dice, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * exp_bce + 2.0 * exp_focal + 1.5 * exp_dice, rel=1e-6)
    # B×H×W input gives the same values as B×1×H×W
    out3 = RAFLoss(**cfg)(logits[:, 0], targets[:, 0].bool())
    for k in out:
        assert out3[k].item() == pytest.approx(out[k].item(), rel=1e-7)


def test_focal_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=g) * 3
    targets = (torch.rand(3, 1, 16, 16, generator=g) > 0.7).float()
    for alpha, gamma in [(0.25, 2.0), (0.6, 1.0), (-1.0, 2.0)]:
        if alpha < 0:
            # LossConfig keeps α in [0, 1]; compare the function directly for torchvision's "no α" branch
            from segvlm.losses import sigmoid_focal_loss

            ours = sigmoid_focal_loss(logits, targets, alpha, gamma)
        else:
            cfg = dict(focal_alpha=alpha, focal_gamma=gamma)
            ours = RAFLoss(**cfg)(logits, targets)["focal"]
        ref = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-8)


def test_empty_targets_finite_with_nonzero_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 1, 8, 8, generator=g) * 2).requires_grad_()
    targets = torch.zeros(2, 1, 8, 8)
    out = RAFLoss()(logits, targets)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # the Dice term alone also pushes an empty target's logits down
    x = logits.detach().clone().requires_grad_()
    adaptive_dice_loss(x.reshape(2, -1), targets.reshape(2, -1)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_empty_target_dice_behaviour() -> None:
    empty = torch.zeros(1, 64 * 64)
    # confident empty prediction on an empty target → Dice ≈ 0
    assert adaptive_dice_loss(torch.full((1, 64 * 64), -20.0), empty).item() < 1e-4
    # a moderately confident false-positive region (p = σ(1) over 4096 px) → Dice near 1
    q = (1 - sig(1.0)) * sig(1.0)
    value = adaptive_dice_loss(torch.full((1, 64 * 64), 1.0), empty).item()
    assert value == pytest.approx(1 - 1 / (4096 * q + 1), rel=1e-6)
    assert value > 0.99


def test_autocast_terms_are_float32_and_match() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    targets = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    loss = RAFLoss()
    ref = loss(logits, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # logits produced inside autocast are bf16 (matmul); the loss must still work in float32
        bf16_logits = (logits.reshape(2, -1) @ torch.eye(64)).reshape(2, 1, 8, 8)
        assert bf16_logits.dtype == torch.bfloat16
        out = loss(logits, targets)
        out_bf16 = loss(bf16_logits, targets)
    for k in ref:
        assert out[k].dtype == torch.float32 and out_bf16[k].dtype == torch.float32
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)
    ref_bf16 = loss(bf16_logits.float(), targets)
    for k in ref:
        torch.testing.assert_close(out_bf16[k], ref_bf16[k], rtol=0, atol=0)


def test_weights_and_disabled_terms() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    targets = (torch.rand(2, 1, 8, 8, generator=g) > 0.6).float()
    full = RAFLoss()(logits, targets)

    cfg = dict(bce=2.0, focal=0.5, dice=3.0)
    out = RAFLoss(**cfg)(logits, targets)
    expected = 2.0 * full["bce"] + 0.5 * full["focal"] + 3.0 * full["dice"]
    torch.testing.assert_close(out["loss"], expected)

    # CLIPSeg baseline: BCE only; focal/dice still reported (detached) but not in the total
    x = logits.clone().requires_grad_()
    bce_only = RAFLoss(bce=1.0, focal=0.0, dice=0.0)(x, targets)
    torch.testing.assert_close(bce_only["loss"], full["bce"])
    torch.testing.assert_close(bce_only["dice"], full["dice"])
    assert not bce_only["dice"].requires_grad and not bce_only["focal"].requires_grad
    bce_only["loss"].backward()
    x2 = logits.clone().requires_grad_()
    torch.nn.functional.binary_cross_entropy_with_logits(x2, targets).backward()
    torch.testing.assert_close(x.grad, x2.grad)

    silent = RAFLoss(dice=0.0, report_disabled=False)(logits, targets)
    assert silent["dice"].item() == 0.0
    torch.testing.assert_close(silent["loss"], full["bce"] + full["focal"])

    with pytest.raises(ValueError, match="not all zero"):
        RAFLoss(bce=0.0, focal=0.0, dice=0.0)


def test_weight_mask() -> None:
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])  # only the top row counts
    out = RAFLoss()(logits, targets, weight_mask=mask)
    assert out["bce"].item() == pytest.approx((math.log(2) + math.log(1 + math.exp(2))) / 2, rel=1e-6)
    q0, q1 = 0.25, (1 - sig(2)) * sig(2)
    assert out["dice"].item() == pytest.approx(1 - (2 * q0 + 1) / (q0 + q1 + 1 + 1), rel=1e-6)


def test_region_word_loss_hand_values() -> None:
    """Four tasks on a 1×2 grid with a 3-word vocabulary; the left cell embeds to (1, 0), the right to (0, 1)."""
    from segvlm.losses import region_word_loss

    emb = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]).expand(4, 2, 1, 2)
    vocabulary = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # V×C
    left, right, both = [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]
    targets = torch.tensor([left, both, right, [0.0, 0.0]]).view(4, 1, 1, 2)
    # task 0 names word 0; task 1 words 1 and 2 (word 1 twice: counted once); task 2 no word (masked);
    # task 3 has no target: neither counts
    word_ids = torch.tensor([[0, 0, 0], [1, 2, 1], [2, 0, 0], [1, 0, 0]])
    word_mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]]).bool()
    loss = region_word_loss(emb, vocabulary, targets, word_ids, word_mask)

    def log_softmax(logits: list[float], k: int) -> float:
        return logits[k] - math.log(sum(math.exp(v) for v in logits))

    task0 = [2.0, 0.0, 1.0]  # region (1, 0)
    task1 = [1.0, 0.5, 1.0]  # region (0.5, 0.5)
    expected = (-log_softmax(task0, 0) - (log_softmax(task1, 1) + log_softmax(task1, 2)) / 2) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)

    # nothing to name: zero, still differentiable
    grad_emb = emb.clone().requires_grad_()
    empty = region_word_loss(grad_emb, vocabulary, targets, word_ids, torch.zeros_like(word_mask))
    assert float(empty.detach()) == 0.0
    empty.backward()
    assert grad_emb.grad is not None and not grad_emb.grad.any()


def test_word_prediction_loss_hand_values() -> None:
    """Embeddings scored against a 2-word vocabulary; ``valid`` and word-less tasks are left out."""
    from segvlm.losses import word_prediction_loss

    embedding = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    vocabulary = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    word_ids = torch.tensor([[1, 0], [0, 1], [0, 0]])
    word_mask = torch.tensor([[1, 0], [1, 1], [0, 0]]).bool()
    ce0 = -(0.0 - math.log(math.exp(1.0) + 1.0))  # task 0: logits (1, 0), its word 1
    ce1 = -((0.0 + 2.0) / 2 - math.log(1.0 + math.exp(2.0)))  # task 1: logits (0, 2), words 0 and 1
    loss = word_prediction_loss(embedding, vocabulary, word_ids, word_mask)
    assert float(loss) == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    only_first = word_prediction_loss(
        embedding, vocabulary, word_ids, word_mask, valid=torch.tensor([True, False, True])
    )
    assert float(only_first) == pytest.approx(ce0, rel=1e-6)


def test_content_token_mask_drops_start_end_and_padding() -> None:
    from segvlm.losses import content_token_mask

    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    expected = [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0]]
    assert content_token_mask(attention).int().tolist() == expected
