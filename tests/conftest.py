import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_PROCESSORS = Path(os.environ.get("VLM_REAL_PROCESSORS", REPO_ROOT.parent / "shared" / "processors"))


# --------------------------------------------------------------------------------------------------------------------
# The suite writes nothing into the checkout: after `pytest`, the README's demo is still a first run
# --------------------------------------------------------------------------------------------------------------------
# Left by the tools themselves, not by what the tests run.
CHECKOUT_CACHES = ("__pycache__/", ".pytest_cache/", ".ruff_cache/", ".egg-info/")
_SESSION_BEFORE = pytest.StashKey[set]()
_CHECKOUT_BEFORE = pytest.StashKey[set]()
_SESSION_NEW = pytest.StashKey[list]()


def checkout_artifacts() -> set[str]:
    """What a run can leave in the checkout, as `git status` lists it: ignored entries (`outputs/`, `data/`, `wandb/`:
    where the demo recipes' relative paths point) and untracked top-level files (`compare_runs.png`). Untracked
    files deeper down are not counted: they are new source files of whoever is editing the checkout meanwhile.
    Empty outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "status", "--porcelain=v1", "-z", "--ignored", "--untracked-files=normal"],
            cwd=REPO_ROOT,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # read only: no refresh of the index
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return set()
    if result.returncode != 0:
        return set()
    found = set()
    for entry in filter(None, result.stdout.split("\0")):
        status, path = entry[:2], entry[3:]
        if any(path.endswith(cache) or f"/{cache}" in f"/{path}" for cache in CHECKOUT_CACHES):
            continue
        if status == "!!" or (status == "??" and "/" not in path):
            found.add(path)
    return found


@pytest.fixture(autouse=True)
def _writes_nothing_into_the_checkout(request):
    """Fails the test that leaves something in the checkout (at its teardown), naming what."""
    before = request.config.stash.get(_CHECKOUT_BEFORE, None)
    if before is None:
        before = checkout_artifacts()
    yield
    after = checkout_artifacts()
    new = sorted(after - before)
    request.config.stash[_CHECKOUT_BEFORE] = after  # one test is blamed once
    if new:
        pytest.fail(
            f"{request.node.nodeid} wrote into the checkout {REPO_ROOT}: {', '.join(new)}. Tests write under tmp_path: "
            "pass --output_dir, --model_name_or_path and --dataset_path (the demo recipes' defaults are relative to "
            "the checkout). Delete what it left, or the README's demo is no first run.",
            pytrace=False,
        )


def pytest_sessionstart(session):
    session.config.stash[_SESSION_BEFORE] = checkout_artifacts()


def pytest_sessionfinish(session, exitstatus):
    """What the session left in the checkout, tests and fixtures alike, fails the run (said in the summary)."""
    before = session.config.stash.get(_SESSION_BEFORE, None)
    if before is None:
        return
    new = sorted(checkout_artifacts() - before)
    session.config.stash[_SESSION_NEW] = new
    if new:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    new = terminalreporter.config.stash.get(_SESSION_NEW, None)
    if new:
        terminalreporter.write_sep(
            "=", f"FAILED: the session wrote into the checkout {REPO_ROOT}: {', '.join(new)}", red=True, bold=True
        )


# --------------------------------------------------------------------------------------------------------------------
# Real processors and tiny models
# --------------------------------------------------------------------------------------------------------------------
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
        check=False,
    )
