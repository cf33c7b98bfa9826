"""The main job's table is the same on every x86-64 machine with AVX2 (scripts/pin_numerics.sh).

A machine can emulate a narrower instruction set than its own, never a wider one. So the slow test
trains the same slice under the settings this machine can take, pinned and unpinned, and compares
the adapters bit for bit: pinned, the machine's own kernels and an emulated AVX2-only machine give
the same bits; unpinned, the machine's own kernels differ from the AVX2 machine's wherever the
machine has AVX512 (the table the issue saw change from one CPU to the next).

Run as a script (`python tests/test_numerics.py`), this file trains the slice and prints the hash.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIN = REPO / "scripts" / "pin_numerics.sh"
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
# What an AVX2-only machine (no AVX512) would run, emulated here: each library's own cap.
AVX2_MACHINE = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
NUMERIC_VARS = (*PINNED, "MKL_ENABLE_INSTRUCTIONS")


def run_in(env_vars: dict[str, str], code: str, *, pinned: bool) -> str:
    """`code` in a fresh interpreter, with `env_vars` set and, if `pinned`, the pin sourced after
    them (as the main job does); the numeric variables of this process are cleared first."""
    env = {k: v for k, v in os.environ.items() if k not in NUMERIC_VARS}
    env.update(env_vars, OMP_NUM_THREADS="1", PYTHON=sys.executable, CODE=code)
    source = f'source "{PIN}"; ' if pinned else ""
    result = subprocess.run(
        ["bash", "-c", source + '"$PYTHON" -c "$CODE"'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


CAPABILITY = "import torch; print(torch.backends.cpu.get_cpu_capability())"


def test_the_pin_caps_every_kernel_library_at_avx2_whatever_the_user_had_set():
    seen = run_in(
        {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"},
        "import os, torch; print(torch.backends.cpu.get_cpu_capability(), "
        "*(os.environ[k] for k in ('ONEDNN_MAX_CPU_ISA', 'MKL_CBWR')))",
        pinned=True,
    )
    assert seen.split() == ["AVX2", "AVX2", "AVX2,STRICT"]


def test_the_main_job_runs_every_command_pinned(tmp_path):
    from tests.launchers import recorded_calls, run_script

    result = run_script(REPO / "scripts" / "offline_pipeline.sh", tmp_path, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    calls = recorded_calls(tmp_path)
    # The recorder standing in for `llava-moslora` logs the numeric settings of each call.
    isa = [line.split() for line in (tmp_path / "calls.isa").read_text().splitlines()]
    # make-tiny, bench, 2 x (train, export, eval), machine, report
    assert len(isa) == len(calls) == 10
    assert {tuple(x) for x in isa} == {tuple(PINNED.values())}


# --- the slice: both towers' MoSLoRA adapters and the projector, 30 AdamW steps --------------------


def train_slice(steps: int = 30) -> str:
    """SHA-256 of the trained adapters and projector, and of the trained model's bfloat16 logits:
    every kernel family the main job runs (the ViT's patch convolution, attention, layer and RMS
    norms, GELU/SiLU, cross entropy, AdamW; bfloat16 inference) on a tiny LLaVA, at a learning
    rate high enough that last bits grow."""
    import torch
    from peft import get_peft_model

    from llava_moslora.builders.tiny import (
        CLIP_TARGETS,
        LLAMA_TARGETS,
        tiny_clip_vision,
        tiny_llama,
    )
    from llava_moslora.moslora import moslora_config

    llm = get_peft_model(
        tiny_llama(0, hidden_size=64),
        moslora_config(r=8, lora_alpha=16, target_modules=list(LLAMA_TARGETS)),
    )
    vit = get_peft_model(
        tiny_clip_vision(0), moslora_config(r=8, lora_alpha=2, target_modules=list(CLIP_TARGETS))
    )
    projector = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)
    )
    params = [p for m in (llm, vit, projector) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pixels = torch.randn(8, 3, 28, 28, generator=generator)
        ids = torch.randint(0, 128, (8, 12), generator=generator)
        image = projector(vit(pixel_values=pixels).last_hidden_state[:, 1:])  # (8, 4, 64)
        embeds = torch.cat([image, llm.get_input_embeddings()(ids)], dim=1)  # (8, 16, 64)
        labels = torch.cat([torch.full((8, 4), -100), ids], dim=1)
        loss = llm(inputs_embeds=embeds, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    digest = hashlib.sha256()
    for tensor in params:
        digest.update(tensor.detach().numpy().tobytes())
    # The main job scores bfloat16 exports: their matmuls take other kernels (AVX512-BF16, AMX).
    with torch.no_grad():
        image = projector.bfloat16()(
            vit.bfloat16()(pixel_values=pixels.bfloat16()).last_hidden_state[:, 1:]
        )
        llm.bfloat16()
        embeds = torch.cat([image, llm.get_input_embeddings()(ids)], dim=1)
        digest.update(llm(inputs_embeds=embeds).logits.float().numpy().tobytes())
    return digest.hexdigest()


SLICE = f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.test_numerics import train_slice; print(train_slice())"


@pytest.mark.slow
def test_pinned_slices_are_bit_identical_on_every_instruction_set_this_machine_emulates():
    native = run_in({}, CAPABILITY, pinned=False)
    pinned = {
        "own kernels": run_in({}, SLICE, pinned=True),
        "an AVX2-only machine": run_in(AVX2_MACHINE, SLICE, pinned=True),
        "MKL told to use AVX512": run_in({"MKL_ENABLE_INSTRUCTIONS": "AVX512"}, SLICE, pinned=True),
    }
    avx2_machine_unpinned = run_in(AVX2_MACHINE, SLICE, pinned=False)
    own_unpinned = run_in({}, SLICE, pinned=False)
    print(native, pinned, avx2_machine_unpinned, own_unpinned)  # shown with `pytest -s`
    assert set(pinned.values()) == {avx2_machine_unpinned}, pinned
    # The pin is not a no-op where it matters: on an AVX512 machine its own kernels add in another
    # order than an AVX2 machine's (on an AVX2-only machine there is nothing to pin, and they agree).
    if native.startswith("AVX512"):
        assert own_unpinned != avx2_machine_unpinned
    else:
        assert native == "AVX2" and own_unpinned == avx2_machine_unpinned


if __name__ == "__main__":
    print(train_slice())
