"""The registered MLflow model serves: request rules, the logged model's contents, and a real HTTP server.

Fast tests check ``segvlm.serving`` (limits, path refusal) and a model logged to a local sqlite store. The slow
ones start real servers as subprocesses: an MLflow tracking server (artifacts proxied) that the model is
logged through, and ``mlflow models serve`` answering POST /invocations with the mask ``segvlm predict``
writes, pixel for pixel.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from jobs import predict as cli
from segvlm.checkpoint import save_checkpoint
from segvlm.inference import Predictor
from segvlm.registry import build_model, model_config
from segvlm.serving import RequestError, RequestLimits, decode_image_b64, parse_rows, serve_rows
from tests.servers import free_port

SIZE = 64
PHRASE = "the red circle"
REGISTERED = "segvlm-serve-test"


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random SegVLM checkpoint (backbone and tokenizer saved with it)."""
    cfg = model_config("segvlm_tiny", [f"backbone.image_size={SIZE}"])
    torch.manual_seed(0)
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt") / "best")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A PNG (97×61) and a JPEG (50×70, rotated by its EXIF orientation tag) with some structure."""
    folder = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
    pixels[10:40, 20:60] = (220, 30, 30)
    png = folder / "scene.png"
    Image.fromarray(pixels).save(png)
    jpeg = folder / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown rotated by 90°, so the mask is 50 wide and 70 high
    Image.fromarray(pixels[:50, :70]).save(jpeg, format="JPEG", quality=90, exif=exif)
    return png, jpeg


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def median_threshold(predictor, images):
    """A threshold that splits this model's output on the PNG, so its mask has both values."""
    from segvlm.inference import decode_image

    probs, _ = predictor.predict(decode_image(images[0].read_bytes()), PHRASE)
    return float(np.median(probs))


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "L"
        return np.asarray(img)


def cli_mask(ckpt: Path, image: Path, out: Path, *extra: str) -> np.ndarray:
    """``segvlm predict``'s mask PNG for ``image``, as an array (0/255)."""
    argv = ["--checkpoint", str(ckpt), "--image", str(image), "--phrase", PHRASE, "--out", str(out)]
    assert cli.main([*argv, *extra]) == 0
    return png_pixels(out.read_bytes())


# --------------------------------------------------------------------------------- request rules (pure)
@pytest.mark.parametrize(
    "value",
    [
        "/etc/passwd",
        "/etc/hosts",
        "/tmp/abcdefgh",  # 12 base64-alphabet characters: decodes, but to no image
        "file:///etc/passwd",
        "s3://bucket/images/cat.png",
        "http://127.0.0.1:1/cat.png",
        "~/cat.jpg",
        "../data/cat",
        "images/cat.jpg",
        "C:\\images\\cat.png",
        "\\\\server\\share\\cat",
    ],
)
def test_path_like_image_values_are_refused_as_paths(value):
    with pytest.raises(RequestError, match="looks like a file path or URL; the model never opens paths"):
        decode_image_b64(value, RequestLimits())


def test_a_real_file_path_is_refused_not_opened(images):
    png, _ = images
    rows = [{"image_b64": str(png), "phrase": PHRASE}]
    with pytest.raises(RequestError, match=r"row 0 image_b64: .* looks like a file path"):
        parse_rows(rows, RequestLimits())


def test_base64_images_decode_jpeg_and_data_urls_included(images):
    png, jpeg = images
    limits = RequestLimits()
    assert b64(jpeg).startswith("/9j/")  # a JPEG's base64 starts with a slash: not taken for a path
    assert decode_image_b64(b64(jpeg), limits) == jpeg.read_bytes()
    assert decode_image_b64("data:image/png;base64," + b64(png), limits) == png.read_bytes()
    with pytest.raises(RequestError, match="not valid base64"):
        decode_image_b64("@@@@", limits)
    with pytest.raises(RequestError, match="not an image or corrupt"):
        decode_image_b64(base64.b64encode(b"hello, not an image").decode(), limits)
    with pytest.raises(RequestError, match="expected a base64 string, got int"):
        decode_image_b64(12, limits)


def test_size_limits_refuse_before_decoding(images, tmp_path):
    png, _ = images
    limits = RequestLimits(max_rows=2, max_image_bytes=1000, max_pixels=5000, max_phrase_chars=20)
    assert png.stat().st_size > 1000
    with pytest.raises(RequestError, match=r"\d+ characters of base64, over the limit of 1400"):
        decode_image_b64(b64(png), limits)
    # within the base64 allowance (which leaves room for a data-URL prefix) but over in bytes
    with pytest.raises(RequestError, match=r"image file is 1040 bytes, over the limit of 1000"):
        decode_image_b64(base64.b64encode(bytes(1040)).decode(), limits)
    assert limits.max_b64_chars == 4 * 334 + 64

    # A 3000×3000 canvas in a 9 kB file: refused from its header, before 9 M pixels are decoded.
    bomb = io.BytesIO()
    Image.new("L", (3000, 3000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 100_000
    wide = RequestLimits(max_pixels=1_000_000)
    with pytest.raises(RequestError, match=r"3000×3000 = 9000000 pixels, over the limit of 1000000"):
        decode_image_b64(base64.b64encode(bomb.getvalue()).decode(), wide)

    small = io.BytesIO()
    Image.new("RGB", (10, 10)).save(small, format="PNG")
    row = {"image_b64": base64.b64encode(small.getvalue()).decode(), "phrase": "x"}
    with pytest.raises(RequestError, match="request has 3 rows, over the limit of 2"):
        parse_rows([row] * 3, limits)
    with pytest.raises(RequestError, match=r"row 1 phrase: 21 characters, over the limit of 20"):
        parse_rows([row, {**row, "phrase": "y" * 21}], limits)
    with pytest.raises(RequestError, match=r"row 0 phrase: phrase is empty"):
        parse_rows([{**row, "phrase": " \t "}], limits)
    with pytest.raises(RequestError, match=r"row 0 threshold: threshold must lie in \[0, 1\], got 1.5"):
        parse_rows([{**row, "threshold": 1.5}], limits)
    with pytest.raises(RequestError, match=r"row 0 threshold: expected a number, got str"):
        parse_rows([{**row, "threshold": "high"}], limits)
    with pytest.raises(RequestError, match=r"row 0: missing \['image_b64'\]"):
        parse_rows([{"image_path": str(png), "phrase": "x"}], limits)
    # a missing threshold in a DataFrame column is NaN: the model's own threshold
    parsed = parse_rows([{**row, "threshold": float("nan"), "phrase": "  the   cat "}], limits)
    assert parsed[0].threshold is None and parsed[0].phrase == "the cat"

    with pytest.raises(ValueError, match="unknown request limits"):
        RequestLimits.from_mapping({"max_rowz": 3})
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        RequestLimits(max_pixels=0)


def test_a_truncated_image_is_refused_at_decoding(predictor, images):
    data = images[0].read_bytes()
    row = {"image_b64": base64.b64encode(data[: len(data) // 2]).decode(), "phrase": PHRASE}
    parse_rows([row], RequestLimits())  # the header reads fine
    with pytest.raises(RequestError, match="row 0 image_b64: not an image or corrupt"):
        serve_rows(predictor, [row], RequestLimits())


def test_serve_rows_answers_with_the_mask_and_scores(predictor, images, median_threshold, ckpt, tmp_path):
    png, jpeg = images
    rows = [
        {"image_b64": b64(png), "phrase": PHRASE, "threshold": median_threshold},
        {"image_b64": b64(jpeg), "phrase": PHRASE},
    ]
    first, second = serve_rows(predictor, rows, RequestLimits())
    mask = png_pixels(base64.b64decode(first["mask_png_b64"]))
    assert mask.shape == (61, 97) and (first["width"], first["height"]) == (97, 61)
    np.testing.assert_array_equal(
        mask, cli_mask(ckpt, png, tmp_path / "m.png", "--threshold", str(median_threshold))
    )
    assert first["mask_pixels"] == int((mask > 0).sum()) > 0
    assert first["foreground"] == pytest.approx(first["mask_pixels"] / mask.size)
    probs, _ = predictor.predict(Image.open(png).convert("RGB"), PHRASE)
    assert first["score"] == pytest.approx(float(probs[mask > 0].mean()), rel=1e-6)
    assert first["max_probability"] == pytest.approx(float(probs.max()), rel=1e-6)
    assert first["threshold"] == median_threshold and second["threshold"] == predictor.threshold
    assert (second["width"], second["height"]) == (50, 70)  # EXIF rotation applied
    np.testing.assert_array_equal(
        png_pixels(base64.b64decode(second["mask_png_b64"])), cli_mask(ckpt, jpeg, tmp_path / "j.png")
    )


# ------------------------------------------------------------------------ the logged model (sqlite store)
@pytest.fixture(scope="module")
def logged(ckpt, tmp_path_factory):
    """The checkpoint logged and registered by ``RunLogger.log_checkpoint_model`` in a local sqlite store;
    returns (tracking URI, the model's local folder)."""
    import mlflow

    from jobs.tracking import RunLogger

    workdir = tmp_path_factory.mktemp("mlflow")
    path_before = list(sys.path)
    with RunLogger(enabled=True, workdir=workdir, experiment="serve-test") as logger:
        assert logger.log_checkpoint_model(ckpt, REGISTERED) == "1"
    assert sys.path == path_before  # the model's temporary code folder is not left on sys.path
    local = mlflow.artifacts.download_artifacts(
        f"models:/{REGISTERED}@best", dst_path=str(workdir / "dl"), tracking_uri=logger.tracking_uri
    )
    return logger.tracking_uri, Path(local)


def test_logged_model_has_signature_example_code_and_installable_requirements(logged, ckpt):
    _, model_dir = logged
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    signature = {k: json.loads(v) for k, v in mlmodel["signature"].items() if v}
    assert [(c["name"], c["type"], c["required"]) for c in signature["inputs"]] == [
        ("image_b64", "string", True),
        ("phrase", "string", True),
        ("threshold", "double", False),
    ]
    assert [c["name"] for c in signature["outputs"]] == [
        "mask_png_b64",
        "width",
        "height",
        "threshold",
        "mask_pixels",
        "foreground",
        "score",
        "max_probability",
    ]
    example = json.loads((model_dir / "input_example.json").read_text())
    assert example["columns"] == ["image_b64", "phrase"]
    Image.open(io.BytesIO(base64.b64decode(example["data"][0][0]))).verify()  # a real image

    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models-from-code
    assert flavor["config"]["limits"] == {
        "max_rows": 16,
        "max_image_bytes": 8 * 2**20,
        "max_pixels": 4096 * 4096,
        "max_phrase_chars": 512,
    }
    assert not list(model_dir.rglob("*.pkl")), "nothing is pickled"
    assert (model_dir / "serving_model.py").read_text() == Path("jobs/serving_model.py").read_text()
    import segvlm.serving

    code = model_dir / "code" / "segvlm"
    assert (code / "serving.py").read_bytes() == Path(segvlm.serving.__file__).read_bytes()
    assert not list(code.rglob("__pycache__"))
    weights = model_dir / flavor["artifacts"]["checkpoint"]["path"] / "model.safetensors"
    assert weights.read_bytes() == (ckpt / "model.safetensors").read_bytes()

    requirements = (model_dir / "requirements.txt").read_text().split()
    pins = dict(line.split("==") for line in requirements)  # every line pinned
    assert "segvlm" not in pins, "segvlm is not on PyPI: it travels as code"
    assert set(pins) == {
        "mlflow",
        "torch",
        "torchvision",
        "transformers",
        "safetensors",
        "numpy",
        "pillow",
        "pyyaml",
    }
    assert (pins["torch"], pins["torchvision"], pins["transformers"]) == ("2.14.1", "0.29.1", "5.24.0")
    assert pins["mlflow"] == "3.17.2"
    # every pin is a distribution at that version, satisfied by the environment the tests run in (no index)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "-r",
            str(model_dir / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Would install" not in done.stdout


def test_logged_pyfunc_predicts_like_segvlm_predict_and_refuses_bad_requests(
    logged, ckpt, images, median_threshold, tmp_path
):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    from jobs.tracking import use_tracking_uri

    uri, _ = logged
    use_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@best")
    png, _ = images
    out = model.predict(
        pd.DataFrame({"image_b64": [b64(png)], "phrase": [PHRASE], "threshold": [median_threshold]})
    )
    expected = cli_mask(ckpt, png, tmp_path / "m.png", "--threshold", str(median_threshold))
    np.testing.assert_array_equal(png_pixels(base64.b64decode(out["mask_png_b64"][0])), expected)

    def refused(frame: pd.DataFrame) -> str:
        with pytest.raises(MlflowException) as info:
            model.predict(frame)
        assert info.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
        return info.value.message

    assert "looks like a file path" in refused(pd.DataFrame({"image_b64": [str(png)], "phrase": [PHRASE]}))
    oversized = "A" * (RequestLimits().max_b64_chars + 4)
    assert "over the limit" in refused(pd.DataFrame({"image_b64": [oversized], "phrase": [PHRASE]}))
    many = pd.DataFrame({"image_b64": [b64(png)] * 17, "phrase": [PHRASE] * 17})
    assert "17 rows, over the limit of 16" in refused(many)


# ------------------------------------------------------------------------------------- real servers (slow)


def _start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    # its own session: stopping it by its PID's process group also stops the workers it forks
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _wait_ready(url: str, process: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            pytest.fail(f"{url} did not answer; server log:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_models_serve_answers_http_with_the_mask_of_segvlm_predict(
    ckpt, images, median_threshold, tmp_path
):
    """Logged through an MLflow HTTP tracking server (artifacts proxied to its own folder), served by
    ``mlflow models serve -m models:/...@best --env-manager local``, asked over HTTP."""
    from mlflow import MlflowClient

    from jobs.tracking import RunLogger

    # as from an activated environment: `mlflow models serve` starts `uvicorn` by name
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    mlflow_bin = str(Path(bin_dir) / "mlflow")
    tracking_port, serve_port = free_port(), free_port()
    tracking_uri = f"http://127.0.0.1:{tracking_port}"
    served = tmp_path / "server-artifacts"
    tracking = _start(
        [
            mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(tracking_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(served),
        ],
        tmp_path / "tracking.log",
        env,
        tmp_path,
    )  # fmt: skip
    server = None
    try:
        _wait_ready(f"{tracking_uri}/health", tracking, tmp_path / "tracking.log")
        with RunLogger(
            enabled=True, tracking_uri=tracking_uri, experiment="serve-http", workdir=tmp_path
        ) as logger:
            assert logger.log_checkpoint_model(ckpt, REGISTERED) == "1"
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
        # the weights went through the server's artifact proxy into its destination folder
        stored = list(served.rglob("model.safetensors"))
        assert len(stored) == 1 and stored[0].read_bytes() == (ckpt / "model.safetensors").read_bytes()
        version = MlflowClient(tracking_uri).get_model_version_by_alias(REGISTERED, "best")
        assert version.run_id == logger.run_id

        server = _start(
            [
                mlflow_bin, "models", "serve", "-m", f"models:/{REGISTERED}@best", "--env-manager", "local",
                "-h", "127.0.0.1", "-p", str(serve_port),
            ],
            tmp_path / "serve.log",
            env | {"MLFLOW_TRACKING_URI": tracking_uri},
            tmp_path,
        )  # fmt: skip
        base = f"http://127.0.0.1:{serve_port}"
        _wait_ready(f"{base}/ping", server, tmp_path / "serve.log")

        png, jpeg = images
        status, body = _post(
            f"{base}/invocations",
            {
                "dataframe_records": [
                    {"image_b64": b64(png), "phrase": PHRASE, "threshold": median_threshold},
                    {"image_b64": b64(jpeg), "phrase": PHRASE},
                ]
            },
        )
        assert status == 200, body
        first, second = body["predictions"]
        expected = cli_mask(ckpt, png, tmp_path / "png.png", "--threshold", str(median_threshold))
        assert set(np.unique(expected).tolist()) == {0, 255}
        np.testing.assert_array_equal(png_pixels(base64.b64decode(first["mask_png_b64"])), expected)
        np.testing.assert_array_equal(
            png_pixels(base64.b64decode(second["mask_png_b64"])), cli_mask(ckpt, jpeg, tmp_path / "jpg.png")
        )
        assert (first["width"], first["height"], second["width"], second["height"]) == (97, 61, 50, 70)
        assert first["mask_pixels"] == int((expected > 0).sum())
        # the row without a threshold got the checkpoint's (this one stores none: 0.5)
        assert first["threshold"] == median_threshold and second["threshold"] == 0.5

        # refusals: 400 with a message naming the row and the reason; nothing is opened
        status, body = _post(
            f"{base}/invocations", {"dataframe_records": [{"image_b64": str(png), "phrase": PHRASE}]}
        )
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "row 0 image_b64" in body["message"] and "looks like a file path" in body["message"]
        oversized = base64.b64encode(os.urandom(8 * 2**20 + 3)).decode()
        status, body = _post(
            f"{base}/invocations", {"dataframe_records": [{"image_b64": oversized, "phrase": PHRASE}]}
        )
        assert (
            status == 400
            and "row 0 image_b64: image file is 8388611 bytes, over the limit of 8388608" in body["message"]
        )
        status, body = _post(
            f"{base}/invocations", {"dataframe_records": [{"image_path": str(png), "phrase": PHRASE}]}
        )
        assert 400 <= status < 500 and "image_b64" in body["message"], body
    finally:
        if server is not None:
            _stop(server)
        _stop(tracking)
    assert server.poll() is not None and tracking.poll() is not None


@pytest.mark.slow
def test_the_served_model_imports_segvlm_from_its_own_code_folder(logged):
    """A fresh process loading the model imports the segvlm copy logged with it, not this checkout's."""
    uri, _ = logged
    script = (
        "import sys, mlflow.pyfunc\n"
        f"m = mlflow.pyfunc.load_model('models:/{REGISTERED}@best')\n"
        "import segvlm.serving\n"
        "print(segvlm.serving.__file__)\n"
    )
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = Path(done.stdout.strip().splitlines()[-1])
    assert loaded.parts[-3:] == ("code", "segvlm", "serving.py")
    assert not loaded.is_relative_to(Path.cwd())
