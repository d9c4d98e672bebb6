import os
from pathlib import Path

# Under pytest-xdist each worker takes its share of the cores for PyTorch's (OpenMP) threads, and so do the
# processes its tests start: two workers of two threads each on two cores spin against each other, which
# cost a third of the suite's CPU time (measured on two cores: 450 -> 316 CPU-seconds on four files). A thread
# count the caller set is left alone.
_THREADS = None
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0) > 1 and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _THREADS = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

if _THREADS is not None:
    torch.set_num_threads(_THREADS)

# Triton kernels run on the CPU through Triton's interpreter (set before gptoss.kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton's own @jit helpers (tl.sum, tl.cumsum, ... in triton.language.standard) are made interpreted or
# compiled when triton.language is first imported. Imported here, under the setting above: a test that
# imports tests/compile_gate.py (which clears TRITON_INTERPRET for its own compiling) before anything
# imported Triton would otherwise leave them compiled, and every interpreted kernel calling one fails with
# "Cannot call @triton.jit'd outside of the scope of a kernel".
import triton.language  # noqa: E402, F401


def _patch_lang_once_per_launch() -> None:
    """Triton's interpreter patches triton.language (five inspect.getmembers walks over its modules) at each
    launch, and again at every call of a @triton.jit helper inside the kernel, in every program (measured:
    27.6 s -> 19.1 s for an interpreted training step with this hook). The helper's patch changes nothing:
    the launch's own patch is in place until the launch ends, and a member it replaced is no longer a
    builtin to replace. So a helper's call whose language modules the running launch already patched
    skips it; anything else goes to Triton's own code. Where the interpreter's internals are not the ones
    this knows, nothing is changed."""
    from triton.runtime import interpreter

    original, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or getattr(original, "_once_per_launch", False):
        return
    modules = (triton.language, triton.language.core)
    patched: set[int] | None = None  # the modules patched since the launch in progress began (launches do not nest)
    seen: dict[object, frozenset[int]] = {}  # a jit function -> the language modules its globals hold

    def patch_lang(fn):
        nonlocal patched
        langs = seen.get(fn)
        if langs is None:
            langs = seen[fn] = frozenset(id(v) for v in fn.__globals__.values() if any(v is m for m in modules))
        if patched is not None and langs and langs <= patched:
            return scope_type()  # a helper inside the launch: already patched
        scope = original(fn)
        if patched is not None:  # a helper that sees a module not yet patched (Triton's own tl.sum sees tl.core):
            patched |= langs  # patched as Triton does, and never restored by Triton either
            return scope
        patched = set(langs)  # the launch itself
        restore = scope.restore

        def restore_and_end():
            nonlocal patched
            patched = None
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang._once_per_launch = True
    interpreter._patch_lang = patch_lang


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_lang_once_per_launch()

from gptoss.config import ModelConfig  # noqa: E402

# The verified vocabulary beside the repository (../shared/vocab), when there; otherwise gptoss
# rebuilds it from the quicktok-v1 package. Either way nothing is downloaded.
_SHARED_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab"
if (_SHARED_VOCAB / "o200k_base.tiktoken").exists():
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_SHARED_VOCAB))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_config(**overrides) -> ModelConfig:
    """A few-layer config with a small vocabulary and every structural feature of gpt-oss:
    GQA, q width != hidden width, intermediate != hidden, a prime number of experts, a window
    shorter than the test sequences, sliding and full layers."""
    base = dict(
        num_hidden_layers=3,
        hidden_size=96,
        intermediate_size=64,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=7,
        num_experts_per_tok=3,
        vocab_size=300,
        sliding_window=5,
    )
    base.update(overrides)
    return ModelConfig(**base)


# a dataset row of the HuggingFaceH4/Multilingual-Thinking schema, for the trainer's tests
ROW = {
    "reasoning_language": "German",
    "developer": "You are a helpful assistant.",
    "user": "What is 12 plus 30?",
    "analysis": "Wir addieren 12 und 30. Die Summe ist 42.",
    "final": "12 plus 30 is 42.",
}
# the full o200k_harmony vocabulary (the data uses the real tokenizer), everything else small
TRAIN_CONFIG = ModelConfig(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=16,
)


def package_dirs() -> dict[str, str]:
    """pyproject.toml's [tool.setuptools.package-dir]: package name -> the repository folder it is built from
    (the one place that says where gptoss.kernels and gptoss.train come from)."""
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    return dict(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"])
