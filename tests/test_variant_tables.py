"""The mixer-init and adapter-kind tables: every reader follows them, and adding an init is one
entry plus its function (done here once, with a throwaway init, end to end at the adapter level)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from llava_moslora.moslora import MixerOptions, load_adapter, moslora_config, save_adapter
from llava_moslora.moslora.inits import MIXER_INITS, mixer_init
from llava_moslora.moslora.kinds import ADAPTER_KINDS, LORA_CONFIG, MOSLORA_CONFIG, kind_of
from tests.factories import make_mlp, moslora_layers

DOCS = Path(__file__).resolve().parent.parent / "docs"
TARGETS = ["lin0", "lin1"]


@pytest.fixture
def exchange_init():
    """A throwaway init registered for one test: the exchange matrix J (ones on the anti-diagonal)."""

    @mixer_init("exchange", random=False, about="the exchange matrix: reverses the rank order")
    def _exchange(weight: torch.Tensor) -> torch.Tensor:
        r = weight.shape[0]
        return torch.eye(r, device=weight.device, dtype=weight.dtype).flip(0)

    yield "exchange"
    del MIXER_INITS["exchange"]


def test_a_registered_init_works_end_to_end_at_the_adapter_level(exchange_init, tmp_path):
    from llava_moslora.ablate.variants import cfg_options, parse_variants

    base = make_mlp()
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(0)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    torch.manual_seed(0)  # the same A and B draws
    mos = get_peft_model(
        copy.deepcopy(base),
        moslora_config(mixer_init=exchange_init, mixer_trainable=False, **config),
    )
    x = torch.randn(5, 16)
    assert (lora(x) - base(x)).abs().max() > 1e-2  # the adapter changes the output ...
    assert (mos(x) - lora(x)).abs().max() > 1e-3  # ... and the mixer changes it again
    # A frozen J mixer is LoRA with B's columns reversed: B J A.
    for layer in lora.modules():
        if hasattr(layer, "lora_B") and "default" in layer.lora_B:
            layer.lora_B["default"].weight.data = layer.lora_B["default"].weight.data.flip(1)
    torch.testing.assert_close(mos(x), lora(x))
    mixer = moslora_layers(mos)[0].lora_mixer["default"]
    assert torch.equal(mixer.weight, torch.eye(4).flip(0)) and not mixer.learnable

    save_adapter(mos, tmp_path / "adapter")  # the options file names the new init; it reloads
    assert (
        json.loads((tmp_path / "adapter" / "moslora_config.json").read_text())["init"] == "exchange"
    )
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), mos(x))

    # Not random: the init-only control refuses it, naming the random ones.
    with pytest.raises(ValueError, match="'exchange', which is not random. Use one of kaiming, "):
        MixerOptions(init=exchange_init, init_only=True)
    # The ablation names it without being told: moslora_exchange.
    assert parse_variants("lora,moslora_exchange") == ["lora", "moslora_exchange"]
    assert "model.llm_lora.mixer_init=exchange" in cfg_options("moslora_exchange")
    assert MixerOptions(init=exchange_init).learnable  # learned unless frozen, like any init


def test_unknown_inits_are_refused_with_the_list_of_known_ones():
    with pytest.raises(ValueError, match="`mixer_init` should be one of kaiming, orthogonal, "):
        MixerOptions(init="exchange")
    with pytest.raises(ValueError, match=r"`mixer_init` should be one of .* \['kaiming'\]"):
        MixerOptions(init=["kaiming"])  # e.g. a list in a hand-edited moslora_config.json
    from llava_moslora.ablate.variants import parse_variants

    with pytest.raises(ValueError, match=r"moslora_<init> .* \(moslora_exchange unknown\)"):
        parse_variants("moslora_exchange")


def _build(args: dict):
    factory = {MOSLORA_CONFIG: moslora_config, LORA_CONFIG: LoraConfig}[args["type"]]
    rest = {key: value for key, value in args.items() if key != "type"}
    return factory(r=4, lora_alpha=8, target_modules=TARGETS, **rest)


@pytest.mark.parametrize("name", list(ADAPTER_KINDS))
def test_each_adapter_kind_is_recognised_and_labelled_once_everywhere(name):
    """The kind its own arguments build is itself; the summary, the manifest and the report all
    spell it from the table."""
    from llava_moslora.eval.report import _adapter_label
    from llava_moslora.export.exporter import adapter_of
    from llava_moslora.train.summary import adapter_kind

    kind = ADAPTER_KINDS[name]
    config = _build(dict(kind.args))
    assert kind_of(config) is kind
    model = get_peft_model(make_mlp(), config)
    assert adapter_of(model)[0] == name
    assert adapter_kind(model).split(" (")[0].split(",")[0] == kind.label
    assert adapter_kind(model).endswith(f", r={config.r}, alpha={config.lora_alpha}")  # every kind
    assert _adapter_label({"adapter_kind": name}) == kind.label
    assert _adapter_label({"adapter_kind": {"llm": name, "visual_encoder": None}}).startswith(
        f"llm: {kind.label}"
    )


def test_the_ablation_variants_are_the_kinds_with_moslora_named_per_init():
    from llava_moslora.ablate.variants import DEFAULT_VARIANTS, VARIANTS

    assert list(VARIANTS) == [
        "lora", "ts_mixing", "moslora_kaiming", "moslora_orthogonal", "init_only", "dora",
    ]  # fmt: skip
    assert tuple(VARIANTS)[:-1] == DEFAULT_VARIANTS
    kinds = {variant: kind_of(_build(args)).name for variant, args in VARIANTS.items()}
    assert kinds == {
        "lora": "lora", "ts_mixing": "ts_mixing", "moslora_kaiming": "moslora",
        "moslora_orthogonal": "moslora", "init_only": "init_only", "dora": "dora",
    }  # fmt: skip


def _table(page: str, header: str) -> dict[str, str]:
    """{first column: second column} of the Markdown table in docs/`page` whose header starts so."""
    lines = (DOCS / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header}"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        first, second = (cell.strip() for cell in line.split("|")[1:3])
        rows[first.strip("`")] = second
    return rows


def test_the_docs_tables_list_every_init_and_every_kind():
    inits = _table("adapter.md", "`mixer_init`")
    assert inits == {name: "yes" if entry.random else "no" for name, entry in MIXER_INITS.items()}
    kinds = _table("adapter.md", "name")
    assert kinds == {name: kind.label for name, kind in ADAPTER_KINDS.items()}
