"""`llava-moslora plan` against what a real build, forward, backward and AdamW step allocate on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llava_moslora.plan.planner import (
    PEAK_TOLERANCE,
    SavedBytes,
    format_plan,
    nf4_bytes,
    plan_memory,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Activations: the planner traces the towers' real forward but not XTuner's data-dependent splice
# of image features into the text (prepare_inputs_labels_for_multimodal). On CPU the saved bytes
# came out identical (tiny and mid); the stated tolerance, 2 %, leaves room for other kernels.
ACTIVATION_TOLERANCE = 0.02


def real_step(cfg, sample: dict | None = None) -> dict[str, int]:
    """Bytes of a real build + one forward/backward/AdamW step (batch 1, no checkpointing) on
    `sample`, or on the first sample of the config's dataset."""
    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.registry import BUILDER

    cfg.model.use_activation_checkpointing = False
    torch.manual_seed(0)
    model = BUILDER.build(cfg.model).train()
    if sample is None:
        sample = BUILDER.build(cfg.train_dataloader.dataset)[0]
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.untyped_storage().nbytes() for p in params)
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
    data = default_collate_fn([sample])["data"]
    with SavedBytes() as saved:
        loss = model(data, mode="loss")["loss"]
    loss.backward()
    optimizer.step()
    grads = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
    states = sum(
        t.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    image_tokens = (model.visual_encoder.config.image_size // 14) ** 2
    return dict(
        weights=weights,
        gradients=grads,
        optimizer=states,
        activations=saved.total,
        seq_len=data["input_ids"].shape[1] - 1 + image_tokens,
        no_grad=sum(1 for p in params if p.requires_grad and p.grad is None),
    )


def check_against_real(config: Path, options: dict, sample: dict | None = None) -> None:
    from llava_moslora.runs import load_config
    from llava_moslora.train import cpu_shims

    cpu_shims.apply()
    real = real_step(load_config(config, options), sample)
    plan = plan_memory(config, cfg_options=options, seq_len=real["seq_len"])
    assert plan.weights == real["weights"]
    assert plan.gradients == real["gradients"]
    assert plan.optimizer == real["optimizer"]
    assert len(plan.unreachable) == real["no_grad"]
    predicted = plan.activations(1, checkpointing=False)
    assert predicted == pytest.approx(real["activations"], rel=ACTIVATION_TOLERANCE)
    assert "largest per-device batch" in format_plan(plan)


def test_plan_matches_a_real_tiny_step_exactly(tiny_env, tiny_samples):
    check_against_real(CONFIGS / "tiny_moslora.py", {}, tiny_samples[0])


@pytest.mark.slow
def test_plan_matches_a_real_mid_size_step_exactly(tmp_path):
    """The `mid` stand-in (hidden 1024, CLIP-L at 336 px) through the paper config: ~40 s."""
    from llava_moslora.builders.standin import make_standin, path_overrides

    paths = make_standin(tmp_path, "mid", samples=1)
    config = CONFIGS / "llama3_moslora.py"
    check_against_real(config, path_overrides(config, paths))


# The planner's peak against one the profiler measures (torch.profiler's memory events: every
# allocation and free of the CPU allocator, which the planner never reads), on three stand-ins,
# checkpointing on and off. Cheap shapes: 1 LLM layer (2 for mid) and 1 ViT layer at the real
# widths and vocabularies, fp32, batch 1 of 128 positions: 64 image tokens ((112 // 14) ** 2, a
# smaller image than CLIP-L/336's 576 tokens) and 64 text positions.
IMAGE_SIZE, TEXT = 112, 64
IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2
PEAK_CASES = [
    pytest.param(shape, ckpt, marks=[] if shape == "mid" else [pytest.mark.slow])
    for shape in ("mid", "llama3-8b", "internlm2-7b")
    for ckpt in (True, False)
]


def profiled_peak(fn) -> int:
    """Most bytes allocated at once while `fn()` runs, above what was allocated before it, from
    torch.profiler's memory events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    sizes = [
        e.nbytes() for e in sorted(events, key=lambda e: e.start_ns()) if e.name() == "[memory]"
    ]
    live = peak = 0
    for nbytes in sizes:
        live += nbytes
        peak = max(peak, live)
    return peak


def standin_options(tmp_path: Path, shape: str, checkpointing: bool) -> tuple[Path, dict]:
    """The paper config of `shape`'s family pointed at config-only stand-in towers (fp32)."""
    from llava_moslora.builders.standin import STANDINS, write_standin_configs

    paths = write_standin_configs(
        tmp_path, shape, llm_layers=2 if shape == "mid" else 1, vit_layers=1, image_size=IMAGE_SIZE
    )
    options = {
        "model.llm.pretrained_model_name_or_path": str(paths["llm"]),
        "model.visual_encoder.pretrained_model_name_or_path": str(paths["clip"]),
        "model.use_activation_checkpointing": checkpointing,
    }
    if STANDINS[shape].llm.family == "internlm2":  # QMoSLoRA's adapters, the LLM unquantized
        options.update({"model.llm.quantization_config": None, "model.llm.torch_dtype": "float32"})
        return CONFIGS / "internlm2_qmoslora.py", options
    return CONFIGS / "llama3_moslora.py", options


@pytest.mark.parametrize("shape, checkpointing", PEAK_CASES)
def test_plan_predicts_the_profiled_peak_of_a_real_step(tmp_path, shape, checkpointing):
    """XTuner's own forward (the image spliced into the text), backward and AdamW step, built in
    memory: weights and AdamW states to the byte, the step's peak within PEAK_TOLERANCE, and the
    plan's fit (peak + tolerance) never below what the step used."""
    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.utils import IMAGE_TOKEN_INDEX

    from llava_moslora.plan.planner import build_meta_llava
    from llava_moslora.runs import load_config
    from llava_moslora.train import cpu_shims

    cpu_shims.apply()
    config, options = standin_options(tmp_path, shape, checkpointing)
    plan = plan_memory(config, cfg_options=options, seq_len=IMAGE_TOKENS + TEXT, device="cpu")
    torch.manual_seed(0)
    model = build_meta_llava(load_config(config, options), device="cpu").model.train()
    params = list({id(p): p for p in model.parameters()}.values())
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
    # <bos> <image> then text: 1 + IMAGE_TOKENS + (TEXT - 1) positions, every text label trained.
    ids = [1, IMAGE_TOKEN_INDEX] + [5] * (TEXT - 1)
    sample = {
        "input_ids": ids,
        "labels": [-100, -100] + ids[2:],
        "pixel_values": torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE),
    }

    def step():
        loss = model(default_collate_fn([sample])["data"], mode="loss")["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # the first step creates AdamW's states; the second is the steady state measured
    weights = sum(p.untyped_storage().nbytes() for p in params)
    states = sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values())
    assert (plan.weights, plan.optimizer) == (weights, states)
    measured = profiled_peak(step)
    predicted = plan.step_peak(1, checkpointing)
    if os.environ.get("PLAN_PEAKS_OUT"):  # the table of docs/performance.md, appended row by row
        with open(os.environ["PLAN_PEAKS_OUT"], "a") as out:
            on = "on" if checkpointing else "off"
            out.write(
                f"| {shape} | {on} | {measured / 2**20:.2f} | {predicted / 2**20:.2f} | "
                f"{predicted / measured:.3f} |\n"
            )
    assert predicted == pytest.approx(measured, rel=PEAK_TOLERANCE)
    assert (1 + PEAK_TOLERANCE) * plan.total(1, checkpointing) >= weights + states + measured


def test_plan_is_deterministic(tmp_path):
    """Two plans of one config give the same bytes (a set of storage addresses once made them
    differ run to run: freed addresses were reused)."""
    config, options = standin_options(tmp_path, "mid", True)
    one, two = (
        plan_memory(config, cfg_options=options, seq_len=IMAGE_TOKENS + TEXT) for _ in range(2)
    )
    assert format_plan(one) == format_plan(two)
    assert (one.peak_fixed, one.peak_per_sample) == (two.peak_fixed, two.peak_per_sample)


def test_nf4_bytes_match_bitsandbytes(tiny_env):
    """The 4-bit weights of tiny_qmoslora: packed nibbles + double-quantized absmax, exactly."""
    import bitsandbytes as bnb
    from xtuner.registry import BUILDER

    from llava_moslora.plan.planner import build_meta_llava, parameter_rows
    from llava_moslora.runs import load_config
    from llava_moslora.train import cpu_shims

    cpu_shims.apply()
    cfg = load_config(CONFIGS / "tiny_qmoslora.py")
    real = BUILDER.build(cfg.model)
    layers = [m for m in real.llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    real_nf4 = sum(
        m.weight.untyped_storage().nbytes()
        + m.weight.quant_state.absmax.untyped_storage().nbytes()
        + m.weight.quant_state.state2.absmax.untyped_storage().nbytes()
        for m in layers
    )
    frozen, _, _ = parameter_rows(
        build_meta_llava(load_config(CONFIGS / "tiny_qmoslora.py")), "none"
    )
    assert frozen["llm weights (NF4)"].bytes == real_nf4
    assert frozen["llm weights (NF4)"].tensors == len(layers)
    assert nf4_bytes(4096 * 4096) == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * 1024


def paper_trainable(llm_layers: int) -> int:
    """Trainable elements of configs/llama3_moslora.py on `llm_layers` LLaMA-3-8B layers.

    r64 on q,k,v,o,gate,up,down of each LLaMA layer, r64 on 6 linears of CLIP-L's layers 0-22
    (the 24th runs after the hidden state LLaVA reads, visual_select_layer=-2, and is not
    adapted), the 1024 -> 4096 -> 4096 projector; mixers 64 x 64 each.
    """
    per_llm_layer = 64 * (4096 * 2 + (4096 + 1024) * 2 + 4096 * 2 + (4096 + 14336) * 3)
    per_vit_layer = 64 * (2048 * 4 + (1024 + 4096) * 2)
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    mixers = 64 * 64 * (7 * llm_layers + 6 * 23)
    return llm_layers * per_llm_layer + 23 * per_vit_layer + projector + mixers


def test_paper_config_builds_offline_from_hub_ids():
    """No files, no network: the hub ids of the paper config resolve to their known shapes, on
    the meta device (what `plan` builds first; the whole plan of this config is the next test)."""
    from llava_moslora.plan.planner import build_meta_llava, parameter_rows
    from llava_moslora.runs import load_config

    meta = build_meta_llava(load_config(CONFIGS / "llama3_moslora.py"), llm_layers=2)
    frozen, trainable, _ = parameter_rows(meta, "zero2")
    assert sum(r.numel for r in trainable.values()) == paper_trainable(2)
    assert frozen["llm weights"].bytes == 2 * frozen["llm weights"].numel  # bf16


@pytest.mark.slow  # ~20 s: traces the 24-layer CLIP-L at 336 px four times, on fake tensors
def test_paper_config_plans_offline_from_hub_ids():
    """No files, no network: the plan of the paper config from its hub ids."""
    plan = plan_memory(CONFIGS / "llama3_moslora.py", gpus=8, deepspeed="zero2", llm_layers=2)
    trainable = sum(r.numel for r in plan.trainable.values())
    assert trainable == paper_trainable(2)
    assert plan.seq_len == 2047 and plan.image_tokens == 576
    assert plan.frozen["llm weights"].bytes == 2 * plan.frozen["llm weights"].numel  # bf16
    assert plan.gradients == -(-6 * trainable // 8) and plan.optimizer == -(-12 * trainable // 8)
    assert plan.unreachable == []  # every trainable tensor gets a gradient
    assert plan.act_per_sample[True] < plan.act_per_sample[False]


@pytest.mark.slow  # ~35 s: traces the 24-layer CLIP-L at 336 px
def test_plan_names_the_dead_vit_layer_with_the_papers_exact_targets():
    """`layers_to_transform=None` adapts CLIP-L's last layer too, above visual_select_layer=-2:
    its 6 adapters (A, B, mixer each) never get a gradient, and the plan says so."""
    options = {"model.visual_encoder_lora.layers_to_transform": None}
    plan = plan_memory(CONFIGS / "llama3_moslora.py", llm_layers=2, cfg_options=options)
    assert len(plan.unreachable) == 18
    assert all(".encoder.layers.23." in name for name in plan.unreachable)
    per_vit_layer = 64 * (2048 * 4 + (1024 + 4096) * 2) + 6 * 64 * 64  # A, B and the mixers
    assert plan.unreachable_numel == per_vit_layer


def test_plan_refuses_bad_arguments():
    with pytest.raises(
        ValueError, match=r"`deepspeed` should be one of none, zero2, zero3 .* 'z1'"
    ):
        plan_memory(CONFIGS / "llama3_moslora.py", deepspeed="z1")
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        plan_memory(
            CONFIGS / "llama3_moslora.py",
            cfg_options={"model.llm.pretrained_model_name_or_path": os.devnull + "/nowhere"},
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--gpu-memory", "-1"],
            r"`gpu_memory_gib` \(--gpu-memory\) should be .* passed is -1.0\.",
        ),
        (["--gpu-memory", "0.5"], r"more than the 1 GiB kept .* passed is 0.5\."),
        (["--gpu-memory", "nan"], r"`gpu_memory_gib` .* passed is nan\."),
        (["--seq-len", "0"], r"`seq_len` \(--seq-len\) should be a positive .* passed is 0\."),
        (["--seq-len", "576"], r"after the 576 image tokens \(at least 577\) .* passed is 576\."),
        (["--llm-layers", "0"], r"`llm_layers` \(--llm-layers\) should be a positive .* is 0\."),
        (["--vit-layers", "-2"], r"`vit_layers` \(--vit-layers\) should be a positive .* is -2\."),
    ],
)
def test_plan_cli_refuses_impossible_numbers(capsys, args, message):
    """One line naming the flag and the value, exit 2, before any tracing."""
    import re

    from llava_moslora.cli import main

    shallow = ["--llm-layers", "1", "--vit-layers", "1"]
    code = main(["plan", str(CONFIGS / "llama3_moslora.py"), *shallow, *args])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), captured.err
