"""The CLIP backbone: a transformers ``CLIPModel`` plus its tokenizer, exposing what the decoder needs.

``CLIPBackbone`` runs the vision tower only up to the deepest block the decoder reads (CLIPSeg reads blocks
3, 7, 9 of 12, so blocks 10-11 are never computed), interpolates position embeddings for any image size that
is a multiple of the patch size, and returns the text tower's token states, mask and projected pooled
embedding. The ``CLIPModel`` is kept whole (``self.clip``) so weights load from and save to the transformers
layout unchanged; parameters that no forward pass can reach (later vision blocks, the vision head,
``logit_scale``) are marked ``requires_grad=False`` so optimisers and DDP never see them.

Weights come from ``from_pretrained`` (a hub id or a local folder with a ``CLIPModel`` and ``CLIPTokenizer``)
or from a random init of a named architecture (``clip_config_for``). ``make_tiny_clip`` saves a random tiny
CLIP with a word tokenizer, so tests and demos exercise the same ``from_pretrained`` path as real runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from segvlm.config import BackboneConfig
from segvlm.tokenizer import DEFAULT_TINY_WORDS, build_word_tokenizer, check_tokenizer

__all__ = [
    "BackboneLoadError",
    "BackboneOutput",
    "CLIPBackbone",
    "ConvStem",
    "clip_config_for",
    "load_clip",
    "make_tiny_clip",
]

TINY_MAX_TEXT_LENGTH = 32


class BackboneLoadError(OSError):
    """A pretrained CLIP reference that cannot be loaded (missing folder, no network, broken tokenizer)."""


@functools.cache
def _default_tiny_vocab_size() -> int:
    return len(build_word_tokenizer(DEFAULT_TINY_WORDS, model_max_length=TINY_MAX_TEXT_LENGTH))


def clip_config_for(arch: str, vocab_size: int | None = None) -> CLIPConfig:
    """The ``CLIPConfig`` of a named architecture.

    ``"vit_b16"`` is OpenAI's ViT-B/16 (``openai/clip-vit-base-patch16``). ``"tiny"`` is a 128-wide CLIP for
    from-scratch CPU runs; its vocabulary is a word tokenizer's (``vocab_size`` defaults to that of
    ``DEFAULT_TINY_WORDS``) with the specials last, as ``build_word_tokenizer`` lays them out.
    """
    if arch == "vit_b16":
        text = dict(vocab_size=vocab_size or 49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                    pad_token_id=1)  # fmt: skip
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      patch_size=16, image_size=224)  # fmt: skip
        projection_dim = 512
    elif arch == "tiny":
        vocab = vocab_size or _default_tiny_vocab_size()
        text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                    num_attention_heads=4, max_position_embeddings=TINY_MAX_TEXT_LENGTH, bos_token_id=vocab - 2,
                    eos_token_id=vocab - 1, pad_token_id=vocab - 1)  # fmt: skip
        vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      patch_size=16, image_size=128)  # fmt: skip
        projection_dim = 128
    else:
        raise ValueError(f"unknown CLIP arch {arch!r}; known: 'vit_b16', 'tiny'")
    for sub in (text, vision):
        sub.update(hidden_act="quick_gelu", projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def make_tiny_clip(out_dir: str | Path, words: Iterable[str] = DEFAULT_TINY_WORDS, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``CLIPModel`` and its word tokenizer to ``out_dir``.

    The folder loads with ``CLIPModel.from_pretrained`` / ``CLIPTokenizer.from_pretrained`` and is a valid
    ``backbone.pretrained`` reference. Returns the folder.
    """
    out = Path(out_dir)
    tokenizer = build_word_tokenizer(words, model_max_length=TINY_MAX_TEXT_LENGTH)
    config = clip_config_for("tiny", vocab_size=len(tokenizer))
    assert config.text_config.eos_token_id == tokenizer.eos_token_id  # pooling reads the first EOS
    assert config.text_config.bos_token_id == tokenizer.bos_token_id
    with _fork_rng(seed):
        model = CLIPModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def _fork_rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_clip(ref: str) -> tuple[CLIPModel, CLIPTokenizer]:
    """Load a ``CLIPModel`` and its tokenizer from a hub id or local folder, checking the tokenizer.

    Raises:
        BackboneLoadError: the reference is neither a loadable local folder nor reachable on the hub,
            or its tokenizer is empty/broken.
    """
    local = Path(ref).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "0")
    how = (
        "Pass a local folder holding a transformers CLIPModel and CLIPTokenizer saved with save_pretrained "
        "(backbone.pretrained=/path/to/folder), e.g. one fetched on a machine with network access by "
        "`hf download openai/clip-vit-base-patch16 --local-dir DIR`, or segvlm.backbone.make_tiny_clip(DIR) "
        "for a random tiny model."
    )
    if local.exists() and not (local / "config.json").is_file():
        raise BackboneLoadError(f"backbone {ref!r}: folder {local} has no config.json of a CLIPModel. {how}")
    source = str(local) if local.exists() else ref
    try:
        clip = CLIPModel.from_pretrained(source)
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        where = "local folder" if local.exists() else "hub id (no such local folder)"
        raise BackboneLoadError(
            f"cannot load CLIP backbone {ref!r} as a {where}: {err}. Machines here have no network and "
            f"downloads are disabled (HF_HUB_OFFLINE={offline}). {how}"
        ) from err
    try:
        check_tokenizer(tokenizer, source)
    except ValueError as err:
        raise BackboneLoadError(f"{err}. {how}") from err
    return clip, tokenizer


class ConvStem(nn.Module):
    """A small conv stem replacing ViT's patch embedding: B×3×H×W → B×width×H/p×W/p, same as the patch conv.

    ``log2(p)`` stride-2 3×3 convs (32, 64, 128, ... channels, GroupNorm, GELU), the last projecting to the
    ViT width without norm. Overlapping small kernels give the tokens local shape cues that a single
    16×16 linear patch projection learns slowly from scratch. The second stage's output (1/4 resolution,
    ``stem_channels`` wide) is the skip feature for the decoder's upsampler.
    """

    def __init__(self, width: int, patch_size: int, in_channels: int = 3, base_channels: int = 32) -> None:
        super().__init__()
        num_stages = round(math.log2(patch_size))
        if 2**num_stages != patch_size or num_stages < 3:
            raise ValueError(f"conv stem needs a power-of-two patch size >= 8, got {patch_size}")
        stages, channels = [], in_channels
        for i in range(num_stages - 1):
            out = base_channels * 2**i
            stages.append(
                nn.Sequential(
                    nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                    nn.GroupNorm(min(8, out), out),
                    nn.GELU(),
                )
            )
            channels = out
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Conv2d(channels, width, 3, stride=2, padding=1)
        self.stem_channels = base_channels * 2  # output of stages[1], at 1/4 resolution

    @property
    def weight(self) -> Tensor:
        # transformers' CLIPVisionEmbeddings reads patch_embedding.weight.dtype to cast its input
        return self.proj.weight

    def forward_features(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Return (B×width×H/p×W/p tokens map, B×stem_channels×H/4×W/4 skip features)."""
        x, skip = pixel_values, pixel_values
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == 1:
                skip = x
        return self.proj(x), skip

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.forward_features(pixel_values)[0]


@dataclasses.dataclass
class BackboneOutput:
    """What ``CLIPBackbone.forward`` returns.

    Image features have one row per *image* (N), text features one per *phrase* (B); ``image_index`` pairs
    them (phrase b shows image ``image_index[b]``), or is None when N = B and phrase b shows image b. The
    decoder gathers image rows per phrase itself, after the work that does not depend on the phrase.

    Attributes:
        activations: one N×(1+T)×Cv tensor per extracted block (T tokens), shallow → deep, CLS token first.
        text_tokens: B×L×Ct last hidden states of the text tower (after its final LayerNorm).
        text_mask: B×L bool, True for real tokens.
        text_embedding: B×P projected pooled phrase embedding (``CLIPModel.get_text_features``).
        stem_features: N×stem_channels×H/4×W/4 from the conv stem, or None with CLIP's patch embedding.
        image_index: B int64 into the N images, or None.
    """

    activations: list[Tensor]
    text_tokens: Tensor
    text_mask: Tensor
    text_embedding: Tensor
    stem_features: Tensor | None = None
    image_index: Tensor | None = None


class CLIPBackbone(nn.Module):
    """CLIP image and text towers feeding the segmentation decoder.

    Build with ``CLIPBackbone.from_config(cfg)`` or from parts: ``CLIPBackbone(clip, tokenizer, cfg)``.
    With ``cfg.freeze`` all parameters are frozen, the forward runs under ``torch.no_grad()`` and the
    ``CLIPModel`` stays in eval mode whatever ``train()`` is called with.
    """

    def __init__(self, clip: CLIPModel, tokenizer: CLIPTokenizer | None, cfg: BackboneConfig) -> None:
        super().__init__()
        vision = clip.config.vision_config
        if max(cfg.extract_layers) >= vision.num_hidden_layers or min(cfg.extract_layers) < 0:
            raise ValueError(
                f"backbone.extract_layers {cfg.extract_layers} out of range for a "
                f"{vision.num_hidden_layers}-block vision tower"
            )
        if cfg.image_size % vision.patch_size:
            raise ValueError(
                f"backbone.image_size {cfg.image_size} is not a multiple of patch {vision.patch_size}"
            )
        self.cfg = cfg
        self.clip = clip
        self.tokenizer = tokenizer
        self.extract_layers = tuple(cfg.extract_layers)
        self.frozen = cfg.freeze
        if cfg.image_stem == "conv":
            clip.vision_model.embeddings.patch_embedding = ConvStem(vision.hidden_size, vision.patch_size)

        # Nothing after the deepest extracted block runs, so those parameters can never get a gradient.
        depth = max(self.extract_layers) + 1
        unused: list[nn.Module | nn.Parameter] = [
            *clip.vision_model.encoder.layers[depth:],
            clip.vision_model.post_layernorm,
            clip.visual_projection,
            clip.logit_scale,
        ]
        for item in unused:
            for p in item.parameters() if isinstance(item, nn.Module) else [item]:
                p.requires_grad_(False)
        if self.frozen:
            self.clip.requires_grad_(False)
            self.clip.eval()

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> CLIPBackbone:
        """Load ``cfg.pretrained`` (hub id or local folder) or build ``cfg.arch`` with random weights."""
        if cfg.pretrained:
            clip, tokenizer = load_clip(cfg.pretrained)
        else:
            tokenizer = None
            if cfg.arch == "tiny":
                tokenizer = build_word_tokenizer(DEFAULT_TINY_WORDS, model_max_length=TINY_MAX_TEXT_LENGTH)
            clip = CLIPModel(clip_config_for(cfg.arch, len(tokenizer) if tokenizer is not None else None))
        return cls(clip, tokenizer, cfg)

    # ------------------------------------------------------------------------------------ properties
    @property
    def vision_width(self) -> int:
        return self.clip.config.vision_config.hidden_size

    @property
    def text_width(self) -> int:
        return self.clip.config.text_config.hidden_size

    @property
    def projection_dim(self) -> int:
        return self.clip.config.projection_dim

    @property
    def patch_size(self) -> int:
        return self.clip.config.vision_config.patch_size

    @property
    def num_layers(self) -> int:
        """Number of extracted blocks (= activations per forward)."""
        return len(self.extract_layers)

    @property
    def token_embedding(self) -> Tensor:
        """V×text_width: the text tower's input embedding of every token of the vocabulary."""
        return self.clip.text_model.embeddings.token_embedding.weight

    @property
    def stem_channels(self) -> int | None:
        stem = self.clip.vision_model.embeddings.patch_embedding
        return stem.stem_channels if isinstance(stem, ConvStem) else None

    @property
    def max_text_length(self) -> int:
        limits = [self.cfg.max_text_length, self.clip.config.text_config.max_position_embeddings]
        if self.tokenizer is not None:
            limits.append(self.tokenizer.model_max_length)
        return int(min(limits))

    def train(self, mode: bool = True) -> CLIPBackbone:
        super().train(mode)
        if self.frozen:
            self.clip.eval()  # no dropout / norm-statistics drift in a frozen backbone
        return self

    # -------------------------------------------------------------------------------------- forward
    def tokenize(self, phrases: list[str]) -> dict[str, Tensor]:
        """Tokenize phrases to ``input_ids`` / ``attention_mask`` (B×L), padded and truncated to
        ``max_text_length`` (the smallest of the config's, the text tower's and the tokenizer's limit)."""
        if self.tokenizer is None:
            raise RuntimeError(
                "this backbone has no tokenizer (random vit_b16 built from config); set backbone.pretrained "
                "to a CLIP hub id or local folder"
            )
        enc = self.tokenizer(
            list(phrases),
            padding="max_length",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _vision(self, pixel_values: Tensor) -> tuple[list[Tensor], Tensor | None]:
        vm = self.clip.vision_model
        emb = vm.embeddings
        b, _, h, w = pixel_values.shape
        x = pixel_values.to(dtype=emb.patch_embedding.weight.dtype)
        stem_features = None
        if isinstance(emb.patch_embedding, ConvStem):
            patches, stem_features = emb.patch_embedding.forward_features(x)
        else:
            patches = emb.patch_embedding(x)
        tokens = patches.flatten(2).transpose(1, 2)  # B×N×Cv
        hidden = torch.cat([emb.class_embedding.expand(b, 1, -1), tokens], dim=1)  # B×(1+N)×Cv
        # returns the stored table unchanged at the native square size, bicubic-resized otherwise
        hidden = hidden + emb.interpolate_pos_encoding(hidden, h, w)
        hidden = vm.pre_layrnorm(hidden)

        wanted = set(self.extract_layers)
        activations = []
        for i, layer in enumerate(vm.encoder.layers[: max(self.extract_layers) + 1]):
            hidden = layer(hidden, None)
            if i in wanted:
                activations.append(hidden)
        return activations, stem_features

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_index: Tensor | None = None,
    ) -> BackboneOutput:
        """Encode images (N×3×H×W, CLIP-normalised, H and W multiples of the patch size) and phrases
        (B×L token ids and 0/1 mask). With ``image_index`` (B int64 into the N images) each image is encoded
        once for all its phrases and the output carries the index (see ``BackboneOutput``); without it N
        must equal B."""
        n, b = pixel_values.shape[0], input_ids.shape[0]
        if image_index is None and n != b:
            raise ValueError(f"{n} images for {b} phrases: pass image_index to pair them")
        # the range check reads the indices, which would stall a GPU every step: there index_select asserts
        on_cpu = image_index is not None and image_index.device.type == "cpu"
        if image_index is not None and (
            image_index.shape != (b,)
            or (on_cpu and b and not 0 <= int(image_index.min()) <= int(image_index.max()) < n)
        ):
            raise ValueError(
                f"image_index must be {b} indices into {n} images, got {tuple(image_index.shape)}"
            )
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            activations, stem_features = self._vision(pixel_values)
            text = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
            text_embedding = self.clip.text_projection(text.pooler_output)  # B×P
        return BackboneOutput(
            activations=activations,
            text_tokens=text.last_hidden_state,
            text_mask=attention_mask.bool(),
            text_embedding=text_embedding,
            stem_features=stem_features,
            image_index=image_index,
        )
