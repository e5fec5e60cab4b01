"""What a demo recipe builds on first use: the tiny model it names (`tiny_model_family`) and its generated data
(`generate_data_if_missing`), each built whole or not at all (`ensure_demo_inputs`)."""

from __future__ import annotations

import logging
from pathlib import Path

from .configs import VLMScriptArguments
from .files import apply_user_modes
from .tasks import task_from_args
from .tiny import build_tiny_model

logger = logging.getLogger(__name__)

__all__ = ["ensure_demo_inputs"]


def ensure_demo_inputs(script_args: VLMScriptArguments, model_name_or_path: str | None) -> None:
    """Build the tiny model and generate the demo data that a demo recipe asks for, when they are missing.

    Only rank 0 builds; the other processes wait, so that no process reads a half-written directory.
    """
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        if not state.is_main_process:
            return
        if script_args.tiny_model_family and model_name_or_path and not Path(model_name_or_path).exists():
            logger.info("Building a tiny %s model at %s", script_args.tiny_model_family, model_name_or_path)
            _build_atomically(
                Path(model_name_or_path), lambda tmp: build_tiny_model(script_args.tiny_model_family, tmp)
            )
        if script_args.generate_data_if_missing and script_args.dataset_path:
            data_dir = Path(script_args.dataset_path)
            if not data_dir.exists():
                task = task_from_args(script_args)
                logger.info("Generating %d %s demo samples at %s", script_args.demo_data_size, task.name, data_dir)
                _build_atomically(data_dir, lambda tmp: task.make_data(tmp, script_args.demo_data_size, seed=0))


def _build_atomically(target: Path, build) -> None:
    """Build into a temporary sibling directory and rename it into place, so a crash leaves nothing half-built."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(temporary)
        apply_user_modes(temporary)  # mkdtemp made it 0o700, safetensors the tiny model's weights 0o600
        temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
