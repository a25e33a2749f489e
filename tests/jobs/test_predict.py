"""``segvlm predict`` and ``segvlm.inference``: original-size binary masks, consistent logits, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import predict as cli
from segvlm.checkpoint import save_checkpoint
from segvlm.inference import (
    DEFAULT_THRESHOLD,
    Predictor,
    checkpoint_threshold,
    overlay,
    probabilities_to_size,
)
from segvlm.registry import build_model, model_config

WIDTH, HEIGHT = 97, 61  # non-square, not a multiple of anything the model uses
SIZE = 64
PHRASE = "the red circle"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random SegVLM saved with ``save_checkpoint`` (backbone and tokenizer included)."""
    cfg = model_config("segvlm_tiny", [f"backbone.image_size={SIZE}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    return save_checkpoint(model, cfg, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[10:40, 20:60] = (220, 30, 30)  # some structure, so the mask is not just noise
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def median_threshold(predictor, image_file):
    """A threshold that splits this model's output, so the masks below have both values."""
    probs, _ = predictor.predict(Image.open(image_file).convert("RGB"), PHRASE)
    return float(np.median(probs))


def _run(ckpt, image, out_dir, *extra: str, phrase: str = PHRASE) -> int:
    return cli.main(
        [
            "--checkpoint",
            str(ckpt),
            "--image",
            str(image),
            "--phrase",
            phrase,
            "--out",
            str(out_dir / "mask.png"),
            *extra,
        ]
    )


def test_predictor_shapes(predictor, image_file):
    image = Image.open(image_file).convert("RGB")
    probs, logits = predictor.predict(image, PHRASE)
    assert probs.shape == (HEIGHT, WIDTH) and probs.dtype == np.float32
    assert logits.shape == (SIZE, SIZE) and logits.dtype == np.float32
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert probs.std() > 0  # varies over the image
    with pytest.raises(ValueError, match="empty"):
        predictor.predict(image, "  ")


def test_mask_logits_and_overlay(ckpt, image_file, median_threshold, tmp_path):
    t = median_threshold
    assert (
        _run(
            ckpt,
            image_file,
            tmp_path,
            "--threshold",
            str(t),
            "--save-logits",
            str(tmp_path / "l.npy"),
            "--overlay",
            str(tmp_path / "o.png"),
        )
        == 0
    )

    mask_img = Image.open(tmp_path / "mask.png")
    assert mask_img.mode == "L" and mask_img.size == (WIDTH, HEIGHT)
    mask = np.asarray(mask_img)
    assert set(np.unique(mask).tolist()) == {0, 255}  # binary, and both values occur at the median threshold

    # The saved logits reproduce the mask exactly: sigmoid, bilinear resize to H×W, > threshold.
    logits = np.load(tmp_path / "l.npy")
    assert logits.shape == (SIZE, SIZE) and logits.dtype == np.float32
    recomputed = probabilities_to_size(torch.from_numpy(logits), HEIGHT, WIDTH).numpy() > t
    np.testing.assert_array_equal(recomputed, mask > 0)

    # Overlay: the image on top (unchanged outside the mask, tinted inside), a caption bar below it.
    ov = Image.open(tmp_path / "o.png").convert("RGB")
    assert ov.width == WIDTH and ov.height > HEIGHT
    top = np.asarray(ov)[:HEIGHT].astype(int)
    original = np.asarray(Image.open(image_file).convert("RGB")).astype(int)
    np.testing.assert_array_equal(top[mask == 0], original[mask == 0])
    assert np.abs(top[mask > 0] - original[mask > 0]).sum() > 0
    caption = np.asarray(ov)[HEIGHT:]
    assert (caption > 200).any() and (caption < 50).any()  # white text on a dark bar
    assert not list(tmp_path.glob(".*tmp*"))  # temp files renamed away


def test_threshold_is_monotone(predictor, image_file, median_threshold):
    probs, _ = predictor.predict(Image.open(image_file).convert("RGB"), PHRASE)
    lo, mid, hi = (probs > t for t in (median_threshold - 0.05, median_threshold, median_threshold + 0.05))
    assert lo.sum() >= mid.sum() >= hi.sum() and lo.sum() > hi.sum()
    assert not (hi & ~mid).any() and not (mid & ~lo).any()  # nested: raising t only removes pixels


def test_the_checkpoint_threshold_is_the_default_and_flags_override_it(
    predictor, image_file, median_threshold, tmp_path
):
    """A checkpoint stores the threshold chosen on validation (meta.json extra.threshold); ``segvlm predict``
    and the served MLflow model predict with it unless given another."""
    assert predictor.threshold == DEFAULT_THRESHOLD  # the fixture's checkpoint stores none
    cfg = model_config("segvlm_tiny", [f"backbone.image_size={SIZE}"])
    torch.manual_seed(0)  # the fixture's weights
    calibrated = save_checkpoint(
        build_model(cfg), cfg, tmp_path / "calibrated", extra={"threshold": median_threshold}
    )
    assert Predictor.from_checkpoint(calibrated).threshold == median_threshold
    probs, _ = predictor.predict(Image.open(image_file).convert("RGB"), PHRASE)

    def written_mask() -> np.ndarray:
        return np.asarray(Image.open(tmp_path / "mask.png")) > 0

    assert _run(calibrated, image_file, tmp_path) == 0
    np.testing.assert_array_equal(written_mask(), probs > median_threshold)
    assert 0 < written_mask().sum() < written_mask().size  # a threshold other than 0.5 was applied
    assert _run(calibrated, image_file, tmp_path, "--threshold", "0.5") == 0
    np.testing.assert_array_equal(written_mask(), probs > 0.5)

    # the served model's answers: the same default, and a request's threshold column overrides it
    import base64

    from segvlm.serving import RequestLimits, serve_rows

    served = Predictor.from_checkpoint(calibrated)
    image_b64 = base64.b64encode(image_file.read_bytes()).decode()
    default, overridden = serve_rows(
        served,
        [
            {"image_b64": image_b64, "phrase": PHRASE},
            {"image_b64": image_b64, "phrase": PHRASE, "threshold": 0.5},
        ],
        RequestLimits(),
    )
    assert default["threshold"] == median_threshold and overridden["threshold"] == 0.5
    for answer, expected in ((default, probs > median_threshold), (overridden, probs > 0.5)):
        with Image.open(io.BytesIO(base64.b64decode(answer["mask_png_b64"]))) as mask:
            np.testing.assert_array_equal(np.asarray(mask) > 0, expected)

    with pytest.raises(ValueError, match=r"extra\.threshold"):
        checkpoint_threshold({"extra": {"threshold": 1.5}})


def test_overlay_function_draws_mask_and_caption():
    image = Image.new("RGB", (40, 30), (0, 0, 255))
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:30] = True
    out = np.asarray(overlay(image, mask, "a very long phrase that cannot possibly fit in forty pixels"))
    assert out.shape[1] == 40 and out.shape[0] > 30
    assert (out[0, 0] == (0, 0, 255)).all()  # outside the mask: untouched
    assert out[12, 20, 0] > 50  # inside: tinted towards red
    with pytest.raises(ValueError, match="mask"):
        overlay(image, mask.T, "x")


def test_bad_inputs_exit_2_with_a_clear_message(ckpt, image_file, tmp_path, capsys):
    missing = tmp_path / "missing.jpg"
    assert _run(ckpt, missing, tmp_path) == 2
    err = capsys.readouterr().err
    assert "image not found" in err and str(missing) in err and "Traceback" not in err

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a PNG")
    assert _run(ckpt, not_image, tmp_path) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and str(not_image) in err

    assert _run(ckpt, image_file, tmp_path, phrase="   ") == 2
    assert "phrase is empty" in capsys.readouterr().err

    assert _run(ckpt, image_file, tmp_path, "--threshold", "1.5") == 2
    assert "--threshold must lie in [0, 1], got 1.5" in capsys.readouterr().err

    assert _run(tmp_path / "no_ckpt", image_file, tmp_path) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "no_ckpt" in err

    # A checkpoint whose weights file is truncated.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpt.rglob("*"):
        if f.is_file():
            dest = broken / f.relative_to(ckpt)
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = f.read_bytes()
            dest.write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    assert _run(broken, image_file, tmp_path) == 2
    err = capsys.readouterr().err
    assert "cannot load checkpoint" in err and "model.safetensors" in err

    assert not (tmp_path / "mask.png").exists()  # nothing written on any error
