"""vlm-recipes: fine-tuning vision-language models with TRL (see the README)."""

from .quiet import silence_known_noise

silence_known_noise()  # before TRL loads bitsandbytes and DeepSpeed, which log these at import
