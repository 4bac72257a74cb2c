"""Test set-up: offline Hub, the Triton interpreter on CPU, seeds, fixture paths, tiny configs."""

import os
import shutil
import sys
from pathlib import Path


def _gpu_suite_alone() -> bool:
    """Whether pytest was asked to collect only paths inside tests/gpu, on a machine with an NVIDIA driver: the GPU
    suite (`pytest -m gpu tests/gpu`), which runs the compiled kernels. Read from the command line because this must
    be decided before torch is imported (torch imports triton, which reads TRITON_INTERPRET then)."""
    gpu_suite = Path(__file__).resolve().parent / "gpu"
    paths = [Path(arg.split("::")[0]).resolve() for arg in sys.argv[1:] if not arg.startswith("-")]
    paths = [path for path in paths if path.exists()]
    nvidia = shutil.which("nvidia-smi") is not None or Path("/dev/nvidiactl").exists()
    return bool(paths) and all(path.is_relative_to(gpu_suite) for path in paths) and nvidia


# Both must be set before any @triton.jit module (torch imports triton) or transformers is imported. The CPU suite runs
# the kernels in Triton's interpreter; an explicit TRITON_INTERPRET wins.
os.environ.setdefault("TRITON_INTERPRET", "0" if _gpu_suite_alone() else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1":
    try:
        import triton.runtime.autotuner as _autotuner
    except ImportError:  # triton is optional on CPU
        _autotuner = None
    if _autotuner is not None:
        # The interpreter has no GPU driver to benchmark autotune configs with: the first config wins.
        def _no_bench(kernel_call, quantiles=None, **kwargs):
            return [0.0, 0.0, 0.0] if quantiles else 0.0

        _autotuner.Autotuner.do_bench = property(lambda self: _no_bench)

REPO = Path(__file__).resolve().parents[1]
# The official code's outputs on a tiny checkpoint (copied from the project's shared/fixtures, so a fresh clone
# tests itself); TNL_SHARED points at another copy of shared/ instead.
FIXTURE = (Path(os.environ["TNL_SHARED"]) / "fixtures" if "TNL_SHARED" in os.environ else REPO / "tests" / "fixtures") / "tnl_tiny_a"


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches and counters empty before and after the test (graph counts are then the test's own)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not FIXTURE.is_dir():
        raise FileNotFoundError(f"the tnl_tiny_a fixture is missing at {FIXTURE} (set TNL_SHARED to a folder holding fixtures/)")
    return FIXTURE


@pytest.fixture(scope="session")
def reference(fixture_dir):
    from safetensors.torch import load_file

    return load_file(str(fixture_dir / "reference.safetensors"))


def tiny_config(**overrides):
    """A tiny TNL with peaked logits (init std 0.5), so cache and decoding bugs change tokens."""
    from transnormer_hf import TransNormerLLMConfig

    fields = dict(vocab_size=48, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                  intermediate_size=48, lrpe_layers=[1, 0, 1], initializer_range=0.5)
    fields.update(overrides)
    return TransNormerLLMConfig(**fields)


@pytest.fixture
def tiny_model():
    from transnormer_hf import TransNormerLLMForCausalLM

    torch.manual_seed(0)
    return TransNormerLLMForCausalLM(tiny_config()).eval()
