"""Every ```python block of README.md runs as written, or is skipped here by name with the reason.

Each block is run in a fresh namespace after a preamble of this file's own that defines what the
block takes as given (a model whose gradients are set, an optimizer, a loss, a loader, ...); the
README itself is never edited to make a block runnable. A block is found by a distinctive
substring (its marker). The blocks that need several processes or a GPU are in SKIPPED with the
reason; blocks whose packages are missing skip through pytest.importorskip. A block that no
entry names fails (test_every_block_is_run_or_skipped), so a new block cannot go untested, and an
entry that names no block fails too, so the lists cannot go stale.

The blocks run in this process: the working directory is a temporary one (files a block writes,
such as TensorBoard runs or Trainer's output_dir, land there), and torch and timm are unpatched
again after a block that patched them.
"""
from __future__ import annotations

import re
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

import fusedclip
from torchvision_stand_ins import torchvision_stand_ins

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the README's fenced ```python blocks, in order."""
    return [m.group(1) for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


# --- what the blocks take as given ------------------------------------------------------------

_MODEL = """
import torch
import fusedclip
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
"""

# a model whose gradients are set, as after a backward pass
_GRADS = _MODEL + """
(model(torch.randn(32, 8)) * 10).square().sum().backward()
grads = [p.grad for p in model.parameters()]
"""

# a loss not yet backpropagated
_LOSS = _MODEL + """
loss = (model(torch.randn(32, 8)) * 10).square().sum()
"""

_MONITOR = _MODEL + """
from torch.utils.tensorboard import SummaryWriter
loader = [torch.randn(16, 8) for _ in range(5)]
def loss(model, batch):
    return model(batch).square().mean()
"""

_GRAD_SCALER = _LOSS + """
opt = optimizer
scaler = torch.amp.GradScaler("cpu")
"""

_TRAINER = """
import torch
import fusedclip
import transformers
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0))
data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 64, (8, 12))]
"""

_LIGHTNING = """
import torch
import fusedclip
import lightning
"""


@dataclass(frozen=True)
class Run:
    """A block that runs: its preamble, the packages it needs, and what must hold after it."""

    preamble: str
    needs: tuple[str, ...] = ()
    check: str = ""


RUN: dict[str, Run] = {
    # the first example: clip_grad_norm_ between backward and step
    "# was torch.nn.utils.": Run(_LOSS, check="""
assert isinstance(total_norm, torch.Tensor) and total_norm > 1.0
assert abs(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))) - 1.0) < 1e-4
"""),
    "fusedclip.get_norms(grads": Run(_GRADS, check="""
assert per_tensor.shape == (4,) and per_param.shape == (4,)
"""),
    'SummaryWriter("runs/x")': Run(_MONITOR, needs=("tensorboard",), check="""
assert monitor.step == 5 and len(monitor.history()) > 0
"""),
    "lightning.Trainer(gradient_clip_val": Run(_LIGHTNING, needs=("lightning",), check="""
assert fusedclip.is_torch_patched()
assert torch.nn.utils.get_total_norm is fusedclip.get_total_norm
assert torch.nn.utils.clip_grads_with_norm_ is fusedclip.clip_grads_with_norm_
"""),
    "grad_scaler=scaler, optimizer=opt": Run(_GRAD_SCALER, check="""
assert torch.isfinite(total_norm)
"""),
    "fusedclip.ClipOptimizer(torch.optim.AdamW(model.parameters(), fused=True)": Run(_GRADS, check="""
assert torch.isfinite(total_norm) and len(opt.state) == 4
"""),
    "transformers.Trainer(model=model": Run(_TRAINER, needs=("transformers", "accelerate"), check="""
assert trainer.optimizer is opt or getattr(trainer.optimizer, "optimizer", None) is opt
"""),
    "timm.utils.NativeScaler()": Run(_LOSS, needs=("timm",), check="""
assert fusedclip.is_timm_patched()
"""),
}

SKIPPED: dict[str, str] = {
    "FSDP2 (fully_shard)": "needs an initialized process group (FSDP2 / DTensor grads, DDP, pipeline "
                           "stages); tests/test_distributed.py runs these cases on gloo processes",
}


def _entries(block: str) -> list[str]:
    return [marker for marker in (*RUN, *SKIPPED) if marker in block]


def _block_id(block: str) -> str:
    entries = _entries(block)
    first = entries[0] if entries else block.strip().splitlines()[0]
    return re.sub(r"\W+", "_", first).strip("_")[:40]


@pytest.fixture(name="torchvision_stand_ins")
def _torchvision_stand_ins_fixture():
    """Stand-ins for timm's torchvision imports while a block runs, where torchvision is missing."""
    with torchvision_stand_ins():
        yield


# --- the tests -----------------------------------------------------------------------------------


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 8, f"found {len(BLOCKS)} ```python blocks in {README}"


def test_every_block_is_run_or_skipped():
    unnamed = [block for block in BLOCKS if not _entries(block)]
    assert not unnamed, (
        "README blocks that tests/test_readme.py neither runs nor skips (add each to RUN, with the "
        "preamble it needs, or to SKIPPED, with the reason):\n\n" + "\n---\n".join(unnamed))
    ambiguous = {_block_id(block): _entries(block) for block in BLOCKS if len(_entries(block)) > 1}
    assert not ambiguous, f"blocks named by more than one entry: {ambiguous}"


def test_every_entry_names_a_block():
    stale = [marker for marker in (*RUN, *SKIPPED) if not any(marker in block for block in BLOCKS)]
    assert not stale, f"entries of tests/test_readme.py that name no README block: {stale}"


@pytest.mark.parametrize("block", BLOCKS, ids=[_block_id(block) for block in BLOCKS])
def test_block_runs_as_written(block, tmp_path, monkeypatch, request):
    entries = _entries(block)
    if len(entries) != 1:
        pytest.fail(f"this block is named by {len(entries)} entries ({entries}), not one:\n{block}")
    marker = entries[0]
    if marker in SKIPPED:
        pytest.skip(SKIPPED[marker])
    run = RUN[marker]
    if "timm" in run.needs:  # before importorskip, which would take the torchvision error for a skip
        request.getfixturevalue("torchvision_stand_ins")
    for package in run.needs:
        pytest.importorskip(package, reason=f"{package} is not installed")

    monkeypatch.chdir(tmp_path)
    torch_was_patched = fusedclip.is_torch_patched()
    timm_was_patched = fusedclip.is_timm_patched()
    namespace: dict = {"__name__": "readme_block"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(textwrap.dedent(run.preamble), f"<preamble of {marker!r}>", "exec"), namespace)
            exec(compile(block, f"<README block {marker!r}>", "exec"), namespace)
        exec(compile(textwrap.dedent(run.check), f"<check of {marker!r}>", "exec"), namespace)
    finally:
        if not torch_was_patched:
            fusedclip.unpatch_torch()
        if not timm_was_patched and fusedclip.is_timm_patched():
            fusedclip.unpatch_timm()
