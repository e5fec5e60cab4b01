"""Known messages of the libraries we use that a user can do nothing about, silenced by their exact text.

Each filter names the library version it was seen with and why the message does not apply to our runs; any other
warning of the same library still shows. `silence_known_noise` runs when `vlm_recipes` is imported, before the
libraries that print these at import time are loaded (`scripts/sft.py` imports TRL through our modules).
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["KNOWN_NOISE", "configure_logging", "silence_known_noise"]

# Libraries that give their logger a handler of their own and still pass records up to the root logger: with a root
# handler (ours) each of their lines would print twice (huggingface_hub 2.4, datasets 5.2).
LOGGERS_WITH_OWN_HANDLER = ("huggingface_hub", "datasets")

# (logger name, message start, why it is noise here)
KNOWN_NOISE: tuple[tuple[str, str, str], ...] = (
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        # bitsandbytes 0.50.2 logs this at import on AVX512-BF16 CPUs without the optional `kernels` package; the
        # kernel serves only the CPU repack path, which `keep_4bit_weights_unpacked_on_cpu` (models.quantization)
        # turns off.
        "kernel of a code path our 4-bit models never take",
    ),
    (
        "DeepSpeed",
        "Setting accelerator to CPU. If you have GPU",
        # DeepSpeed 0.18 logs this at import on any machine without CUDA; a GPU recipe on such a machine stops
        # earlier with its own message (`configs.check_precision_hardware`).
        "printed on every CPU run",
    ),
)
# (FutureWarning message pattern, why it is noise here)
KNOWN_FUTURE_WARNINGS: tuple[tuple[str, str], ...] = (
    # PEFT 0.18 (`get_peft_model`) and TRL 1.16 read `model.is_gradient_checkpointing`, which transformers 5.24
    # deprecates: the libraries' to change, not the user's.
    (r"`is_gradient_checkpointing` is deprecated", "a library reads a deprecated property"),
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def silence_known_noise() -> None:
    """Install the filters (idempotent)."""
    for name in {name for name, _, _ in KNOWN_NOISE}:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages(tuple(start for owner, start, _ in KNOWN_NOISE if owner == name)))
    for pattern, _ in KNOWN_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def configure_logging(level: int = logging.INFO) -> None:
    """Our log format on the root logger, each library line printed once, the known noise silenced."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    for name in LOGGERS_WITH_OWN_HANDLER:
        logger = logging.getLogger(name)
        if logger.handlers:
            logger.propagate = False
    silence_known_noise()
