"""Mixer diagnostics: the maths on known matrices, the hook on a built tiny LLaVA, the plot."""

from __future__ import annotations

import json
import math
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from llava_moslora.moslora import moslora_config, moslora_delta_weight
from llava_moslora.train.diagnostics import (
    INIT_NAME,
    JSONL_NAME,
    MixerDiagnosticsHook,
    delta_singular_values,
    effective_rank,
    group_stats,
    layer_stats,
    mixer_spectrum,
    module_group,
    plot_diagnostics,
    read_diagnostics,
    relative_distance,
)
from tests.factories import build_llava, make_mlp, moslora_layers, qmoslora

LLM_GROUPS = {f"llm/{t}" for t in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    f"llm/{t}" for t in ("gate_proj", "up_proj", "down_proj")
}
VIT_GROUPS = {f"vit/{t}" for t in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")}


# -- the maths ---------------------------------------------------------------------------------


def test_identity_mixer_has_distance_zero_and_condition_one():
    eye = torch.eye(6)
    assert relative_distance(eye, eye) == 0.0
    assert mixer_spectrum(eye).cond == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    assert mixer_spectrum(q).cond == pytest.approx(1.0, abs=1e-6)  # orthogonal: also 1
    assert relative_distance(2 * eye, eye) == pytest.approx(1.0)
    diagonal = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5]))
    spectrum = mixer_spectrum(diagonal)
    assert (spectrum.sv_max, spectrum.sv_min, spectrum.cond) == pytest.approx((4, 0.5, 8))
    assert math.isinf(mixer_spectrum(torch.diag(torch.tensor([1.0, 0.0]))).cond)


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.ones(5)) == pytest.approx(5)
    assert effective_rank(torch.tensor([3.0, 3.0, 0.0, 0.0])) == pytest.approx(2)
    assert effective_rank(torch.zeros(4)) == 0.0  # ΔW at init (B = 0)
    assert 1 < effective_rank(torch.tensor([1.0, 1e-3, 1e-3])) < 1.05  # one dominant direction


@pytest.mark.parametrize("k", [1, 3, 5])
def test_effective_rank_of_rank_k_delta_with_equal_singular_values_is_k(k):
    generator = torch.Generator().manual_seed(k)
    r, d_in, d_out = 8, 40, 24
    u, _ = torch.linalg.qr(torch.randn(d_out, r, generator=generator))  # orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(d_in, r, generator=generator))
    mixer = torch.diag(torch.tensor([1.0] * k + [0.0] * (r - k)))  # rank k, equal values
    values = delta_singular_values(v.T, u, mixer, scaling=0.5)  # ΔW = 0.5 · U M Vᵀ
    assert effective_rank(values) == pytest.approx(k, abs=1e-6)
    assert values[:k] == pytest.approx([0.5] * k, abs=1e-6)


@pytest.mark.parametrize(("d_out", "d_in", "r"), [(24, 40, 8), (3, 40, 8), (24, 5, 8)])
def test_cheap_singular_values_equal_the_dense_svd(d_out, d_in, r):
    """The r x r core gives ΔW's nonzero singular values, also when out or in is below r."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(r, d_in, generator=generator, dtype=torch.float64)
    b = torch.randn(d_out, r, generator=generator, dtype=torch.float64)
    mixer = torch.randn(r, r, generator=generator, dtype=torch.float64)
    dense = torch.linalg.svdvals(1.5 * b @ mixer @ a)
    cheap = delta_singular_values(a, b, mixer, scaling=1.5)
    k = min(d_out, d_in, r)
    torch.testing.assert_close(cheap[:k], dense[:k], rtol=1e-5, atol=1e-5)
    assert cheap[k:].abs().max() < 1e-8 if len(cheap) > k else True
    torch.testing.assert_close(
        delta_singular_values(a, b, None, 1.5)[:k], torch.linalg.svdvals(1.5 * b @ a)[:k]
    )


def test_layer_stats_match_the_dense_delta_of_a_moslora_layer():
    model = get_peft_model(make_mlp(), moslora_config(r=4, lora_alpha=8, target_modules=["lin0"]))
    (layer,) = moslora_layers(model)
    with torch.no_grad():  # B = 0 at init would make ΔW zero: give it values first
        layer.lora_B["default"].weight.normal_()
    dense = torch.linalg.svdvals(moslora_delta_weight(layer, "default").detach().double())
    stats = layer_stats(layer, "default", initial=layer.lora_mixer["default"].weight.clone())
    assert stats["delta_norm"] == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-5)
    assert stats["delta_erank"] == pytest.approx(effective_rank(dense), rel=1e-5)
    assert stats["distance"] == 0.0 and stats["mixer_cond"] >= 1.0


def test_plain_lora_layers_get_the_effective_rank_of_b_a_only():
    model = get_peft_model(make_mlp(), LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    summary = group_stats(model)
    assert set(summary) == {"model/lin0", "model/lin1"}
    for stats in summary.values():
        assert stats["mixer"] == 0 and stats["layers"] == 1
        assert stats["delta_erank_mean"] == 0.0  # B = 0 at init
        assert not any(key.startswith(("distance", "mixer_")) for key in stats)


def test_module_groups_name_tower_and_target():
    assert module_group("llm.base_model.model.model.layers.1.mlp.down_proj") == "llm/down_proj"
    name = "visual_encoder.base_model.model.vision_model.encoder.layers.0.mlp.fc1"
    assert module_group(name) == "vit/fc1"


def test_zero3_partitioned_weights_are_gathered_before_reading(monkeypatch):
    model = get_peft_model(make_mlp(), moslora_config(r=4, target_modules=["lin0"]))
    (layer,) = moslora_layers(model)
    weights = [
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_mixer["default"].weight,
    ]
    for index, weight in enumerate(weights):
        weight.ds_id = index  # what DeepSpeed ZeRO-3 tags its partitioned parameters with
    gathered = []

    @contextmanager
    def gathered_parameters(params, modifier_rank=None):
        gathered.append((list(params), modifier_rank))
        yield

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setitem(sys.modules, "deepspeed.zero", fake.zero)
    layer_stats(layer, "default")
    ((params, rank),) = gathered
    assert [id(p) for p in params] == [id(w) for w in weights] and rank is None  # read only


def test_layer_stats_on_a_4bit_base(llama_4bit_dir):
    bnb = pytest.importorskip("bitsandbytes")
    model = qmoslora(llama_4bit_dir)
    summary = group_stats(model)
    assert len(summary) == 7 and all(s["mixer"] == 1 for s in summary.values())
    layer = moslora_layers(model)[0]
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)


# -- the hook ----------------------------------------------------------------------------------


class RecordingVisualizer:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, int]] = []

    def add_scalars(self, scalars: dict, step: int = 0, **kwargs) -> None:
        self.calls.append((scalars, step))


def fake_runner(model, work_dir: Path, iteration: int = 0, max_iters: int = 100):
    """What the hook touches of an mmengine Runner, without building one."""
    from mmengine.logging import MessageHub, MMLogger

    name = f"diagnostics-{id(model)}-{iteration}-{work_dir.name}"
    return types.SimpleNamespace(
        model=model,
        iter=iteration,
        max_iters=max_iters,
        work_dir=str(work_dir),
        logger=MMLogger.get_instance(name),
        message_hub=MessageHub.get_instance(name),
        visualizer=RecordingVisualizer(),
    )


@pytest.fixture(scope="module")
def llava():
    return build_llava()


def _train_a_little(model) -> None:
    """Stand-in for optimizer steps: B leaves zero and every learnable mixer moves."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in moslora_layers(model.llm) + moslora_layers(model.visual_encoder):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=generator))
            layer.lora_mixer["default"].weight.add_(0.1)


def test_hook_logs_groups_to_jsonl_visualizer_and_message_hub(tmp_path, llava):
    model = build_llava()  # its own copy: this test changes the weights
    runner = fake_runner(model, tmp_path)
    hook = MixerDiagnosticsHook(interval=10)
    hook.before_train(runner)
    assert (tmp_path / INIT_NAME).is_file()
    rows = read_diagnostics(tmp_path)
    assert {row["group"] for row in rows} == LLM_GROUPS | VIT_GROUPS
    for row in rows:
        assert row["iter"] == 0 and row["mixer"] == 1
        assert row["distance_mean"] == 0.0 and row["delta_erank_max"] == 0.0  # B = 0 at init
        assert row["layers"] == 2 and row["mixer_cond_mean"] >= 1.0

    _train_a_little(model)
    runner.iter = 4
    hook.after_train_iter(runner, batch_idx=4)  # not a multiple of the interval: nothing
    assert len(read_diagnostics(tmp_path)) == len(rows)
    runner.iter = 9
    hook.after_train_iter(runner, batch_idx=9)  # the 10th iteration
    later = [row for row in read_diagnostics(tmp_path) if row["iter"] == 10]
    assert len(later) == len(rows)
    q_proj = next(row for row in later if row["group"] == "llm/q_proj")
    initial = torch.load(tmp_path / INIT_NAME, weights_only=True)["mixers"]
    expected = [
        float(torch.linalg.norm(m.lora_mixer["default"].weight.detach() - initial[name]))
        / float(torch.linalg.norm(initial[name]))
        for name, m in model.named_modules()
        if name.startswith("llm.") and name.endswith("q_proj") and hasattr(m, "lora_mixer")
    ]
    assert len(expected) == 2
    assert q_proj["distance_mean"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert q_proj["distance_max"] == pytest.approx(max(expected), rel=1e-5)
    assert 1 < q_proj["delta_erank_mean"] <= 8  # r = 8: B random now, so ΔW has full rank

    scalars, step = runner.visualizer.calls[-1]
    assert step == 10 and scalars["mixer/llm/q_proj/distance_mean"] == q_proj["distance_mean"]
    info = runner.message_hub.get_info("mixer_diagnostics")
    assert info["iter"] == 10 and set(info["groups"]) == LLM_GROUPS | VIT_GROUPS


def test_resume_measures_from_the_saved_initial_mixers(tmp_path):
    model = build_llava()
    MixerDiagnosticsHook(interval=10).before_train(fake_runner(model, tmp_path))
    _train_a_little(model)

    resumed = fake_runner(model, tmp_path, iteration=30)  # as after mmengine's resume
    hook = MixerDiagnosticsHook(interval=10)
    hook.before_train(resumed)
    assert hook.reference_iter == 0
    resumed.iter = 39
    hook.after_train_iter(resumed, batch_idx=39)
    rows = [row for row in read_diagnostics(tmp_path) if row["iter"] == 40]
    assert rows and all(row["distance_mean"] > 0 for row in rows)  # from M0, not from iter 30


def test_resume_without_the_initial_mixers_says_where_distances_start(tmp_path, caplog):
    model = build_llava()
    runner = fake_runner(model, tmp_path, iteration=30)
    hook = MixerDiagnosticsHook(interval=10)
    hook.before_train(runner)
    assert hook.reference_iter == 30
    runner.iter = 39
    hook.after_train_iter(runner, batch_idx=39)
    rows = read_diagnostics(tmp_path)
    assert all(row["reference_iter"] == 30 and row["distance_mean"] == 0 for row in rows)


def test_interval_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"`interval` should be a positive integer .* is 0\."):
        MixerDiagnosticsHook(interval=0)


# -- the plot ----------------------------------------------------------------------------------


def test_plot_diagnostics_command_writes_a_png(tmp_path):
    from llava_moslora.cli import main

    model = build_llava()
    runner = fake_runner(model, tmp_path)
    hook = MixerDiagnosticsHook(interval=1)
    hook.before_train(runner)
    _train_a_little(model)
    hook.after_train_iter(runner, batch_idx=0)
    out = tmp_path / "plots" / "diag.png"
    assert main(["plot-diagnostics", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_diagnostics(tmp_path) == tmp_path / "mixer_diagnostics.png"


def test_plot_of_a_lora_run_and_of_a_missing_file(tmp_path, capsys):
    from llava_moslora.cli import main

    lora = get_peft_model(make_mlp(), LoraConfig(r=4, target_modules=["lin0"]))
    MixerDiagnosticsHook().before_train(fake_runner(lora, tmp_path))
    assert not (tmp_path / INIT_NAME).exists()  # no mixers: nothing to remember
    assert plot_diagnostics(tmp_path).is_file()  # distance / cond panels say "no mixer"

    with pytest.raises(FileNotFoundError, match=r"`WORK_DIR` .*empty.* has no mixer_diagnostics"):
        read_diagnostics(tmp_path / "empty")
    assert main(["plot-diagnostics", str(tmp_path / "empty")]) == 1
    assert "MixerDiagnosticsHook" in capsys.readouterr().err


def test_jsonl_is_strict_json(tmp_path):
    """A singular mixer's infinite condition number is written as null, not `Infinity`."""
    model = get_peft_model(make_mlp(), moslora_config(r=2, target_modules=["lin0"]))
    (layer,) = moslora_layers(model)
    with torch.no_grad():
        layer.lora_mixer["default"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    MixerDiagnosticsHook().before_train(fake_runner(model, tmp_path))
    (line,) = (tmp_path / JSONL_NAME).read_text().splitlines()
    row = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON {name}"))
    assert row["mixer_cond_max"] is None
