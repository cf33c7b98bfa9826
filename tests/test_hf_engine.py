"""The hf engine (llava_moslora/train/hf_engine.py) against XTuner's LLaVAModel, in float32.

Both engines run here in the default environment (transformers 4.57); tests/test_hf_engine_hf5.py
runs the hf engine on transformers 5. The XTuner side is the model `xtuner train` builds from
configs/tiny_moslora.py; its trained tensors are copied into the hf engine's model through the
one key mapping (`xtuner_keys`), so both start from the same adapters.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from llava_moslora.train import hf_engine
from llava_moslora.train.hf_recipe import read_recipe, recipe_from_config, write_recipe
from tests.factories import (
    FP32_ATOL,
    IMAGE_TOKEN_INDEX,
    TINY_MOSLORA,
    build_from_config,
    randomise_trained_tensors,
    read_config,
    save_mmengine_checkpoint,
)

# No dropout: its random masks are drawn in another order by each engine's forward.
NO_DROPOUT = {"model.llm_lora.lora_dropout": 0.0, "model.visual_encoder_lora.lora_dropout": 0.0}
BATCH = [0, 1, 2, 3]


def both_engines(config: str, work_dir: Path, randomise: bool = False):
    """(XTuner's LLaVAModel, its dataset, the config, the hf engine's Run with the same tensors)
    of configs/CONFIG.py without dropout; `randomise`: XTuner's B, mixers and projector moved
    first (`randomise_trained_tensors`), so that every trained tensor gets a gradient."""
    from xtuner.registry import BUILDER

    cfg, xtuner_model = build_from_config(config, NO_DROPOUT)
    if randomise:
        randomise_trained_tensors(xtuner_model)
    dataset = BUILDER.build(cfg.train_dataloader.dataset)
    recipe = recipe_from_config(cfg)
    run = hf_engine.Run(recipe, work_dir)
    hf_engine.load_trained(run.model, recipe, xtuner_model.state_dict(), "the XTuner model")
    return xtuner_model, dataset, cfg, run


@pytest.fixture(scope="module")
def engines(tiny_env):
    return both_engines("tiny_moslora", tiny_env / "unused_work_dir")


def test_recipe_is_derived_from_the_config(tiny_env, tmp_path):
    cfg = read_config("tiny_moslora")
    recipe = recipe_from_config(cfg)
    assert recipe.lr == cfg.optim_wrapper.optimizer.lr == 2e-3
    assert recipe.accumulative_counts == cfg.optim_wrapper.accumulative_counts == 2
    assert recipe.batch_size == cfg.train_dataloader.batch_size == 4
    assert recipe.template["INSTRUCTION"] == cfg.prompt_template["INSTRUCTION"]
    assert recipe.vision_adapter.options["layers_to_transform"] == [0, 1]
    assert recipe.llm_adapter.kind == "moslora"
    assert recipe_from_config(read_config("tiny_lora")).llm_adapter.kind == "lora"
    assert read_recipe(write_recipe(recipe, tmp_path / "r.json")) == recipe


def test_the_paper_configs_recipe_and_what_is_refused():
    """llama3_moslora.py (the paper's run) derives its recipe; a 4-bit config is refused by name."""
    from llava_moslora.train.hf_recipe import RecipeError

    recipe = recipe_from_config(read_config("llama3_moslora"))
    assert (recipe.lr, recipe.batch_size, recipe.accumulative_counts) == (2e-5, 8, 2)
    assert recipe.amp_dtype == "float16" and recipe.max_norm == 1 and recipe.warmup_epochs == 0.03
    assert recipe.llm_adapter.options["r"] == 64 and recipe.llm_adapter.options["lora_alpha"] == 128
    assert recipe.vision_adapter.options["layers_to_transform"] == list(range(23))
    assert recipe.template["INSTRUCTION"].startswith("<|start_header_id|>user")
    assert recipe.quantization is None and recipe.activation_checkpointing
    # The paper's QMoSLoRA: its 4-bit base as BitsAndBytesConfig's arguments, dtypes by name.
    qmoslora = recipe_from_config(read_config("internlm2_qmoslora"))
    assert qmoslora.quantization.llm_dtype == "float16"
    assert qmoslora.quantization.options == {
        "load_in_4bit": True,
        "load_in_8bit": False,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_compute_dtype": "float16",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_type": "nf4",
    }
    with pytest.raises(RecipeError, match=r"`model.llm.quantization_config` should be a 4-bit"):
        recipe_from_config(
            read_config(
                "internlm2_qmoslora",
                {
                    "model.llm.quantization_config.load_in_4bit": False,
                    "model.llm.quantization_config.load_in_8bit": True,
                },
            )
        )


def test_samples_encode_as_xtuner_does(engines):
    """Every sample: the same ids, labels (loss only on answers) and padded-square pixels."""
    _, dataset, _, run = engines
    samples = run.samples()
    assert len(samples) == len(dataset) >= 100
    for index in range(len(dataset)):
        ours, theirs = samples[index], dataset[index]
        assert ours["input_ids"] == theirs["input_ids"], index
        assert ours["labels"] == theirs["labels"], index
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"]), index
    assert any(label >= 0 for label in samples[0]["labels"])
    assert samples[0]["labels"][0] == -100  # the prompt carries no loss


class Gaps(NamedTuple):
    loss: float  # |XTuner's loss - the hf engine's|
    gradient: float  # the largest difference of any trained tensor's gradient
    compared: int  # trained tensors compared
    nonzero: int  # of which with a non-zero gradient (A and the mixers get none while B = 0)


def loss_and_gradient_gaps(xtuner_model, dataset, run) -> Gaps:
    """One batch through XTuner's LLaVAModel and the hf engine's model, both in train mode, every
    trained tensor's gradient checked against rtol 1e-5 / atol 1e-7."""
    from xtuner.dataset.collate_fns import default_collate_fn

    samples = run.samples()
    xtuner_model.train()
    run.model.train()
    xtuner_model.zero_grad()
    run.model.zero_grad()
    theirs = xtuner_model(default_collate_fn([dataset[i] for i in BATCH])["data"], mode="loss")
    ours = run.loss(run.batch([samples[i] for i in BATCH]))
    print(f"loss XTuner {theirs['loss'].item():.8f}, hf engine {ours.item():.8f}")
    theirs["loss"].backward()
    ours.backward()
    their_params = dict(xtuner_model.named_parameters())
    keys = hf_engine.xtuner_keys(run.model, run.recipe)
    assert any("visual_encoder" in k for k in keys.values())
    compared, nonzero, worst = 0, 0, 0.0
    for name, param in run.model.named_parameters():
        if not param.requires_grad:
            continue
        their_grad = their_params[keys[name]].grad
        assert their_grad is not None, name
        torch.testing.assert_close(param.grad, their_grad, rtol=1e-5, atol=1e-7)
        worst = max(worst, (param.grad - their_grad).abs().max().item())
        compared += 1
        nonzero += bool(param.grad.abs().max() > 0)
    print(f"{compared} gradients ({nonzero} non-zero), largest difference {worst:.3g}")
    return Gaps(abs(theirs["loss"].item() - ours.item()), worst, compared, nonzero)


def test_same_loss_and_adapter_gradients_as_xtuner(engines):
    """With activation checkpointing on in both (the config's default, XTuner's): recomputing
    each layer in backward changes no number."""
    xtuner_model, dataset, _, run = engines
    assert run.recipe.activation_checkpointing
    assert any("lora_mixer" in k for k in hf_engine.xtuner_keys(run.model, run.recipe))
    gaps = loss_and_gradient_gaps(xtuner_model, dataset, run)
    assert gaps.loss <= 1e-5
    assert gaps.compared >= 80  # both towers' A, B, mixers and the projector


def test_activation_checkpointing_recomputes_both_towers(engines, tiny_env):
    """On (the config's default, as XTuner's): each LLM and CLIP layer runs twice a step, its
    forward recomputed in backward; `use_activation_checkpointing=False`: once. XTuner's model
    has it on too."""
    xtuner_model, _, _, run = engines
    assert xtuner_model.llm.base_model.model.model.gradient_checkpointing
    off = hf_engine.Run(
        recipe_from_config(
            read_config("tiny_moslora", {"model.use_activation_checkpointing": False})
        ),
        tiny_env / "unused_work_dir",
    )
    assert not off.recipe.activation_checkpointing

    def forward_calls(run) -> dict[str, int]:
        layers = {
            "llm": run.model.model.language_model.layers[0],
            "clip": run.model.model.vision_tower.vision_model.encoder.layers[0],
        }
        calls = dict.fromkeys(layers, 0)
        hooks = [
            layer.register_forward_hook(
                lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
            )
            for name, layer in layers.items()
        ]
        samples = run.samples()
        run.model.train()
        run.loss(run.batch([samples[i] for i in BATCH])).backward()
        run.model.zero_grad()
        for hook in hooks:
            hook.remove()
        return calls

    assert forward_calls(run) == {"llm": 2, "clip": 2}
    assert forward_calls(off) == {"llm": 1, "clip": 1}


# --- QLoRA / QMoSLoRA: the LLM in 4-bit NF4 (configs/tiny_qmoslora.py) ---------------------------

TINY_QMOSLORA = str(Path(TINY_MOSLORA).with_name("tiny_qmoslora.py"))


@pytest.fixture(scope="module")
def engines_4bit(tiny_env):
    """As `engines`, on tiny_qmoslora.py (both build the LLM in 4 bits from the same weights),
    trained tensors randomised."""
    pytest.importorskip("bitsandbytes")
    return both_engines("tiny_qmoslora", tiny_env / "unused_work_dir", randomise=True)


def test_qmoslora_same_4bit_base_loss_and_gradients_as_xtuner(engines_4bit, tmp_path):
    import bitsandbytes as bnb

    from llava_moslora.moslora.layers_bnb import MoSLoRALinear4bit

    xtuner_model, dataset, _, run = engines_4bit
    recipe = run.recipe
    assert recipe.quantization.options["bnb_4bit_quant_type"] == "nf4"
    assert recipe.quantization.options["llm_int8_skip_modules"] == ["lm_head", "down_proj"]
    assert read_recipe(write_recipe(recipe, tmp_path / "r.json")) == recipe  # JSON for hf5
    # The same layers in 4 bits, holding the same packed bytes and scales.
    ours = run.model.model.language_model.layers[0].self_attn.q_proj
    theirs = xtuner_model.llm.base_model.model.model.layers[0].self_attn.q_proj
    for layer in (ours, theirs):
        assert isinstance(layer, MoSLoRALinear4bit)
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    assert torch.equal(ours.get_base_layer().weight.data, theirs.get_base_layer().weight.data)
    assert any("lora_mixer" in k for k in hf_engine.xtuner_keys(run.model, recipe))
    llm = run.model.model.language_model
    assert sum(isinstance(m, MoSLoRALinear4bit) for m in llm.modules()) == 2 * 6  # down_proj: not
    assert llm.gradient_checkpointing  # on, as XTuner's prepare_model_for_kbit_training sets it

    gaps = loss_and_gradient_gaps(xtuner_model, dataset, run)
    # Measured: loss difference 0.0, gradients 0.0 (the same NF4 bytes dequantize to the same
    # float32 weights; the same kernels in the same order).
    assert gaps.loss <= 1e-5
    assert gaps.nonzero == gaps.compared >= 80


@pytest.mark.slow
def test_qlora_gets_peft_4bit_layers_and_the_same_loss_and_gradients(tiny_env):
    """Stock LoRA on the 4-bit base (tiny_qlora.py): PEFT's own bnb layer, as under XTuner (PEFT
    picks it by the model's `is_loaded_in_4bit`, not by the layer: a plain LoRA layer would wrap
    Linear4bit and merge wrongly)."""
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit

    xtuner_model, dataset, _, run = both_engines(
        "tiny_qlora", tiny_env / "unused_work_dir", randomise=True
    )
    ours = run.model.model.language_model.layers[0].self_attn.q_proj
    theirs = xtuner_model.llm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(ours) is type(theirs) is Linear4bit
    gaps = loss_and_gradient_gaps(xtuner_model, dataset, run)
    assert gaps.loss <= 1e-5 and gaps.nonzero == gaps.compared  # measured 0.0


@pytest.mark.slow
def test_qmoslora_checkpoint_loads_and_exports_as_xtuners(engines_4bit, tmp_path):
    """Two hf-engine iterations on the 4-bit base: the checkpoint loads strictly into XTuner's
    model as `export` builds it (same loss on a batch as the hf engine's model), exports through
    the dequantizing merge, and a copy without its mixers is refused, not loaded without them."""
    from xtuner.dataset.collate_fns import default_collate_fn

    from llava_moslora.export.exporter import export
    from llava_moslora.runs import CheckpointMismatchError, load_run

    _, dataset, _, started = engines_4bit
    run = hf_engine.Run(started.recipe, tmp_path / "work")
    samples = run.samples()
    run.train(samples, max_iters=2)
    checkpoint = tmp_path / "work" / "iter_2.pth"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert any("lora_mixer" in k for k in state)
    _, loaded = load_run(TINY_QMOSLORA, checkpoint)
    loaded_state = loaded.state_dict()
    assert all(torch.equal(loaded_state[k], v) for k, v in state.items())
    with torch.no_grad():
        run.model.eval()
        loaded.eval()
        ours = run.loss(run.batch([samples[i] for i in BATCH])).item()
        data = default_collate_fn([dataset[i] for i in BATCH])["data"]
        theirs = loaded(data, mode="loss")["loss"].item()
    print(f"loss of the checkpoint: XTuner {theirs:.8f}, hf engine {ours:.8f}")
    assert abs(ours - theirs) <= 1e-5  # measured 0.0

    manifest = export(checkpoint, TINY_QMOSLORA, "hf-llava", tmp_path / "hf", dtype="float32")
    assert manifest.quantized_base and manifest.adapter_kind == "moslora"
    no_mixer = {k: v for k, v in state.items() if "lora_mixer" not in k}
    torch.save({"state_dict": no_mixer, "meta": {"seed": 0}}, tmp_path / "iter_3.pth")
    with pytest.raises(
        CheckpointMismatchError, match=r"missing from the checkpoint:\n.*lora_mixer"
    ):
        export(tmp_path / "iter_3.pth", TINY_QMOSLORA, "xtuner", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_4bit_recipe_without_bitsandbytes_stops_in_one_line(
    tiny_env, tmp_path, monkeypatch, capsys
):
    """Where bitsandbytes does not import (the GPU machines ship none): exit 2, one line naming
    the fix, before any model is built; and the combinations not carried over yet, likewise."""
    recipe = recipe_from_config(read_config("tiny_qmoslora"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises
    assert hf_engine.train(recipe, tmp_path / "work") == hf_engine.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "error: training refused: `quantization`" in err and "pip install" in err
    monkeypatch.undo()
    work = tmp_path / "work"
    assert hf_engine.train(recipe, work, deepspeed="deepspeed_zero2") == hf_engine.USAGE_ERROR
    assert "`--deepspeed deepspeed_zero2` with a 4-bit LLM" in capsys.readouterr().err
    from_llava_hf = dataclasses.replace(recipe, llava_hf_path=str(tmp_path))
    assert hf_engine.train(from_llava_hf, work) == hf_engine.USAGE_ERROR
    assert "a 4-bit LLM (`quantization`) is not supported" in capsys.readouterr().err
    assert not work.exists()


@pytest.fixture(scope="module")
def eight_iterations(engines):
    """The engines' trained tensors after the same 8 micro-batches (4 optimizer steps: accumulation
    2, clipping, warm-up then cosine): mmengine's OptimWrapper and schedulers on XTuner's model,
    the hf engine's loop on ours. Returns (XTuner's state_dict, the hf engine's trained_state)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS
    from xtuner.dataset.collate_fns import default_collate_fn

    xtuner_model, dataset, cfg, run = engines
    hf_engine.load_trained(run.model, run.recipe, xtuner_model.state_dict(), "the XTuner model")
    xtuner_model.zero_grad()  # what earlier tests' backward passes left in either model
    run.model.zero_grad()
    samples = run.samples()
    iters_per_epoch = len(dataset) // run.recipe.batch_size
    total = run.recipe.epochs * iters_per_epoch
    wrapper = build_optim_wrapper(xtuner_model, cfg.optim_wrapper)
    wrapper.initialize_count_status(xtuner_model, 0, total)
    schedulers = [
        PARAM_SCHEDULERS.build(
            dict(s), default_args=dict(optimizer=wrapper, epoch_length=iters_per_epoch)
        )
        for s in cfg.param_scheduler
    ]
    xtuner_model.train()
    run.model.train()
    for iteration in range(8):
        chosen = list(range(4 * iteration, 4 * iteration + 4))
        loss = xtuner_model(default_collate_fn([dataset[i] for i in chosen])["data"], mode="loss")
        wrapper.update_params(loss["loss"])
        for scheduler in schedulers:
            scheduler.step()
        run.step(run.batch([samples[i] for i in chosen]), iteration, total, iters_per_epoch)
    return xtuner_model.state_dict(), hf_engine.trained_state(run.model, run.recipe)


@pytest.mark.slow
def test_n_steps_give_the_same_adapters_as_xtuner(eight_iterations):
    theirs, ours = eight_iterations
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    moved = max(ours[k].abs().max().item() for k in ours if "lora_B" in k)  # B starts at zero
    print(f"after 8 iterations: largest difference {worst:.3g}, largest change {moved:.3g}")
    assert moved > 1e-3  # training moved the adapters, so the equality below means something
    # Measured 1e-7 (float32 rounding: the hf engine's closed-form rates vs mmengine's chained
    # ones); a wrong rate, accumulation or clip moves it to ~1e-2 (an Adam step is ~lr = 2e-3).
    assert worst <= 1e-6


@pytest.mark.slow
def test_checkpoints_of_both_engines_score_the_same(engines, eight_iterations, tiny_env, tmp_path):
    """The 8-iteration checkpoints of both engines, each written as its engine writes it, through
    the held-out scorer (`score_run`, what `ablate --eval heldout` and `eval-compositional` run):
    the same answer on every item, the same accuracy, log-likelihoods equal to float32 rounding.
    A checkpoint whose adapters differ by a little noise scores differently, so the equality is
    not that of a scorer blind to the adapters."""
    from llava_moslora.eval.heldout import score_run

    xtuner_model, _, _, run = engines
    _, ours = eight_iterations
    xtuner_checkpoint = save_mmengine_checkpoint(xtuner_model, tmp_path / "iter_8.pth")
    run.work_dir = tmp_path / "hf"
    hf_checkpoint = run.save(8)  # the hf engine's own checkpoint: its keys, resume state and meta
    items = tiny_env / "data" / "heldout_eval.json"  # make-tiny's 144 colour/shape/count items
    xtuner_scores = score_run(TINY_MOSLORA, xtuner_checkpoint, items)
    hf_scores = score_run(TINY_MOSLORA, hf_checkpoint, items)

    # A third checkpoint: the hf one with noise on B (zero at init, so this is a trained change).
    generator = torch.Generator().manual_seed(0)
    noisy = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if "lora_B" in k else v
        for k, v in ours.items()
    }
    torch.save({"state_dict": noisy, "meta": {"seed": 0}}, tmp_path / "iter_9.pth")
    noisy_scores = score_run(TINY_MOSLORA, tmp_path / "iter_9.pth", items)

    def largest_difference(a, b) -> float:
        return max(
            abs(x - y)
            for row_a, row_b in zip(a.log_likelihoods, b.log_likelihoods, strict=True)
            for x, y in zip(row_a, row_b, strict=True)
        )

    engines_apart = largest_difference(xtuner_scores, hf_scores)
    noise_apart = largest_difference(hf_scores, noisy_scores)
    changed = sum(a != b for a, b in zip(hf_scores.answers, noisy_scores.answers, strict=True))
    print(
        f"{len(hf_scores.items)} items: accuracy {hf_scores.accuracy()['overall']:.4f} (XTuner "
        f"{xtuner_scores.accuracy()['overall']:.4f}); log-likelihoods differ by {engines_apart:.3g}"
        f" between the engines, {noise_apart:.3g} with noise ({changed} answers changed)"
    )
    assert len(set(hf_scores.answers)) > 1  # not one answer whatever the item
    assert noise_apart > 0.1 and changed > 0  # the scorer sees the adapters
    assert hf_scores.answers == xtuner_scores.answers
    assert hf_scores.accuracy() == xtuner_scores.accuracy()
    # Measured 2.9e-6 (the adapters' 1e-7 float32 rounding above), the noise moved them by 1.9.
    assert engines_apart <= 1e-4


def test_resume_is_bit_identical(tiny_env, tmp_path):
    recipe = dataclasses.replace(recipe_from_config(read_config("tiny_moslora")), save_steps=2)
    assert hf_engine.train(recipe, tmp_path / "straight", max_iters=4) == 0
    assert hf_engine.train(recipe, tmp_path / "killed", max_iters=2) == 0
    assert hf_engine.train(recipe, tmp_path / "killed", max_iters=4, resume=True) == 0
    straight = torch.load(tmp_path / "straight" / "iter_4.pth", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "iter_4.pth", weights_only=True)
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][key]), key


def test_bad_data_stops_before_training_with_one_line(tiny_env, tmp_path, capsys):
    import json

    recipe = recipe_from_config(read_config("tiny_moslora"))
    records = json.loads(Path(recipe.data_path).read_text())
    records[3]["image"] = "missing.png"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    bad = dataclasses.replace(recipe, data_path=str(data))
    assert hf_engine.train(bad, tmp_path / "work") == hf_engine.USAGE_ERROR
    err = capsys.readouterr().err
    assert "error: training refused:" in err and "missing.png" in err and "Traceback" not in err
    assert not (tmp_path / "work" / "last_checkpoint").exists()


def test_text_holding_the_image_token_is_refused(tiny_env, tmp_path, capsys):
    """The pad token stands the image patches in: a sample whose text holds it would shift the
    image features, so the run stops naming the sample."""
    import json

    recipe = recipe_from_config(read_config("tiny_moslora"))
    records = json.loads(Path(recipe.data_path).read_text())
    records[5]["conversations"][1]["value"] += " <|finetune_right_pad_id|>"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    bad = dataclasses.replace(recipe, data_path=str(data))
    assert hf_engine.train(bad, tmp_path / "work") == hf_engine.USAGE_ERROR
    err = capsys.readouterr().err
    assert f"sample {records[5]['id']!r} contains '<|finetune_right_pad_id|>'" in err


@pytest.mark.slow
def test_cli_run_exports_to_every_format(tiny_env, tmp_path):
    """`llava-moslora train --engine hf` on a config, then its checkpoint through every export."""
    from llava_moslora.export.exporter import export
    from llava_moslora.export.manifest import FORMATS

    root = Path(__file__).parents[1]
    work = tmp_path / "work"
    command = [sys.executable, "-m", "llava_moslora.cli", "train", "--engine", "hf"]
    command += ["configs/tiny_moslora.py", "--work-dir", str(work), "--max-iters", "3"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = Path((work / "last_checkpoint").read_text())
    assert checkpoint.name == "iter_3.pth"
    for fmt in FORMATS:
        manifest = export(
            checkpoint, root / "configs/tiny_moslora.py", fmt, tmp_path / fmt, dtype="float32"
        )
        assert manifest.format == fmt


# --- starting from a llava-hf checkpoint (`llava_hf_path`) -------------------------------------


@dataclasses.dataclass
class LlavaHfRun:
    folder: Path  # the tiny base exported with `--to hf-llava`
    run: hf_engine.Run  # a run started from it, its trained tensors perturbed
    checkpoint: Path  # the run's checkpoint, as the engine writes it (meta: folder and digest)


def _perturb_trained(model, seed: int = 1) -> None:
    """What training would have moved, by more than one iteration does: B (zero at init), the
    mixers, the projector. An export that lost the adapters would then not match."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (
                "lora_B" in name or "lora_mixer" in name or "projector" in name
            ):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def llava_hf_run(tiny_env, tmp_path_factory) -> LlavaHfRun:
    """The tiny base (the hf engine's iteration-0 checkpoint: B = 0, the pretrained projector)
    exported `--to hf-llava`, a one-iteration run started from that folder, then its trained
    tensors perturbed and saved by the engine: the one run every test of this section reads."""
    from llava_moslora.export.exporter import export

    work = tmp_path_factory.mktemp("llava_hf_run")
    recipe = recipe_from_config(read_config("tiny_moslora", NO_DROPOUT))
    base = hf_engine.Run(recipe, work / "base").save(0)
    export(base, TINY_MOSLORA, "hf-llava", work / "hf_llava", dtype="float32")
    started = dataclasses.replace(recipe, llava_hf_path=str(work / "hf_llava"))
    run = hf_engine.Run(started, work / "run")
    run.train(run.samples(), max_iters=1)
    _perturb_trained(run.model)
    run.model.eval()
    return LlavaHfRun(work / "hf_llava", run, run.save(run.iteration))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()


@pytest.mark.slow
def test_a_llava_hf_run_exports_merged_with_the_training_models_logits(llava_hf_run, tmp_path):
    """hf-llava in stock transformers gives the training model's logits; merged-xtuner's towers
    are the same merged weights; the adapter formats are refused in one line, exit 2."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CLIPVisionModel, LlavaForConditionalGeneration

    from llava_moslora.cli import main
    from llava_moslora.export.exporter import export

    run, checkpoint = llava_hf_run.run, llava_hf_run.checkpoint
    batch = run.batch([run.samples()[i] for i in BATCH])
    expected = _logits(run.model, batch)
    base = LlavaForConditionalGeneration.from_pretrained(llava_hf_run.folder).eval()
    assert (expected - _logits(base, batch)).abs().max() > 0.5  # the adapters change the output

    export(checkpoint, TINY_MOSLORA, "hf-llava", tmp_path / "hf", dtype="float32")
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.image_token_index == run.image_token_id  # the base's own `<image>`
    worst = (expected - _logits(exported, batch)).abs().max().item()
    print(
        f"hf-llava export vs the training model: largest logit difference {worst:.3g}, "
        f"largest logit {expected.abs().max().item():.3g}"
    )
    # float32, merged (W0 + ΔW) x vs W0 x + ΔW x: summation order only. Measured 1.4e-5 (the
    # three-part runs' exports in tests/test_export.py: 5.8e-6, on smaller perturbations).
    assert worst <= FP32_ATOL

    export(checkpoint, TINY_MOSLORA, "merged-xtuner", tmp_path / "merged", dtype="float32")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "llm")
    vision = CLIPVisionModel.from_pretrained(tmp_path / "merged" / "visual_encoder")
    for ours, theirs in (
        (llm.model, exported.model.language_model),
        (llm.lm_head, exported.lm_head),
        (vision, exported.model.vision_tower),
    ):
        theirs_state = theirs.state_dict()
        for key, tensor in ours.state_dict().items():
            assert torch.equal(tensor, theirs_state[key]), key
    projector = load_file(tmp_path / "merged" / "projector" / "model.safetensors")
    trained = run.model.model.multi_modal_projector.linear_2.weight
    assert torch.equal(projector["model.2.weight"], trained)

    for fmt in ("xtuner", "peft-folded"):
        out = tmp_path / fmt
        code = main(["export", str(checkpoint), str(out), "--config", TINY_MOSLORA, "--to", fmt])
        assert code == 2 and not out.exists()


def test_an_adapter_format_of_a_llava_hf_run_is_refused_in_one_line(llava_hf_run, tmp_path, capsys):
    from llava_moslora.cli import main

    checkpoint = llava_hf_run.checkpoint
    out = tmp_path / "out"
    code = main(["export", str(checkpoint), str(out), "--config", TINY_MOSLORA, "--to", "xtuner"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and not out.exists()
    assert lines == [
        f"error: `--to xtuner`: the run of {checkpoint} started from the llava-hf checkpoint "
        f"{llava_hf_run.folder}, and a xtuner export holds only adapters for a base read from "
        "separate LLM and CLIP folders, which that base has not; export it `--to hf-llava` (or "
        "`--to merged-xtuner`)"
    ]


def _export_log_likelihoods(folder: Path, items, prompt_template: dict) -> list[list[float]]:
    """Each option's log-likelihood through an hf-llava folder read by stock transformers: the
    XTuner tokens with its one image index expanded to the model's image tokens, the image padded
    to a square by the export's own LlavaImageProcessor, HF's splicing, merged weights."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
    from xtuner.dataset.utils import encode_fn

    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    image_token, patches = model.config.image_token_index, model.config.image_seq_length
    template_fn = template_map_fn_factory(prompt_template)
    scores = []
    for item in items:
        with Image.open(item.image) as image:
            pixels = processor.image_processor(image.convert("RGB"), return_tensors="pt")
        row = []
        for option in item.options:
            turns = [
                {"from": "human", "value": f"<image>\n{item.question}"},
                {"from": "gpt", "value": option},
            ]
            example = template_fn(llava_map_fn({"conversations": turns}))
            encoded = encode_fn(
                example, processor.tokenizer, max_length=10**6, with_image_token=True
            )
            ids, labels = [], []
            for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
                image = token == IMAGE_TOKEN_INDEX
                ids += [image_token] * patches if image else [token]
                labels += [-100] * patches if image else [label]
            with torch.no_grad():
                logits = model(
                    input_ids=torch.tensor([ids]), pixel_values=pixels["pixel_values"]
                ).logits.float()
            log_probs = logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(labels[1:])
            mask = targets != -100
            picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            row.append(float((picked * mask).sum()))
        scores.append(row)
    return scores


@pytest.mark.slow
def test_a_llava_hf_run_scores_the_same_as_its_export(llava_hf_run, tiny_env, tmp_path):
    """The held-out scorer (`score_run`: XTuner's LLaVAModel on the folder's towers, the adapters
    unmerged) and the hf-llava export read by stock transformers give the same log-likelihoods
    on the same items; the base folder itself gives other ones, so the scorer sees the adapters."""
    from llava_moslora.data.items import read_eval_items
    from llava_moslora.eval.heldout import score_run
    from llava_moslora.export.exporter import export

    source = tiny_env / "data" / "heldout_eval.json"
    items = [
        dataclasses.replace(item, image=str(source.parent / item.image))
        for item in read_eval_items(source)[:24]
    ]
    subset = tmp_path / "items.json"
    subset.write_text(json.dumps([dataclasses.asdict(item) for item in items]))
    scores = score_run(TINY_MOSLORA, llava_hf_run.checkpoint, subset)
    export(llava_hf_run.checkpoint, TINY_MOSLORA, "hf-llava", tmp_path / "hf", dtype="float32")
    template = read_config("tiny_moslora").prompt_template
    through_export = _export_log_likelihoods(tmp_path / "hf", items, template)
    of_the_base = _export_log_likelihoods(llava_hf_run.folder, items, template)

    def largest_difference(a, b) -> float:
        return max(
            abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)
        )

    apart = largest_difference(scores.log_likelihoods, through_export)
    base_apart = largest_difference(through_export, of_the_base)
    print(f"score_run vs the export: {apart:.3g}; the export vs its base: {base_apart:.3g}")
    assert base_apart > 0.1  # the scorer sees the adapters
    # Measured 4.8e-6: unmerged adapters vs merged weights, float32 summation order.
    assert apart <= 1e-4
    picked = [
        item.options[row.index(max(row))] for item, row in zip(items, through_export, strict=True)
    ]
    assert scores.answers == picked and len(set(picked)) > 1
    # Before training (no checkpoint), `llava_hf_path` scores the folder itself.
    before = score_run(TINY_MOSLORA, None, subset, {"llava_hf_path": str(llava_hf_run.folder)})
    before_apart = largest_difference(before.log_likelihoods, of_the_base)
    print(f"score_run without a checkpoint vs the base folder: {before_apart:.3g}")
    assert before_apart <= 1e-4


def _parts_of(llava_dir: Path, out: Path) -> tuple[Path, Path]:
    """The LLM and CLIP folders a llava-hf checkpoint is made of, its weights unchanged: the
    three-part build of the same model (vocabulary with `<image>` included)."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
    )

    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, use_safetensors=True)
    llm = LlamaForCausalLM(llava.config.text_config)
    llm.model.load_state_dict(llava.model.language_model.state_dict())
    llm.lm_head.load_state_dict(llava.lm_head.state_dict())
    llm.save_pretrained(out / "llm")
    AutoTokenizer.from_pretrained(llava_dir).save_pretrained(out / "llm")
    llava.model.vision_tower.save_pretrained(out / "clip")
    CLIPImageProcessor.from_pretrained(llava_dir).save_pretrained(out / "clip")
    return out / "llm", out / "clip"


@pytest.mark.slow
def test_a_run_starts_from_a_llava_hf_export_with_the_same_first_loss(
    tiny_env, llava_hf_run, tmp_path
):
    """The tiny base (the hf engine's own iteration-0 checkpoint: B = 0, the pretrained projector)
    exported with `--to hf-llava`, then a run started from that folder: its first loss is the
    three-part build's of the same weights, and its checkpoint has the same trained tensors."""

    recipe = recipe_from_config(read_config("tiny_moslora", NO_DROPOUT))
    folder = llava_hf_run.folder
    options = {**NO_DROPOUT, "llava_hf_path": str(folder)}  # as --cfg-options
    from_llava_hf = recipe_from_config(read_config("tiny_moslora", options))
    assert from_llava_hf.llava_hf_path == str(folder)
    llm, clip = _parts_of(folder, tmp_path / "parts")
    from_parts = dataclasses.replace(recipe, llm=str(llm), vision=str(clip))

    runs = {
        name: hf_engine.Run(r, tmp_path / name)
        for name, r in (("llava_hf", from_llava_hf), ("parts", from_parts), ("tiny", recipe))
    }
    # The export's own `<image>` token stands the patches (the parts use the pad token).
    assert runs["llava_hf"].image_token_id != runs["parts"].image_token_id
    first = {name: run.train(run.samples(), max_iters=1)[0] for name, run in runs.items()}
    print(f"first losses: {first}")
    # Measured equal to the last bit (6.892776012420654): same weights, same embedding sequence.
    assert first["llava_hf"] == pytest.approx(first["parts"], abs=1e-6)
    # The export added `<image>` to the vocabulary (one more logit in the softmax): the loss of
    # the original parts differs (measured 8.5e-4), so the tolerance above resolves a change.
    assert abs(first["llava_hf"] - first["tiny"]) > 1e-4
    saved = {
        name: torch.load(tmp_path / name / "iter_1.pth", weights_only=True)["state_dict"]
        for name in ("llava_hf", "parts")
    }
    assert saved["llava_hf"].keys() == saved["parts"].keys()  # the same trained tensors
    # Resuming it with a recipe that lost its `llava_hf_path` is refused.
    from llava_moslora.train.hf_recipe import RecipeError

    with pytest.raises(RecipeError, match="resume with the run's own setting"):
        runs["parts"].resume(tmp_path / "llava_hf" / "iter_1.pth")


def _llava_folder_without_safetensors(tiny_env, tmp_path) -> Path:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    return folder


def _corrupt_weights(tiny_env, tmp_path) -> Path:
    """A llava-hf config of the tiny towers, and a model.safetensors that is not one."""
    from transformers import AutoConfig, LlavaConfig

    folder = tmp_path / "corrupt"
    folder.mkdir()
    LlavaConfig(
        text_config=AutoConfig.from_pretrained(tiny_env / "llm").to_dict(),
        vision_config=AutoConfig.from_pretrained(tiny_env / "clip").to_dict(),
        vision_feature_layer=-2,
    ).to_json_file(folder / "config.json")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    return folder


def _other_layer(tiny_env, tmp_path) -> Path:
    folder = tmp_path / "layer"
    folder.mkdir()
    config = {"model_type": "llava", "vision_feature_layer": -1}
    (folder / "config.json").write_text(
        json.dumps(config | {"vision_feature_select_strategy": "default"})
    )
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("make_folder", "problem"),
    [
        pytest.param(lambda env, tmp: tmp / "nowhere", "no readable config.json", id="missing"),
        pytest.param(
            lambda env, tmp: env / "llm", "model_type 'llama', not 'llava'", id="an-llm-folder"
        ),
        pytest.param(
            _llava_folder_without_safetensors, "holds no \\*.safetensors", id="pickle-only"
        ),
        pytest.param(_other_layer, "from layer -1 with strategy 'default'", id="other-layer"),
        pytest.param(_corrupt_weights, "does not load", id="corrupt-safetensors"),
    ],
)
def test_a_bad_llava_hf_path_is_refused_in_one_line(
    tiny_env, tmp_path, capsys, make_folder, problem
):
    import re

    folder = make_folder(tiny_env, tmp_path)
    recipe = dataclasses.replace(
        recipe_from_config(read_config("tiny_moslora")), llava_hf_path=str(folder)
    )
    assert hf_engine.train(recipe, tmp_path / "work") == hf_engine.USAGE_ERROR
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: training refused: `llava_hf_path` {folder}: ")
    assert re.search(problem, lines[0]) and "--to hf-llava" in lines[0]
    assert not (tmp_path / "work").exists()


def test_a_projector_saved_by_mmengine_loads_with_its_message_hub(tmp_path):
    """XTuner's pretrained projector is an mmengine iter_N.pth: beside the tensors, the message
    hub's HistoryBuffers and numpy scalars. The hf engine reads it through the safe loader with
    exactly those globals allowed (the import of the allow-list once pointed at the wrong module,
    and the file was then refused)."""
    import numpy as np
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("test_hf_engine_projector")
    hub.update_scalar("train/loss", np.float32(1.5), count=1)
    weight = torch.randn(8, 4)
    path = tmp_path / "iter_2181.pth"
    torch.save(
        {
            "meta": {"seed": 0, "epoch": np.int64(1)},
            "state_dict": {"projector.model.0.weight": weight, "llm.x": torch.zeros(1)},
            "message_hub": hub.state_dict(),
        },
        path,
    )
    projector = hf_engine.load_projector(path)
    assert list(projector) == ["projector.model.0.weight"]
    assert torch.equal(projector["projector.model.0.weight"], weight)


# --- hostile bases: the checkpoint's run started from a folder that is gone or not the same ----


def _naming(checkpoint: Path, folder: Path, out: Path, drop: str | None = None) -> Path:
    """A copy of `checkpoint` whose meta names `folder` (its digest kept), less keys with `drop`."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["meta"]["llava_hf_path"] = str(folder)
    if drop:
        saved["state_dict"] = {k: v for k, v in saved["state_dict"].items() if drop not in k}
    torch.save(saved, out)
    return out


def _copy_of_base(llava_hf_run, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(llava_hf_run.folder, tmp_path / "copy"))


def _gone(folder: Path) -> str:
    import shutil

    shutil.rmtree(folder)
    return "is not readable"


def _new_weights(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if "layers.0.self_attn.q_proj" in k)
    tensors[name] = tensors[name] + 1e-3  # retrained: same names and shapes, other values
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return "are not those the run"


def _new_config(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    return "are not those the run"


def _pickle_only(folder: Path) -> str:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return "holds no \\*.safetensors weights"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_gone, id="gone"),
        pytest.param(_new_weights, id="new-weights"),
        pytest.param(_new_config, id="new-config"),
        pytest.param(_pickle_only, id="pickle-only"),
    ],
)
def test_a_base_gone_or_changed_since_training_is_refused_naming_it(
    llava_hf_run, tmp_path, capsys, change
):
    """Export and eval-compositional stop in one line naming the folder and the fix, write
    nothing, and never pair the adapters with another base."""
    from llava_moslora.cli import main

    folder = _copy_of_base(llava_hf_run, tmp_path)
    checkpoint = _naming(llava_hf_run.checkpoint, folder, tmp_path / "iter_1.pth")
    problem = change(folder)
    out = tmp_path / "out"
    for command in (
        ["export", str(checkpoint), str(out), "--config", TINY_MOSLORA, "--to", "hf-llava"],
        ["eval-compositional", TINY_MOSLORA, "--checkpoint", str(checkpoint)],
    ):
        assert main(command) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: `llava_hf_path` {folder}: ")
        assert re.search(problem, lines[0]) and "--cfg-options llava_hf_path=DIR" in lines[0]
    assert not out.exists()


def test_an_unchanged_copy_of_the_base_loads_strictly_and_a_dropped_mixer_is_refused(
    llava_hf_run, tmp_path
):
    """`--cfg-options llava_hf_path=COPY` reads a moved base; a checkpoint without its mixers
    is refused naming them (the base would load, the mixers would stay at init)."""
    from llava_moslora.runs import CheckpointMismatchError, load_run

    folder = _copy_of_base(llava_hf_run, tmp_path)
    options = {"llava_hf_path": str(folder)}
    _, model = load_run(TINY_MOSLORA, llava_hf_run.checkpoint, options)
    saved = torch.load(llava_hf_run.checkpoint, weights_only=True)["state_dict"]
    mixers = [k for k in saved if "lora_mixer" in k]
    assert mixers and all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    assert model.llm.base_model.model.model is not None  # the folder's LLM, adapters on

    no_mixers = _naming(llava_hf_run.checkpoint, folder, tmp_path / "iter_9.pth", "lora_mixer")
    with pytest.raises(CheckpointMismatchError, match=f"{len(mixers)} key\\(s\\) missing from"):
        load_run(TINY_MOSLORA, no_mixers)


def test_an_export_over_the_base_it_reads_is_refused(llava_hf_run, tmp_path):
    """The base is an hf-llava export itself, so `--overwrite` would replace its files: it is one
    of the export's inputs, as the checkpoint and the config are."""
    from llava_moslora.export.exporter import export

    folder = _copy_of_base(llava_hf_run, tmp_path)
    checkpoint = _naming(llava_hf_run.checkpoint, folder, tmp_path / "iter_1.pth")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="contains the export's own input"):
        export(checkpoint, TINY_MOSLORA, "hf-llava", folder, dtype="float32", overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
