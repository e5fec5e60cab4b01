import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_PROCESSORS = Path(os.environ.get("VLM_REAL_PROCESSORS", REPO_ROOT.parent / "shared" / "processors"))


def real_processor_dir(name: str) -> Path:
    return REAL_PROCESSORS / name


def requires_real_processor(name: str):
    return pytest.mark.skipif(
        not (REAL_PROCESSORS / name / "tokenizer_config.json").is_file(),
        reason=f"real processor {name!r} not found under {REAL_PROCESSORS} (set VLM_REAL_PROCESSORS)",
    )


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Tiny models of every family, with our own processor, built once per session: {family: dir}."""
    from vlm_recipes.tiny import TINY_FAMILIES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny_model(family, root / family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tiny_training_template_dirs(tmp_path_factory):
    """Tiny models wearing TRL's `_training` templates (with generation markers): {family: dir}."""
    from vlm_recipes.tiny import TINY_FAMILIES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models-training-template")
    return {family: build_tiny_model(family, root / family, training_template=True) for family in TINY_FAMILIES}


def load_benchmark():
    """`scripts/benchmark.py` as a module."""
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO_ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_script"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run_script(args, cwd=REPO_ROOT, timeout=900, env=None):
    """Run a command in a subprocess the way a user does; returns the CompletedProcess (never raises)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, *args] if str(args[0]).endswith(".py") else list(args),
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
