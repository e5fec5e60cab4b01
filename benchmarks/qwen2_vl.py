"""Qwen2-VL-2B as the benchmark builds it without a download: its config (the real one when at hand, else a built-in
copy), its processor (real or the tiny model's) and the pixel budget of the Qwen2-VL recipe."""

from __future__ import annotations

from .settings import REAL_PROCESSORS, REPO_ROOT
from .workspace import Workspace

# The Qwen2-VL recipe whose pixel budget (`max_pixels`) parts 1 and 5-7 use.
QWEN_RECIPE = REPO_ROOT / "recipes" / "ui_actions_qwen2vl.yaml"
# Qwen2-VL-2B-Instruct's config.json, for when the real one is not at hand (`../shared/processors/qwen2-vl`).
QWEN2_VL_2B_CONFIG = {
    "model_type": "qwen2_vl",
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def qwen_pixel_budget() -> dict[str, int]:
    import yaml

    recipe = yaml.safe_load(QWEN_RECIPE.read_text(encoding="utf-8"))
    return {key: recipe[key] for key in ("min_pixels", "max_pixels") if recipe.get(key) is not None}


def qwen2_vl_processor(workspace: Workspace, **kwargs):
    """The real Qwen2-VL processor when `REAL_PROCESSORS` holds it, else the tiny Qwen2-VL's, loaded with `kwargs`
    (a pixel budget) and given a pad token; returns it with a description for the report."""
    real = REAL_PROCESSORS / "qwen2-vl"
    if (real / "tokenizer_config.json").is_file():
        path, name = real, f"real Qwen2-VL processor ({real})"
    else:
        path, name = (
            workspace.tiny_model("qwen2_vl"),
            f"tiny Qwen2-VL processor (no real processor under {REAL_PROCESSORS})",
        )
    return processor_with_pad_token(path, **kwargs), name


def processor_with_pad_token(path, **kwargs):
    """`AutoProcessor.from_pretrained(path, **kwargs)`, its tokenizer given a pad token (eos) if it has none."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, **kwargs)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def qwen2_vl_2b_config():
    """Qwen2-VL-2B's architecture: the real config.json when at hand, else the built-in copy of it."""
    from transformers import AutoConfig, Qwen2VLConfig

    real = REAL_PROCESSORS / "qwen2-vl" / "config.json"
    if real.is_file():
        return AutoConfig.from_pretrained(real.parent), f"{real}"
    return Qwen2VLConfig(**QWEN2_VL_2B_CONFIG), "built-in copy of Qwen2-VL-2B's config.json"


def qwen2_vl_2b_config_cut(language_layers: int, vision_blocks: int | None = None):
    """Qwen2-VL-2B's config with fewer language layers (and vision blocks): full width, for what scales per layer."""
    full, _ = qwen2_vl_2b_config()
    values = full.to_dict()
    for section in (values, values["text_config"]):
        if "num_hidden_layers" in section:
            section["num_hidden_layers"] = language_layers
        if section.get("layer_types"):
            section["layer_types"] = section["layer_types"][:language_layers]
    if vision_blocks is not None:
        values["vision_config"]["depth"] = vision_blocks
    return type(full)(**values)


def align_config_to_processor(config, processor) -> None:
    """Special-token ids and vocabulary of `config` made to fit `processor`'s tokenizer (a tiny one, if need be)."""
    tokenizer = processor.tokenizer
    for key, token in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ):
        setattr(config, key, tokenizer.convert_tokens_to_ids(token))
    text_config = config.get_text_config()
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    text_config.pad_token_id = tokenizer.pad_token_id
    text_config.eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
