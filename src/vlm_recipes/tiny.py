"""Tiny random-weight vision-language models, built offline, for tests and CPU demos.

A tiny model keeps its family's real architecture class, image geometry and chat template, with every width and
depth shrunk so that it trains on a CPU in seconds. Two ways to get its processor:

- own processor (default): a small byte-level BPE tokenizer trained here with the `tokenizers` library on a small
  built-in corpus, holding the family's special tokens, plus the family's real chat template (TRL's copy,
  `trl/chat_templates/<name>.jinja`, where TRL ships one; otherwise ours in the model's own format, from
  `vlm_recipes.chat_templates`) and a small image processor. Each model is under one million parameters.
- a real processor directory (`processor_dir`, e.g. `../shared/processors/qwen2-vl`): its tokenizer, chat template
  and image processor are used unchanged, and the image geometry (patch size, merge size, image size) is read from
  the directory's `config.json` when present. The real vocabulary then dominates the parameter count (151k tokens
  for Qwen), so such a model is a few million parameters.

Families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM (Idefics3), Idefics2, LLaVA-1.5, PaliGemma, Florence-2: every
family of `vlm_recipes.families` that transformers ships (Phi-3-vision needs its remote code). A family is one
`TinyFamily` entry in `TINY_FAMILIES`; adding a family means adding one entry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .chat_templates import chat_template_text, trl_chat_template

logger = logging.getLogger(__name__)

__all__ = [
    "TINY_DEMO_VARIANTS",
    "TINY_FAMILIES",
    "TinyFamily",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "get_tiny_family",
    "trl_chat_template",
]

# Byte-level BPE vocabulary size of our own tokenizer (on top of the 256 byte symbols and the special tokens).
OWN_VOCAB_SIZE = 1024

# A small corpus: enough English, digits and JSON punctuation that common words and numbers become single tokens.
_CORPUS_LINES = [
    "What is shown in this image? Describe the picture in one short sentence.",
    "The image shows a red square on a white background. A blue circle sits next to a green triangle.",
    "Classify into: water, land, fire, wood, metal. Context: Element: water land fire wood metal",
    "Analyze this chess board image and describe the position in JSON format with pieces and metadata.",
    '{"pieces": [{"square": "e4", "color": "white", "type": "pawn"}], "metadata": {"side_to_move": "black"}}',
    "king queen rook bishop knight pawn white black castling en passant halfmove fullmove",
    'click(100, 200) type("hello") scroll(down, 100) wait(2) the login button the search field submit',
    '{"type": "click", "x": 100, "y": 200} {"type": "type", "text": "hello"} {"type": "scroll"}',
    "Open the viewer, select the patient, choose the series, load the MRI scan, confirm the study.",
    "You are a helpful assistant. User: Assistant: system user assistant",
    "red green blue yellow orange purple black white gray brown pink cyan colour color shape size",
    "square circle triangle star rectangle line dot small large left right top bottom center middle",
    "yes no true false none null one two three four five six seven eight nine ten zero",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 25 30 32 40 50 64 100 128 200 256 500 1000",
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.",
    "Answer the question about the image. Please answer with a single word. The answer is",
]


def _training_corpus() -> list[str]:
    numbers = [" ".join(str(n) for n in range(start, start + 50)) for start in range(0, 1000, 50)]
    # Compact JSON of the kinds the demo tasks answer with, so that their keys become few tokens.
    pieces = ("pawn", "knight", "bishop", "rook", "queen", "king")
    squares = [f"{file}{rank}" for rank in range(1, 9) for file in "abcdefgh"]
    chess_json = [
        ",".join(
            f'{{"square":"{square}","color":"{colour}","type":"{pieces[(i + j) % 6]}"}}'
            for j, square in enumerate(squares)
        )
        for i, colour in enumerate(("white", "black"))
    ]
    metadata = [
        (
            '"metadata":{"side_to_move":"white","castling":["white_kingside","black_queenside"],'
            '"en_passant":null,"halfmove_clock":0,"fullmove_number":1}'
        )
    ]
    return _CORPUS_LINES * 20 + numbers + chess_json * 10 + metadata * 10


@dataclass(frozen=True)
class TinyFamily:
    """How to build a tiny model of one model family.

    Args:
        name (`str`): registry key, e.g. `qwen2_vl`.
        model_type (`str`): the transformers `model_type` of the family's config.
        chat_template (`str`): name of the family's original chat template: one of TRL's `chat_templates`, or one of
            `vlm_recipes.chat_templates.OWN_TEMPLATES` where TRL has none.
        special_tokens (`list[str]`): tokens our own tokenizer must hold as single special tokens.
        eos_token (`str`): end-of-turn token; generation stops on it.
        pad_token (`str`): padding token.
        make_config (`Callable`): `(base_config_dict | None, tokenizer) -> PretrainedConfig` with tiny sizes.
        make_vision_processors (`Callable`): `() -> {"image_processor": ..., ...}` for our own small processor.
        processor_class (`str`): the family's processor class in `transformers`.
        bos_token (`str`, *optional*): beginning-of-sequence token; with `add_bos_token`, the tokenizer prepends it,
            as the family's real (Llama-style) tokenizer does.
        add_bos_token (`bool`, defaults to `False`): prepend `bos_token` when tokenizing with special tokens.
        unk_token (`str`, *optional*): unknown token, where the family's processor or model expects one.
        extra_tokenizer_attributes (`dict`): attributes the family's processor reads from its tokenizer.
        named_tokenizer_tokens (`dict`): model-specific named special tokens (e.g. `image_token`), saved with the
            tokenizer and readable as `tokenizer.image_token` / `tokenizer.image_token_id`.
        processor_kwargs (`dict`): extra keyword arguments of the family's processor class.
    """

    name: str
    model_type: str
    chat_template: str
    special_tokens: list[str]
    eos_token: str
    pad_token: str
    make_config: Callable[[dict[str, Any] | None, Any], Any]
    make_vision_processors: Callable[[], dict[str, Any]]
    processor_class: str
    bos_token: str | None = None
    add_bos_token: bool = False
    unk_token: str | None = None
    extra_tokenizer_attributes: dict[str, str] = field(default_factory=dict)
    named_tokenizer_tokens: dict[str, str] = field(default_factory=dict)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Qwen2-VL and Qwen2.5-VL
# --------------------------------------------------------------------------------------------------------------------
_QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Tiny text model: hidden 32, 2 heads of 16; M-RoPE splits the 8 rotary frequency pairs over (time, height, width).
_QWEN_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
}


def _qwen_token_ids(tokenizer) -> dict[str, int]:
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    return ids


def _vision_geometry(base: dict[str, Any] | None, keys: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Keep the image geometry of a real config (patch size, merge size...) so its image processor fits the model."""
    vision = (base or {}).get("vision_config", {})
    return {key: vision.get(key, defaults[key]) for key in keys}


def _text_token_ids(tokenizer) -> dict[str, int | None]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids(tokenizer.eos_token),
        "pad_token_id": tokenizer.pad_token_id,
    }


def _make_qwen2_vl_config(base: dict[str, Any] | None, tokenizer):
    from transformers import Qwen2VLConfig

    geometry = _vision_geometry(
        base,
        ("patch_size", "spatial_merge_size", "temporal_patch_size"),
        {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    )
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, **geometry}
    return Qwen2VLConfig(
        text_config={**_QWEN_TEXT, **_text_token_ids(tokenizer)},
        vision_config=vision,
        **_qwen_token_ids(tokenizer),
    )


def _make_qwen2_5_vl_config(base: dict[str, Any] | None, tokenizer):
    from transformers import Qwen2_5_VLConfig

    geometry = _vision_geometry(
        base,
        ("patch_size", "spatial_merge_size", "temporal_patch_size", "window_size"),
        {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112},
    )
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,
        "fullatt_block_indexes": [1],
        **geometry,
    }
    return Qwen2_5_VLConfig(
        text_config={**_QWEN_TEXT, **_text_token_ids(tokenizer)},
        vision_config=vision,
        **_qwen_token_ids(tokenizer),
    )


def _make_qwen_image_processor(patch_size: int = 14, video_processor_class=None):
    """Qwen-family image and video processors for images of 2x2 to 8x8 image tokens.

    One image token is (2 x patch_size) pixels square after the 2x2 merge: with Qwen2-VL's 14-pixel patches,
    56x56..224x224 pixels give 4 to 64 image tokens; with Qwen3-VL's 16-pixel patches, 64x64..256x256 do.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    video_processor_class = video_processor_class or Qwen2VLVideoProcessor
    geometry = {"patch_size": patch_size, "merge_size": 2, "temporal_patch_size": 2}
    pixels = {"min_pixels": (4 * patch_size) ** 2, "max_pixels": (16 * patch_size) ** 2}
    return {
        "image_processor": Qwen2VLImageProcessor(**pixels, **geometry),
        "video_processor": video_processor_class(**pixels, **geometry),
    }


# --------------------------------------------------------------------------------------------------------------------
# SmolVLM (Idefics3 architecture)
# --------------------------------------------------------------------------------------------------------------------
# Tiles of a split image are tagged <row_R_col_C>; 4x4 tiles are enough for the tiny image sizes.
_SMOLVLM_ROW_COL_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, 5) for col in range(1, 5)]
_SMOLVLM_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *_SMOLVLM_ROW_COL_TOKENS,
]
# Own processor: 32x32 tiles of 8x8 patches, pixel-shuffled by 2 -> (32/8)^2 / 2^2 = 4 image tokens per tile.
_SMOLVLM_TILE = 32
_SMOLVLM_PATCH = 8
_SMOLVLM_SCALE = 2


def _make_smolvlm_config(base: dict[str, Any] | None, tokenizer):
    from transformers import Idefics3Config

    geometry = _vision_geometry(
        base, ("image_size", "patch_size"), {"image_size": _SMOLVLM_TILE, "patch_size": _SMOLVLM_PATCH}
    )
    scale_factor = (base or {}).get("scale_factor", _SMOLVLM_SCALE)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, **geometry}
    text = {
        **_text_token_ids(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }
    return Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
    )


def _make_smolvlm_image_processor():
    from transformers import Idefics3ImageProcessor

    # No tiling by default: one 32x32 view per image keeps the tiny demo fast; the real SmolVLM splits into tiles.
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 2 * _SMOLVLM_TILE},
        max_image_size={"longest_edge": _SMOLVLM_TILE},
        do_image_splitting=False,
    )
    return {"image_processor": image_processor}


# --------------------------------------------------------------------------------------------------------------------
# Qwen3-VL
# --------------------------------------------------------------------------------------------------------------------
# Patches of 16 pixels (Qwen2-VL's are 14), merged 2x2: 32x32 pixels make one image token. Text head_dim 16 gives 8
# rotary frequency pairs, which Qwen3-VL's interleaved M-RoPE spreads over (time, height, width).
_QWEN3_TEXT = {
    **{key: value for key, value in _QWEN_TEXT.items() if key not in ("rope_parameters", "tie_word_embeddings")},
    "head_dim": 16,
    "rope_parameters": {
        "rope_type": "default",
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
        "rope_theta": 10000.0,
    },
}


def _make_qwen3_vl_config(base: dict[str, Any] | None, tokenizer):
    from transformers import Qwen3VLConfig

    geometry = _vision_geometry(
        base,
        ("patch_size", "spatial_merge_size", "temporal_patch_size"),
        {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    )
    # One deepstack merger (fed by vision block 0) where the real model has three; 8x8 learned position embeddings
    # are interpolated to each image's patch grid.
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
        **geometry,
    }
    return Qwen3VLConfig(
        text_config={**_QWEN3_TEXT, **_text_token_ids(tokenizer)},
        vision_config=vision,
        tie_word_embeddings=True,
        **_qwen_token_ids(tokenizer),
    )


def _make_qwen3_image_processor():
    from transformers.models.qwen3_vl import Qwen3VLVideoProcessor

    return _make_qwen_image_processor(patch_size=16, video_processor_class=Qwen3VLVideoProcessor)


# --------------------------------------------------------------------------------------------------------------------
# Small shared pieces of the Llama-style families (Idefics2, LLaVA-1.5, PaliGemma)
# --------------------------------------------------------------------------------------------------------------------
# 32x32-pixel images cut into 8x8 patches: a 4x4 grid, 16 patches per image.
_IMAGE_SIZE = 32
_PATCH_SIZE = 8
_NUM_PATCHES = (_IMAGE_SIZE // _PATCH_SIZE) ** 2

_TINY_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 4096,
}
_TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}


def _image_geometry(base: dict[str, Any] | None) -> dict[str, Any]:
    return _vision_geometry(base, ("image_size", "patch_size"), {"image_size": _IMAGE_SIZE, "patch_size": _PATCH_SIZE})


# --------------------------------------------------------------------------------------------------------------------
# Idefics2
# --------------------------------------------------------------------------------------------------------------------
# The perceiver resampler turns each image into a fixed number of latents: the processor's `image_seq_len`.
_IDEFICS2_LATENTS = 4


def _make_idefics2_config(base: dict[str, Any] | None, tokenizer):
    from transformers import Idefics2Config

    latents = (base or {}).get("perceiver_config", {}).get("resampler_n_latents", _IDEFICS2_LATENTS)
    perceiver = {
        "hidden_size": _TINY_DECODER["hidden_size"],
        "resampler_n_latents": latents,
        "resampler_depth": 1,
        "resampler_n_heads": 2,
        "resampler_head_dim": 16,
        "num_key_value_heads": 1,
    }
    return Idefics2Config(
        vision_config={**_TINY_VISION, "num_hidden_layers": 1, **_image_geometry(base)},
        perceiver_config=perceiver,
        text_config={"model_type": "mistral", **_TINY_DECODER, **_text_token_ids(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def _make_idefics2_image_processor():
    from transformers import Idefics2ImageProcessor

    # One 32-pixel view per image (the real one resizes to 378..980 pixels and may split into 4 crops + the whole).
    size = {"shortest_edge": _IMAGE_SIZE, "longest_edge": _IMAGE_SIZE}
    return {"image_processor": Idefics2ImageProcessor(size=size, do_image_splitting=False)}


# --------------------------------------------------------------------------------------------------------------------
# LLaVA-1.5
# --------------------------------------------------------------------------------------------------------------------
def _make_llava_config(base: dict[str, Any] | None, tokenizer):
    from transformers import LlavaConfig

    geometry = _image_geometry(base)
    # CLIP tower of two layers: LLaVA reads the second-to-last layer's features (`vision_feature_layer=-2`) and
    # drops the CLS token (`default` strategy), one image token per patch.
    vision = {"model_type": "clip_vision_model", **_TINY_VISION, "num_hidden_layers": 2, "projection_dim": 32}
    return LlavaConfig(
        vision_config={**vision, **geometry},
        text_config={"model_type": "llama", **_TINY_DECODER, **_text_token_ids(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(geometry["image_size"] // geometry["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _make_llava_image_processor():
    from transformers import CLIPImageProcessor

    size = {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    return {"image_processor": CLIPImageProcessor(size={"shortest_edge": _IMAGE_SIZE}, crop_size=size)}


# --------------------------------------------------------------------------------------------------------------------
# PaliGemma
# --------------------------------------------------------------------------------------------------------------------
def _make_paligemma_config(base: dict[str, Any] | None, tokenizer):
    from transformers import PaliGemmaConfig

    # SigLIP tower without its pooling head (PaliGemma uses every patch), Gemma decoder; the processor has added
    # PaliGemma's 1,024 location and 128 segmentation tokens to the vocabulary by now.
    vision = {"model_type": "siglip_vision_model", **_TINY_VISION, "num_hidden_layers": 1, "vision_use_head": False}
    text = {"model_type": "gemma", **_TINY_DECODER, **_text_token_ids(tokenizer)}
    return PaliGemmaConfig(
        vision_config={**vision, "projection_dim": 32, **_image_geometry(base)},
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tokenizer),
    )


def _make_paligemma_image_processor():
    from transformers import SiglipImageProcessor

    size = {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    return {"image_processor": SiglipImageProcessor(size=size, image_seq_length=_NUM_PATCHES)}


# --------------------------------------------------------------------------------------------------------------------
# Florence-2 (encoder-decoder)
# --------------------------------------------------------------------------------------------------------------------
# Two DaViT stages with strides 4 and 2 turn a 32x32 image into a 4x4 feature map; Florence-2 adds one pooled
# feature in front: 17 image tokens.
_FLORENCE2_IMAGE_TOKENS = (_IMAGE_SIZE // 8) ** 2 + 1


def _make_florence2_config(base: dict[str, Any] | None, tokenizer):
    from transformers import Florence2Config

    vision = {
        "depths": [1, 1],
        "patch_size": [7, 3],
        "patch_stride": [4, 2],
        "patch_padding": [3, 1],
        "patch_prenorm": [False, True],
        "embed_dim": [16, 32],
        "num_heads": [1, 2],
        "num_groups": [1, 2],
        "window_size": 2,
        "projection_dim": 32,
        "max_position_embeddings": 16,
    }
    ids = _text_token_ids(tokenizer)
    # BART conventions, as in every Florence-2 checkpoint: the decoder starts from </s>.
    text = {
        "model_type": "bart",
        **ids,
        "decoder_start_token_id": ids["eos_token_id"],
        "forced_eos_token_id": ids["eos_token_id"],
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 1024,
    }
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)


def _make_florence2_image_processor():
    from transformers import CLIPImageProcessor

    size = {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    return {
        "image_processor": CLIPImageProcessor(
            size=size, do_center_crop=False, image_seq_length=_FLORENCE2_IMAGE_TOKENS
        )
    }


def _qwen_family(name: str, make_config, processor_class: str) -> TinyFamily:
    return TinyFamily(
        name=name,
        model_type=name,
        chat_template="qwen2_5_vl",  # Qwen2-VL ships a byte-identical template
        special_tokens=_QWEN_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        make_config=make_config,
        make_vision_processors=_make_qwen_image_processor,
        processor_class=processor_class,
    )


_LLAMA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

TINY_FAMILIES: dict[str, TinyFamily] = {
    "qwen2_vl": _qwen_family("qwen2_vl", _make_qwen2_vl_config, "Qwen2VLProcessor"),
    "qwen2_5_vl": _qwen_family("qwen2_5_vl", _make_qwen2_5_vl_config, "Qwen2_5_VLProcessor"),
    "qwen3_vl": TinyFamily(
        name="qwen3_vl",
        model_type="qwen3_vl",
        chat_template="qwen3_vl",
        special_tokens=_QWEN_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        make_config=_make_qwen3_vl_config,
        make_vision_processors=_make_qwen3_image_processor,
        processor_class="Qwen3VLProcessor",
    ),
    "smolvlm": TinyFamily(
        name="smolvlm",
        model_type="idefics3",
        chat_template="smolvlm",
        special_tokens=_SMOLVLM_SPECIAL_TOKENS,
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        make_config=_make_smolvlm_config,
        make_vision_processors=_make_smolvlm_image_processor,
        processor_class="Idefics3Processor",
        extra_tokenizer_attributes={"image_token": "<image>", "end_of_utterance_token": "<end_of_utterance>"},
        processor_kwargs={"image_seq_len": (_SMOLVLM_TILE // _SMOLVLM_PATCH) ** 2 // _SMOLVLM_SCALE**2},
    ),
    # Idefics2-8b: Mistral tokenizer (<s> prepended, <unk> pads), turns end with <end_of_utterance>.
    "idefics2": TinyFamily(
        name="idefics2",
        model_type="idefics2",
        chat_template="idefics2",
        special_tokens=[*_LLAMA_SPECIAL_TOKENS, "<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        eos_token="<end_of_utterance>",
        pad_token="<unk>",
        bos_token="<s>",
        add_bos_token=True,
        make_config=_make_idefics2_config,
        make_vision_processors=_make_idefics2_image_processor,
        processor_class="Idefics2Processor",
        processor_kwargs={"image_seq_len": _IDEFICS2_LATENTS},
    ),
    # LLaVA-1.5: Llama tokenizer (<s> prepended, <pad> pads), answers end with </s> (appended by the collator).
    "llava": TinyFamily(
        name="llava",
        model_type="llava",
        chat_template="llava_1_5",
        special_tokens=[*_LLAMA_SPECIAL_TOKENS, "<image>", "<pad>"],
        eos_token="</s>",
        pad_token="<pad>",
        bos_token="<s>",
        unk_token="<unk>",
        add_bos_token=True,
        make_config=_make_llava_config,
        make_vision_processors=_make_llava_image_processor,
        processor_class="LlavaProcessor",
        processor_kwargs={
            "patch_size": _PATCH_SIZE,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,  # CLIP's CLS token, dropped by the `default` strategy
        },
    ),
    # PaliGemma: Gemma tokenizer; the processor writes <bos> itself (after the image tokens) and ends the answer
    # with <eos>.
    "paligemma": TinyFamily(
        name="paligemma",
        model_type="paligemma",
        chat_template="paligemma",
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        eos_token="<eos>",
        pad_token="<pad>",
        bos_token="<bos>",
        unk_token="<unk>",
        make_config=_make_paligemma_config,
        make_vision_processors=_make_paligemma_image_processor,
        processor_class="PaliGemmaProcessor",
    ),
    # Florence-2: BART tokenizer (<s>=0, <pad>=1, </s>=2, <unk>=3) with a named image token, as the
    # florence-community checkpoints have.
    "florence2": TinyFamily(
        name="florence2",
        model_type="florence2",
        chat_template="florence2",
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<image>"],
        eos_token="</s>",
        pad_token="<pad>",
        bos_token="<s>",
        unk_token="<unk>",
        named_tokenizer_tokens={"image_token": "<image>"},
        make_config=_make_florence2_config,
        make_vision_processors=_make_florence2_image_processor,
        processor_class="Florence2Processor",
    ),
}


# Wider variants for the task demos (`tiny_model_family: qwen2_vl_wide`): the same architecture and processor as their
# family with a text model of hidden size 128 and a vision tower of width 64, about 0.5M parameters. At hidden size 32
# a model does not learn within a demo's few hundred steps to read the task's words behind a 300-token system prompt,
# nor where in the screenshot to click. Kept out of `TINY_FAMILIES`, so that tests over every family do not run twice.
_QWEN_WIDE_TEXT = {
    **_QWEN_TEXT,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
}


def _make_qwen2_vl_wide_config(base: dict[str, Any] | None, tokenizer):
    config = _make_qwen2_vl_config(base, tokenizer).to_dict()
    vision = {**config["vision_config"], "embed_dim": 64, "hidden_size": 128, "num_heads": 4, "depth": 2}
    text = {**config["text_config"], **_QWEN_WIDE_TEXT}
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tokenizer))


# SmolVLM for screenshots (`tiny_model_family: smolvlm_wide`): one 128-pixel view cut into 16-pixel patches, not
# pixel-shuffled (64 image tokens), a vision tower of width 64 and a text model of hidden size 128 and 4 layers,
# about 0.75M parameters. On the ui_actions demo it learns where to click from the screen's colours (click accuracy
# 0.89-1.0), where `qwen2_vl_wide` stayed at 0.17-0.47.
_SMOLVLM_WIDE_VIEW = 128
_SMOLVLM_WIDE_PATCH = 16


def _make_smolvlm_wide_config(base: dict[str, Any] | None, tokenizer):
    config = _make_smolvlm_config(base, tokenizer).to_dict()
    vision = {
        **config["vision_config"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": _SMOLVLM_WIDE_VIEW,
        "patch_size": _SMOLVLM_WIDE_PATCH,
    }
    text = {
        **config["text_config"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=1,
        image_token_id=config["image_token_id"],
        tie_word_embeddings=True,
    )


def _make_smolvlm_wide_image_processor():
    from transformers import Idefics3ImageProcessor

    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": _SMOLVLM_WIDE_VIEW},
        max_image_size={"longest_edge": _SMOLVLM_WIDE_VIEW},
        do_image_splitting=False,
    )
    return {"image_processor": image_processor}


TINY_DEMO_VARIANTS: dict[str, TinyFamily] = {
    "smolvlm_wide": replace(
        TINY_FAMILIES["smolvlm"],
        name="smolvlm_wide",
        make_config=_make_smolvlm_wide_config,
        make_vision_processors=_make_smolvlm_wide_image_processor,
        processor_kwargs={"image_seq_len": (_SMOLVLM_WIDE_VIEW // _SMOLVLM_WIDE_PATCH) ** 2},
    ),
    "qwen2_vl_wide": replace(
        _qwen_family("qwen2_vl", _make_qwen2_vl_wide_config, "Qwen2VLProcessor"), name="qwen2_vl_wide"
    ),
}


def get_tiny_family(name: str) -> TinyFamily:
    known = {**TINY_FAMILIES, **TINY_DEMO_VARIANTS}
    if name not in known:
        raise ValueError(f"Unknown tiny-model family {name!r}; choose one of {sorted(known)}.")
    return known[name]


def build_tiny_tokenizer(family: TinyFamily):
    """Train a small byte-level BPE tokenizer holding the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=OWN_VOCAB_SIZE + len(family.special_tokens),
        special_tokens=family.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(), trainer=trainer)
    if family.add_bos_token:
        # Llama-style tokenizers (LLaVA-1.5's, Idefics2's) prepend <s> to every text they encode.
        bos = family.bos_token
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    named = {"eos_token": family.eos_token, "pad_token": family.pad_token}
    named.update({"bos_token": family.bos_token, "unk_token": family.unk_token})
    named = {key: token for key, token in named.items() if token is not None}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[t for t in family.special_tokens if t not in named.values()],
        padding_side="right",
        model_max_length=4096,
        **named,
        **family.named_tokenizer_tokens,
    )
    for attribute, token in family.extra_tokenizer_attributes.items():
        setattr(tokenizer, attribute, token)
    return tokenizer


def _own_processor(family: TinyFamily, training_template: bool):
    import transformers

    tokenizer = build_tiny_tokenizer(family)
    chat_template = chat_template_text(family.chat_template, training=training_template)
    processor_class = getattr(transformers, family.processor_class)
    return processor_class(
        **family.make_vision_processors(),
        tokenizer=tokenizer,
        chat_template=chat_template,
        **family.processor_kwargs,
    )


def build_tiny_model(
    family_name: str,
    output_dir: str | Path,
    processor_dir: str | Path | None = None,
    training_template: bool = False,
    seed: int = 0,
) -> Path:
    """Build a tiny random-weight model of a family and save it with its processor to `output_dir`.

    Args:
        family_name (`str`): a key of `TINY_FAMILIES`.
        output_dir (`str` or `Path`): where `save_pretrained` writes model, processor and generation config.
        processor_dir (`str` or `Path`, *optional*): a real processor directory to wrap instead of our own.
        training_template (`bool`, defaults to `False`): with our own processor, wear the `_training` variant of
            the family's template (with `{% generation %}` markers) instead of the original; templates of ours
            without such a variant are used as they are (see `vlm_recipes.chat_templates.chat_template_text`).
        seed (`int`, defaults to `0`): seed of the random weights.

    Returns:
        The output directory. It loads with `AutoModelForImageTextToText.from_pretrained` and
        `AutoProcessor.from_pretrained`, offline.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    family = get_tiny_family(family_name)
    output_dir = Path(output_dir)

    if processor_dir is not None:
        processor_dir = Path(processor_dir)
        if not processor_dir.is_dir():
            raise FileNotFoundError(f"Processor directory {processor_dir} does not exist.")
        processor = AutoProcessor.from_pretrained(processor_dir)
        config_path = processor_dir / "config.json"
        base_config = json.loads(config_path.read_text()) if config_path.is_file() else None
        if base_config is not None and base_config.get("model_type") != family.model_type:
            raise ValueError(
                f"{config_path} is a {base_config.get('model_type')!r} model, not {family.model_type!r} "
                f"(family {family.name!r}); pick the matching --family."
            )
    else:
        processor = _own_processor(family, training_template)
        base_config = None
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        raise ValueError(f"The tokenizer in {processor_dir} has no pad token; set one in its tokenizer_config.json.")

    config = family.make_config(base_config, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    generation = {"eos_token_id": eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if config.is_encoder_decoder:  # Florence-2: generation starts the decoder from the config's start token
        generation["decoder_start_token_id"] = config.get_text_config().decoder_start_token_id
    model.generation_config = GenerationConfig(**generation, do_sample=False, max_new_tokens=64)
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("Built tiny %s model (%d parameters) in %s", family.name, num_parameters, output_dir)
    return output_dir
