"""`llava-moslora make-tiny DIR --pretrain`: a tiny LLaVA whose every weight was trained first.

make-tiny's models are random; an adapter trained on them learns the task from nothing. The
paper's adapters instead start from a model that already reads images. This builds that offline:
the tiny LLaVA (make_tiny's LLM, CLIP and projector) is trained in full -- LLM, projector and
vision tower, no adapter -- on family A of llava_moslora.data.families (colour and shape
questions), and saved in make-tiny's layout, so every tiny config reads it as its base:

    DIR/llm/, DIR/clip/, DIR/projector/iter_0.pth   the trained base (make-tiny's layout)
    DIR/data/family_{a,b}*.json, *_images/          both families' data and val / test items
    DIR/pretrained.json                             written last: the spec, the loss, the time
                                                    and the base's accuracy on both families

A plain PyTorch loop (AdamW, linear warm-up then cosine, gradients clipped at 1) over XTuner's
LLaVAModel and LLaVADataset, so the tokens are exactly those of an XTuner run. The folder is a
cache keyed by the `PretrainSpec`: a second call with the same spec returns at once; another spec
is refused (a run trained on one base must not be reported against another). The build writes to
DIR.partial and renames it at the end, so an interrupted build leaves no half base behind.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import families
from ..jsonfile import read_json_object
from .make_tiny import (
    IMAGE_SIZE,
    MAX_POSITIONS,
    PATCH_SIZE,
    build_tokenizer,
    projector_keys,
    save_projector,
    tiny_clip,
    tiny_llama3,
)

RECORD = "pretrained.json"
# Raise when what a spec builds changes (data, loop), so that an old cache is not taken for a new.
FORMAT = 2  # 2: family B count only, 96 validation and 192 test items per family
TEMPLATE = "llama3_chat"  # the tiny configs' prompt_template (llama3_moslora.py)


@dataclass(frozen=True)
class PretrainSpec:
    """Everything the base depends on: the cache key."""

    seed: int = 0
    hidden_size: int = 64  # of both towers
    samples: int = 1000  # family A training images (family B gets as many)
    steps: int = 400  # optimizer steps of `batch_size` conversations
    batch_size: int = 8
    lr: float = 1e-3  # the LLM's; peak of a linear warm-up (first 3 %) and cosine to 0
    vision_lr_mult: float = 0.2  # projector and vision tower at lr x this
    val_items: int = 96  # held-out items per family and split
    test_items: int = 192

    def check(self) -> None:
        for name in ("hidden_size", "samples", "steps", "batch_size", "val_items", "test_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` should be a positive integer, got {value!r}")
        if self.hidden_size % 4:
            raise ValueError(
                f"`hidden_size` should be a multiple of 4 (the towers' 4 attention heads), "
                f"got {self.hidden_size}"
            )
        if not self.lr > 0 or not self.vision_lr_mult > 0:
            raise ValueError(
                f"`lr` and `vision_lr_mult` should be positive, got {self.lr}, {self.vision_lr_mult}"
            )

    def key(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}


@dataclass(frozen=True)
class Pretrained:
    """A base on disk: its folder, its `pretrained.json` record, and whether it was reused."""

    dir: Path
    record: dict[str, Any]
    reused: bool


Scorer = Callable[..., dict[str, float]]  # (model, tokenizer, image_processor, items_path) -> acc


def corpus_texts() -> list[str]:
    """Both families' text, and their questions laid out with the chat template: the tokenizer's."""
    from xtuner.utils import PROMPT_TEMPLATE

    template = PROMPT_TEMPLATE[TEMPLATE]
    texts = list(families.corpus())
    questions = [t for t in texts if "?" in t]
    texts += [template.INSTRUCTION.format(input=q, round=1) + template.SUFFIX for q in questions]
    return texts


def _read_record(path: Path) -> dict[str, Any]:
    return read_json_object(path, fix=f"delete {path.parent} to build the base again.")


def pretrain_tiny(
    out_dir: str | Path,
    spec: PretrainSpec = PretrainSpec(),  # noqa: B008 - frozen, so sharing it is safe
    *,
    score: Scorer | None = None,
    log: Callable[[str], None] = print,
) -> Pretrained:
    """Build the pretrained base in `out_dir`, or return the one there if `spec` matches.

    `score(model, tokenizer, image_processor, items_path)` -> {"overall": .., <kind>: ..}, when
    given, measures the trained base on both families' test items (recorded in pretrained.json);
    the eval layer owns the scorer (`llava_moslora.eval.heldout.score_items`), so the caller
    passes it in.
    """
    spec.check()
    out_dir = Path(out_dir)
    record_path = out_dir / RECORD
    if record_path.is_file():
        record = _read_record(record_path)
        if record.get("spec") == spec.key():
            log(f"reusing the pretrained base in {out_dir} (same spec)")
            return Pretrained(out_dir, record, reused=True)
        made, wanted = record.get("spec") or {}, spec.key()
        differs = [key for key in wanted if made.get(key) != wanted[key]]
        raise ValueError(
            f"{out_dir} holds a base pretrained with "
            + ", ".join(f"{key}={made.get(key)!r}" for key in differs)
            + " but this call asks for "
            + ", ".join(f"{key}={wanted[key]!r}" for key in differs)
            + ". Runs adapted from one base must not be compared with another's: pass another "
            f"DIR for these arguments, or delete {out_dir} to replace it."
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(
            f"{out_dir} exists but holds no {RECORD}: not a pretrained base (a plain make-tiny "
            "folder?). Pass an empty or new DIR."
        )
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        log(f"deleting {partial}: an interrupted build")
        shutil.rmtree(partial)
    started = time.monotonic()
    record = _build(partial, spec, score, log)
    record["seconds"] = time.monotonic() - started
    (partial / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    partial.rename(out_dir)
    log(f"pretrained base written to {out_dir} in {record['seconds']:.0f} s")
    return Pretrained(out_dir, _read_record(record_path), reused=False)


def _build(
    out_dir: Path, spec: PretrainSpec, score: Scorer | None, log: Callable[[str], None]
) -> dict[str, Any]:
    from xtuner.model import LLaVAModel

    data = out_dir / "data"
    log(f"writing both families' data ({spec.samples} images each) to {data}")
    paths = families.write_task(
        data,
        samples=spec.samples,
        seed=spec.seed,
        val_items=spec.val_items,
        test_items=spec.test_items,
    )
    tokenizer = build_tokenizer(corpus_texts(), vocab_size=512)
    llm = tiny_llama3(tokenizer, spec.seed, spec.hidden_size)
    clip, processor = tiny_clip(spec.seed, spec.hidden_size)
    torch.manual_seed(spec.seed)  # the projector's init
    model = LLaVAModel(llm, clip, use_activation_checkpointing=False)  # every weight trains
    losses = train_steps(
        model,
        Conversations(paths["family_a"], tokenizer, processor),
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        vision_lr_mult=spec.vision_lr_mult,
        seed=spec.seed,
        log=log,
    )

    llm.save_pretrained(out_dir / "llm")
    tokenizer.save_pretrained(out_dir / "llm")
    clip.save_pretrained(out_dir / "clip")
    processor.save_pretrained(out_dir / "clip")
    save_projector(projector_keys(model.projector), out_dir / "projector" / "iter_0.pth", spec.seed)

    record: dict[str, Any] = {
        "spec": spec.key(),
        "loss_first": losses[0],
        "loss_last": sum(losses[-20:]) / len(losses[-20:]),
    }
    if score is not None:
        for name in families.FAMILIES:
            items = paths[f"family_{name}_test"]
            record[f"family_{name}_test"] = score(model, tokenizer, processor, items)
            log(f"family {name.upper()} test accuracy: {record[f'family_{name}_test']}")
    return record


class Conversations(torch.utils.data.Dataset):
    """A LLaVA JSON encoded as XTuner's LLaVADataset encodes it (llava_map_fn, the template's
    map fn, encode_fn; images padded to a square; with `learn`, the loss only on those token
    ids of the answers), without its 32-process `datasets.map`, which
    on a 2-core machine takes longer than the tiny training itself. Images are read per item from
    the `<json stem>_images/` folder next to the JSON."""

    def __init__(
        self, data_path: Path, tokenizer, processor, learn: frozenset[int] | None = None
    ) -> None:
        from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
        from xtuner.dataset.utils import encode_fn
        from xtuner.utils import PROMPT_TEMPLATE

        template_fn = template_map_fn_factory(template=PROMPT_TEMPLATE[TEMPLATE])
        max_length = MAX_POSITIONS - (IMAGE_SIZE // PATCH_SIZE) ** 2  # 512 - 16 image tokens
        self.records = json.loads(Path(data_path).read_text())
        self.images = Path(data_path).with_name(Path(data_path).stem + "_images")
        self.processor = processor
        self.encoded = [
            encode_fn(
                template_fn(llava_map_fn(record)), tokenizer, max_length, with_image_token=True
            )
            for record in self.records
        ]
        if learn is not None:  # the loss on these token ids only
            from xtuner.utils import IGNORE_INDEX

            for encoded in self.encoded:
                encoded["labels"] = [t if t in learn else IGNORE_INDEX for t in encoded["labels"]]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image
        from xtuner.dataset.utils import expand2square

        with Image.open(self.images / self.records[index]["image"]) as image:
            background = tuple(int(x * 255) for x in self.processor.image_mean)
            square = expand2square(image.convert("RGB"), background)
        pixels = self.processor.preprocess(square, return_tensors="pt")["pixel_values"][0]
        return {**self.encoded[index], "pixel_values": pixels}


def train_steps(
    model,
    dataset: Conversations,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    vision_lr_mult: float,
    seed: int,
    log: Callable[[str], None],
    name: str = "pretrain",
) -> list[float]:
    """`steps` AdamW steps over the trainable weights of `model` on `dataset`; the loss per step
    (every 50 steps logged as "<name> step i/steps: loss x").

    The LLM's weights at `lr`, the projector's and the vision tower's at `lr * vision_lr_mult`,
    the rate a linear warm-up (first 3 %) then a cosine to 0; gradients clipped at 1.
    """
    from xtuner.dataset.collate_fns import default_collate_fn

    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=default_collate_fn,
        drop_last=True,
    )
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    slow = [p for n, p in trainable if not n.startswith("llm.")]
    fast = [p for n, p in trainable if n.startswith("llm.")]
    optimizer = torch.optim.AdamW(
        [{"params": fast}, {"params": slow, "lr": lr * vision_lr_mult}],
        lr=lr,
        weight_decay=0.0,
    )
    warmup = max(1, round(0.03 * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses: list[float] = []
    batches = iter(())
    while len(losses) < steps:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        loss = model(batch["data"], mode="loss")["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0 or len(losses) == steps:
            recent = losses[-50:]
            log(f"{name} step {len(losses)}/{steps}: loss {sum(recent) / len(recent):.3f}")
    model.eval()
    return losses
