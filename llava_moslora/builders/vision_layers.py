"""Which vision-encoder layers LLaVA reads: only those can learn, so only those get adapters.

LLaVA feeds its projector one hidden state of the vision tower, `hidden_states[visual_select_layer]`
(XTuner's LLaVAModel; LLaVA-1.5 uses -2, the second-to-last). A tower with N encoder layers returns
N + 1 hidden states, the embeddings and then each layer's output:

    hidden_states   [0]          [1]       ...   [N - 1]      [N]
                    embeddings   layer 0   ...   layer N-2    layer N-1
                                                 ^ -2

Layers 0 .. N-2 feed the selected state; layer N-1 runs and its output is thrown away, so an
adapter there never receives a gradient (yet counts as trainable and is carried in optimizer
state). `layers_feeding` gives the layers worth adapting, in the form of PEFT's
`LoraConfig(layers_to_transform=...)`; `layers_above` the ones that are not.
"""

from __future__ import annotations


def selected_index(num_layers: int, select_layer: int) -> int:
    """The index into the N + 1 hidden states that `select_layer` picks (0 = the embeddings)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"`num_layers` should be a positive integer (the encoder's layer count) but the value "
            f"passed is {num_layers!r}."
        )
    states = num_layers + 1  # the embeddings, then one output per layer
    if isinstance(select_layer, bool) or not isinstance(select_layer, int):
        raise ValueError(
            f"`visual_select_layer` should be an integer but the value passed is {select_layer!r}."
        )
    if not -states <= select_layer < states:
        raise ValueError(
            f"`visual_select_layer` should index the {states} hidden states of a "
            f"{num_layers}-layer encoder (from {-states} to {states - 1}) but the value passed is "
            f"{select_layer}."
        )
    return select_layer % states


def layers_feeding(num_layers: int, select_layer: int) -> list[int]:
    """The encoder layers whose output reaches `hidden_states[select_layer]`, in order.

    Pass it as `layers_to_transform` of the vision tower's LoraConfig: with -2 and CLIP ViT-L's
    24 layers, layers 0-22.
    """
    index = selected_index(num_layers, select_layer)
    if index == 0:
        # PEFT reads an empty `layers_to_transform` as "every layer": refuse rather than adapt all.
        raise ValueError(
            f"`visual_select_layer` {select_layer} reads the embeddings of a {num_layers}-layer "
            "encoder, which no encoder layer feeds: there is no layer worth adapting. Leave the "
            "vision tower without adapters (`visual_encoder_lora=None`)."
        )
    return list(range(index))


def layers_above(num_layers: int, select_layer: int) -> list[int]:
    """The encoder layers computed after `hidden_states[select_layer]`: never given a gradient."""
    return list(range(selected_index(num_layers, select_layer), num_layers))


def rederived_layers(cfg, options: dict) -> dict:
    """The `--cfg-options` to add to `options` so the ViT's adapted layers follow a changed
    `visual_select_layer` (an empty dict when nothing is stale).

    The configs derive `model.visual_encoder_lora.layers_to_transform` from
    `visual_select_layer` once, when they are parsed; an override of the select layer alone
    (`model.visual_select_layer=-1`, or the top-level `visual_select_layer=-1`, which the model
    dict never sees) would keep the old layers, so a layer that is read would go unadapted. When
    the config's layers are exactly `layers_feeding` its select layer, and `options` do not name
    the layers themselves, they are derived again from the new one; layers a config chose
    otherwise are left as they are. `cfg` is the config before `options` are merged.
    """
    new = options.get("model.visual_select_layer", options.get("visual_select_layer"))
    lora = cfg.get("model", {}).get("visual_encoder_lora")
    num_layers = cfg.get("visual_encoder_num_layers")
    if (
        new is None
        or "model.visual_encoder_lora.layers_to_transform" in options
        or not lora
        or lora.get("layers_to_transform") is None  # every layer adapted: none left out
        or num_layers is None
    ):
        return {}
    old = cfg["model"].get("visual_select_layer", -2)
    if list(lora["layers_to_transform"]) != layers_feeding(num_layers, old):
        return {}
    derived = {"model.visual_encoder_lora.layers_to_transform": layers_feeding(num_layers, new)}
    if "model.visual_select_layer" not in options:
        derived["model.visual_select_layer"] = new
    return derived
