"""Held-out accuracy of a run without generation: each option of an item scored by its
log-likelihood under the LLaVAModel a config builds, the highest one wins.

The cheap and exact way to evaluate a tiny model: the prompt and answer go through XTuner's own
map and encode functions, so the tokens are exactly those of training. The items are
`llava_moslora.data.items.EvalItem`s: the shapes task's held-out set (`synthetic.write_heldout`,
what the ablation scores) or the compositional task's (`compositional.write_task`).
`llava-moslora eval-compositional` and `llava-moslora ablate --eval heldout` run `evaluate_run`;
`score_run` keeps every item's option log-likelihoods and answer (tests/test_hf_engine.py compares
the two engines' checkpoints with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.compositional import EVAL_JSON
from ..data.items import EvalItem, read_eval_items
from ..data.prompts import IMAGE_TOKEN
from ..runs import image_features, load_run, square_pixels


def option_log_likelihoods(
    model,
    tokenizer,
    image_processor,
    image: Image.Image,
    question: str,
    options: Sequence[str],
    prompt_template: dict,
    system: str = "",
) -> list[float]:
    """Summed log-probability of each option as the answer (its end-of-turn suffix included).

    The prompt and answer go through XTuner's own llava_map_fn / template_map_fn / encode_fn, so
    the tokens are exactly those of training; the image is padded to a square and processed as
    the config's LLaVADataset does (pad_image_to_square=True).
    """
    import torch
    from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
    from xtuner.dataset.utils import encode_fn
    from xtuner.model.utils import prepare_inputs_labels_for_multimodal

    template_fn = template_map_fn_factory(prompt_template)
    device = next(model.parameters()).device
    with torch.no_grad():
        features = image_features(model, square_pixels(image, image_processor).to(device))
        scores = []
        for option in options:
            turns = [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                {"from": "gpt", "value": option},
            ]
            example = llava_map_fn({"conversations": turns})
            if system:
                example["conversation"][0]["system"] = system
            example = template_fn(example)
            encoded = encode_fn(example, tokenizer, max_length=10**6, with_image_token=True)
            data = prepare_inputs_labels_for_multimodal(
                llm=model.llm,
                input_ids=torch.tensor([encoded["input_ids"]], device=device),
                labels=torch.tensor([encoded["labels"]], device=device),
                pixel_values=features,
            )
            labels = data.pop("labels")  # (1, T) with the image tokens expanded, -100 = no loss
            logits = model.llm(**data).logits.float()  # (1, T, vocab)
            log_probs = logits[:, :-1].log_softmax(-1)
            targets = labels[:, 1:]
            mask = targets != -100
            picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            scores.append(float((picked * mask).sum()))
    return scores


@dataclass(frozen=True)
class HeldoutScores:
    """Every item's option log-likelihoods: the per-item answers and the accuracy follow."""

    items: tuple[EvalItem, ...]
    log_likelihoods: tuple[tuple[float, ...], ...]  # per item, per option (in `item.options`)

    @property
    def answers(self) -> list[str]:
        """The option each item picks: the highest log-likelihood (the first of a tie)."""
        return [
            item.options[max(range(len(scores)), key=scores.__getitem__)]
            for item, scores in zip(self.items, self.log_likelihoods, strict=True)
        ]

    def accuracy(self) -> dict[str, float]:
        """Accuracy per category and `overall` (mean over items)."""
        correct: dict[str, list[bool]] = {}  # per category, in the order the items bring them
        for item, answer in zip(self.items, self.answers, strict=True):
            correct.setdefault(item.category, []).append(answer == item.answer)
        result = {c: sum(v) / len(v) for c, v in correct.items()}
        every = [ok for v in correct.values() for ok in v]
        result["overall"] = sum(every) / len(every)
        return result


def score_items(
    model,
    tokenizer,
    image_processor,
    items: Sequence[EvalItem],
    image_root: str | Path,
    prompt_template: dict,
    system: str = "",
) -> HeldoutScores:
    """Each option of each item scored by `option_log_likelihoods`, the model in eval mode;
    `.accuracy()` gives the accuracy per category and `overall`."""
    was_training = model.training
    model.eval()
    scores = []
    try:
        for item in items:
            with Image.open(Path(image_root) / item.image) as image:
                scores.append(
                    option_log_likelihoods(
                        model,
                        tokenizer,
                        image_processor,
                        image,
                        item.question,
                        item.options,
                        prompt_template,
                        system,
                    )
                )
    finally:
        model.train(was_training)
    return HeldoutScores(tuple(items), tuple(map(tuple, scores)))


def chance_accuracy(items: Sequence[EvalItem]) -> float:
    """The expected accuracy of guessing uniformly among each item's options."""
    return sum(1 / len(item.options) for item in items) / len(items)


def score_run(
    config: str | Path,
    checkpoint: str | Path | None = None,
    items: str | Path | None = None,
    cfg_options: dict | None = None,
) -> HeldoutScores:
    """Held-out `score_items` of the model a config builds, with a checkpoint's weights loaded.

    Without `checkpoint` this is the untrained model (adapters at init: B = 0, so the base model
    with the config's pretrained projector). `items` defaults to the config's `heldout_eval_path`,
    else compositional_eval.json next to its `data_path`. The run is loaded as export loads it
    (`llava_moslora.runs.load_run`): a checkpoint that does not fit the model exactly, a
    non-finite one, or a learned mixer under a frozen-mixer config raises instead of scoring.
    A checkpoint of either engine (`xtuner train` or `llava-moslora train --engine hf`) loads.
    """
    return score_sets(config, checkpoint, [items], cfg_options)[0]


def score_sets(
    config: str | Path,
    checkpoint: str | Path | None,
    item_sets: Sequence[str | Path | None],
    cfg_options: dict | None = None,
) -> list[HeldoutScores]:
    """`score_run` of each held-out set in `item_sets`, the model built and loaded once (the
    ablation scores its new family and what the adapter kept of the old one: building the
    model twice cost a fifth of each test run)."""
    from xtuner.registry import BUILDER

    cfg, model = load_run(config, checkpoint, cfg_options)
    tokenizer = BUILDER.build(cfg.tokenizer)
    image_processor = BUILDER.build(cfg.image_processor)
    scored = []
    for items in item_sets:
        if items is None:  # the config names its held-out set, or it is the compositional task's
            items = cfg.get("heldout_eval_path") or Path(cfg.data_path).parent / EVAL_JSON
        items_path = Path(items)
        scored.append(
            score_items(
                model,
                tokenizer,
                image_processor,
                read_eval_items(items_path),
                items_path.parent,
                cfg.prompt_template,
                cfg.get("SYSTEM", ""),
            )
        )
    return scored


def evaluate_run(
    config: str | Path,
    checkpoint: str | Path | None = None,
    items: str | Path | None = None,
    cfg_options: dict | None = None,
) -> dict[str, float]:
    """Held-out accuracy (per category and `overall`) of `score_run`."""
    return score_run(config, checkpoint, items, cfg_options).accuracy()
