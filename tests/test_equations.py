"""MoSLoRA against the paper's equations, on tiny models built here."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llava_moslora.moslora import moslora_config
from tests.factories import copy_lora_weights, make_mlp, moslora_layers

TARGETS = ["lin0", "lin1"]


def single_linear(seed: int = 0, d_in: int = 16, d_out: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def lora_pair(base, *, r=4, alpha=8, targets=TARGETS, **mixer):
    """(stock LoRA, MoSLoRA) over copies of `base` with the same random A and B (B not zero)."""
    lora = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
    )
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(
            r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **mixer
        ),
    )
    copy_lora_weights(lora, mos)
    return lora, mos


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_identity_mixer_equals_stock_lora_outputs_and_gradients():
    base = make_mlp()
    lora, mos = lora_pair(base, mixer_init="identity", mixer_trainable=False)
    x = torch.randn(5, 16)
    out_lora, out_mos = lora(x), mos(x)
    # The adapter really changes the output, so the equality below means something.
    assert (out_lora - base(x)).abs().max() > 1e-2
    torch.testing.assert_close(out_mos, out_lora)

    out_lora.square().sum().backward()
    out_mos.square().sum().backward()
    g_lora, g_mos = grads(lora), grads(mos)
    assert set(g_mos) == set(g_lora)  # a frozen mixer is a buffer: no gradient, no optimizer state
    for name in g_lora:
        torch.testing.assert_close(g_mos[name], g_lora[name])


def test_butterfly_mixer_equals_two_subspace_mixing_form():
    base = single_linear()
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(
            r=4,
            lora_alpha=8,
            target_modules=["0"],
            init_lora_weights=False,
            mixer_init="butterfly",
            mixer_trainable=False,
        ),
    )
    layer = moslora_layers(mos)[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    x = torch.randn(7, 16)
    # Paper Eq. 3, x (A1 + A2)(B1 + B2), with A split by rank rows and B by rank columns.
    expected = base(x) + 2.0 * x @ (a[:2] + a[2:]).T @ (b[:, :2] + b[:, 2:]).T
    torch.testing.assert_close(mos(x), expected)
    assert (expected - base(x)).abs().max() > 1e-2


# out_features = 12: 3 tokens take the chain, 40 the fold. "zero3" marks the weights the way
# DeepSpeed ZeRO-3 does, which makes the fold call the modules instead of reading their weights.
@pytest.mark.parametrize("tokens,zero3", [(3, False), (40, False), (40, True)])
def test_compute_order_equals_naive_chain(tokens, zero3):
    base = single_linear()
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False),
    )
    layer = moslora_layers(mos)[0]
    if zero3:
        layer.lora_B["default"].weight.ds_id = 0
    calls = []  # ZeRO-3 gathers a module's weights in its forward hooks: count those forwards
    layer.lora_B["default"].register_forward_hook(lambda *_: calls.append("B"))
    x = torch.randn(tokens, 16)
    out = mos(x)
    folded_directly = tokens > 12 and not zero3
    assert calls == ([] if folded_directly else ["B"])
    out.square().sum().backward()
    fast = grads(mos)
    mos.zero_grad()

    a, b, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_mixer["default"]
    naive = base(x) + b(m(a(x))) * layer.scaling["default"]  # the official repo's B(M(A(x)))
    torch.testing.assert_close(out, naive)
    naive.square().sum().backward()
    for name, grad in grads(mos).items():
        torch.testing.assert_close(fast[name], grad)


def test_zero_mixer_and_zero_b_give_zero_gradients_everywhere():
    """Paper App. C: why `mixer_init='zero'` is refused."""
    base = make_mlp()
    mos = get_peft_model(
        copy.deepcopy(base), moslora_config(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    for layer in moslora_layers(mos):  # B is zero from PEFT's init; zero the mixer by hand
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        with torch.no_grad():
            layer.lora_mixer["default"].weight.zero_()
    mos(torch.randn(5, 16)).square().sum().backward()
    g = grads(mos)
    assert any("lora_mixer" in n for n in g) and any("lora_A" in n for n in g)
    assert all(torch.count_nonzero(v) == 0 for v in g.values())

    # With the default (Kaiming) mixer the same model does learn: B gets a gradient at step 1.
    mos = get_peft_model(
        copy.deepcopy(base), moslora_config(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    mos(torch.randn(5, 16)).square().sum().backward()
    assert any(torch.count_nonzero(v) > 0 for n, v in grads(mos).items() if "lora_B" in n)


def delta_weights(model, adapter="default") -> list[torch.Tensor]:
    return [
        layer.get_delta_weight(adapter)
        for layer in model.base_model.model.modules()
        if hasattr(layer, "lora_A") and adapter in layer.lora_A
    ]


def sgd_step(model, x, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(x).square().sum().backward()
    opt.step()
    opt.zero_grad()


def lora_with_folded_a(base, mos):
    """Stock LoRA with A' = M A and the same B as `mos` (paper App. E.2)."""
    lora = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
    )
    copy_lora_weights(mos, lora)
    lora_layers = [m for m in lora.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    for lora_layer, mos_layer in zip(lora_layers, moslora_layers(mos), strict=True):
        with torch.no_grad():
            lora_layer.lora_A["default"].weight.copy_(
                mos_layer.lora_mixer["default"].weight @ mos_layer.lora_A["default"].weight
            )
    return lora


@pytest.mark.parametrize("learnable", [False, True])
def test_fixed_orthogonal_mixer_trains_like_lora_with_folded_a(learnable):
    """App. E.4: a fixed orthogonal M trains exactly like LoRA from A' = M A; E.3: a learned one not."""
    base = make_mlp().double()
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(
            r=4,
            lora_alpha=8,
            target_modules=TARGETS,
            init_lora_weights=False,
            mixer_init="orthogonal",
            mixer_trainable=learnable,
        ),
    )
    lora = lora_with_folded_a(base, mos)
    x = torch.randn(6, 16, dtype=torch.float64)
    start = delta_weights(lora)
    for before_l, before_m in zip(start, delta_weights(mos), strict=True):
        torch.testing.assert_close(before_m, before_l)  # the same model at step 0 either way
    sgd_step(mos, x)
    sgd_step(lora, x)
    moved = max((d - s).abs().max().item() for d, s in zip(delta_weights(lora), start, strict=True))
    assert moved > 1e-2  # the step really changed ΔW, so the comparison below means something
    diffs = [
        (mo - lo).abs().max().item()
        for mo, lo in zip(delta_weights(mos), delta_weights(lora), strict=True)
    ]
    if learnable:
        assert max(diffs) > 1e-4, diffs  # E.3: the updates differ
    else:
        assert max(diffs) < 1e-10, diffs  # E.4: identical to float64 rounding


def test_learnable_mixer_gets_gradients_and_changes():
    base = make_mlp()
    mos = get_peft_model(
        copy.deepcopy(base), moslora_config(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    before = [layer.lora_mixer["default"].weight.detach().clone() for layer in moslora_layers(mos)]
    assert all(p.requires_grad for n, p in mos.named_parameters() if "lora_mixer" in n)
    x = torch.randn(5, 16)
    sgd_step(mos, x, lr=0.1)  # step 1: B is zero, so only B moves (App. C's gradients)
    sgd_step(mos, x, lr=0.1)  # step 2: B != 0, the mixer gets a gradient and moves
    after = [layer.lora_mixer["default"].weight for layer in moslora_layers(mos)]
    assert all((a - b).abs().max() > 1e-6 for a, b in zip(after, before, strict=True))


def test_frozen_mixer_stays_frozen_through_set_adapter():
    base = make_mlp()
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(
            r=4, lora_alpha=8, target_modules=TARGETS, mixer_init="butterfly", mixer_trainable=False
        ),
    )
    mos.set_adapter("default")
    names = [n for n, p in mos.named_parameters() if p.requires_grad]
    assert names and not any("lora_mixer" in n for n in names)
    assert any("lora_mixer" in k for k in mos.state_dict())  # still saved with the adapter


def test_init_only_folds_the_random_mixer_into_a():
    base = make_mlp()
    torch.manual_seed(1)
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
    )
    torch.manual_seed(1)
    ctl = get_peft_model(
        copy.deepcopy(base),
        moslora_config(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, init_only=True
        ),
    )
    for m_layer, c_layer in zip(moslora_layers(mos), moslora_layers(ctl), strict=True):
        eye = torch.eye(4)
        torch.testing.assert_close(c_layer.lora_mixer["default"].weight, eye)
        assert not c_layer.lora_mixer["default"].learnable
        assert not torch.allclose(m_layer.lora_mixer["default"].weight, eye)
        # Same random draws, so the control's A is exactly M A of the MoSLoRA model.
        torch.testing.assert_close(
            c_layer.lora_A["default"].weight,
            m_layer.lora_mixer["default"].weight @ m_layer.lora_A["default"].weight,
        )
    x = torch.randn(3, 16)
    torch.testing.assert_close(ctl(x), mos(x))


def _is_kaiming(m: torch.Tensor) -> bool:
    return bool(m.abs().max() <= 1 / 8**0.5 and m.std() > 0.1)


def _is_orthogonal(m: torch.Tensor) -> bool:
    return torch.allclose(m @ m.T, torch.eye(8), atol=1e-5, rtol=0)


def _is_butterfly(m: torch.Tensor) -> bool:
    half = torch.eye(4)
    return (
        torch.equal(m[:4, :4], half) and torch.equal(m[:4, 4:], half) and torch.equal(m[4:], m[:4])
    )


# What each init of MIXER_INITS draws at r=8: a registered init without an entry here fails
# test_every_mixer_init_has_its_check, so no init goes untested.
WHAT_EACH_INIT_DRAWS = {
    "kaiming": _is_kaiming,
    "orthogonal": _is_orthogonal,
    "normal": lambda m: 0.05 < m.std() < 0.25,  # std 1/r = 0.125
    "identity": lambda m: torch.equal(m, torch.eye(8)),
    "butterfly": _is_butterfly,
}


def test_every_mixer_init_has_its_check():
    from llava_moslora.moslora.inits import MIXER_INITS

    assert set(WHAT_EACH_INIT_DRAWS) == set(MIXER_INITS)


@pytest.mark.parametrize("init", list(WHAT_EACH_INIT_DRAWS))
def test_mixer_inits(init, monkeypatch):
    """Each init draws what it says; `random` in its entry is true exactly when two seeds differ;
    and XTuner's LoadWoInit (torch.nn.init made no-ops) changes nothing."""
    from llava_moslora.moslora import MixerOptions, initial_mixer
    from llava_moslora.moslora.inits import MIXER_INITS

    torch.manual_seed(0)
    m = initial_mixer(MixerOptions(init=init), 8)
    assert m.shape == (8, 8) and m.dtype == torch.float32 and torch.isfinite(m).all()
    assert WHAT_EACH_INIT_DRAWS[init](m)
    torch.manual_seed(1)
    other = initial_mixer(MixerOptions(init=init), 8)
    assert (not torch.equal(m, other)) == MIXER_INITS[init].random
    for name in dir(torch.nn.init):
        if name.endswith("_") and not name.startswith("_"):
            monkeypatch.setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
    torch.manual_seed(0)
    assert torch.equal(initial_mixer(MixerOptions(init=init), 8), m)
    assert initial_mixer(MixerOptions(init=init), 8, dtype=torch.float64).dtype == torch.float64


def test_a_mixer_init_entry_needs_its_function_and_its_draw_must_fit():
    from llava_moslora.moslora import MixerOptions, initial_mixer
    from llava_moslora.moslora.inits import MIXER_INITS, MixerInit, mixer_init

    with pytest.raises(TypeError, match="mixer init 'nothing': `draw` should be a function"):
        MixerInit("nothing", None, random=False, even_rank=False, about="")
    with pytest.raises(ValueError, match="mixer init 'kaiming' is registered twice"):
        mixer_init("kaiming", random=True, about="")(lambda weight: weight)
    try:
        mixer_init("too_small", random=False, about="")(lambda weight: weight[:2, :2])
        with pytest.raises(ValueError, match=r"'too_small' returned a \(2, 2\) .* the \(8, 8\)"):
            initial_mixer(MixerOptions(init="too_small"), 8)
    finally:
        del MIXER_INITS["too_small"]
