"""`llava-moslora make-tiny DIR`: a complete, tiny LLaVA-1.5 training setup on disk, offline.

    DIR/llm/                     LlamaForCausalLM shaped like LLaMA-3 (GQA, rope_theta 5e5) + its
                                 byte-level BPE tokenizer with the llama3_chat special tokens
    DIR/clip/                    CLIPVisionModel (56 x 56 images, 14 px patches: 16 image tokens)
                                 + CLIPImageProcessor
    DIR/projector/iter_0.pth     a "pretrained" projector, in the checkpoint format that XTuner's
                                 LLaVAModel(pretrained_pth=...) loads (keys `projector.model.*`)
    DIR/data/tiny_llava.json     synthetic LLaVA instructions (llava_moslora.data.synthetic)
    DIR/data/images/*.png
    DIR/data/heldout_eval.json   held-out colour / shape / count items on new images
                                 (synthetic.write_heldout; `--eval heldout` of the ablation)
    DIR/data/heldout_eval.tsv    the same items as a VLMEvalKit multiple-choice TSV

With `task="compositional"` (`make-tiny DIR --task compositional`) the data is instead the
compositional task of llava_moslora.data.compositional (DIR/data/compositional.json + held-out
DIR/data/compositional_eval.{json,tsv}), and the tokenizer is trained on that task's text; read it
with configs/tiny_compositional_*.py.

Every path is what `from_pretrained` / `LLaVADataset` read, so `configs/tiny_moslora.py` is the
paper config with these paths swapped in. Weights are random (seeded): the point is that every
code path of the real run executes, in seconds, on a CPU. `make-tiny DIR --pretrain` instead
writes the same layout with every weight trained on one family of questions (pretrain.py);
`make-tiny DIR --verdict-steps N` then aligns the projector on captions and trains the LLM on the
yes/no verdict, the stand-in for the pretrained projector and LLM a real LLaVA-1.5 starts from
(verdict.py; the main job's base).

    DIR/make_tiny_files.json     every file make-tiny wrote under DIR (written last)

make-tiny never overwrites a file it did not write: before writing, `check_out_dir` refuses a DIR
whose llm/, clip/, projector/ or data/ (or standin.json) hold a file its manifest does not list,
naming it, unless `--overwrite` says to replace them. A DIR make-tiny wrote before is rewritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_moslora.data import compositional, synthetic

# LLaMA-3's special tokens that XTuner's PROMPT_TEMPLATE.llama3_chat writes, plus a pad token
# (LLaMA-3.1's name for it). The pad token comes first so that it gets id 0, the id XTuner's
# default_collate_fn pads input_ids with.
PAD = "<|finetune_right_pad_id|>"
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"  # end of turn: the template's SUFFIX and STOP_WORDS; the Instruct model's eos
SPECIAL_TOKENS = (PAD, BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT)


@dataclass(frozen=True)
class ChatTokens:
    """A model family's special tokens: `special` in id order, and which of them play which role.

    `eos` is the end-of-turn token the chat template's SUFFIX writes (the Instruct model's eos).
    """

    special: tuple[str, ...]
    bos: str
    eos: str
    pad: str


LLAMA3_CHAT = ChatTokens(special=SPECIAL_TOKENS, bos=BOS, eos=EOT, pad=PAD)
# InternLM2-chat's: <unk> 0, <s> 1, </s> 2 as in its tokenizer, and the ChatML turn markers that
# XTuner's PROMPT_TEMPLATE.internlm2_chat writes (<|im_end|> ends a turn and is the stop word).
INTERNLM2_CHAT = ChatTokens(
    special=("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"),
    bos="<s>",
    eos="<|im_end|>",
    pad="<unk>",
)

IMAGE_SIZE = 56
PATCH_SIZE = 14  # (56 // 14) ** 2 = 16 image tokens
# Three, not two: LLaVA reads the second-to-last layer's output (visual_select_layer=-2), so two
# layers feed it and the last runs unread, as CLIP ViT-L's 24th does. The tiny configs read this.
TINY_CLIP_LAYERS = 3
MAX_POSITIONS = 512
SHAPES_TASK_VOCAB_SIZE = (
    768  # > the 705 tokens BPE ends with on synthetic.corpus(): every word whole
)


TASKS = ("shapes", "compositional")

MANIFEST_NAME = "make_tiny_files.json"
# What make-tiny (and `--shape`, `--verdict-steps`) write under DIR: nothing outside these.
OUTPUTS = ("llm", "clip", "projector", "data", "standin.json")
SHOWN_FILES = 3  # files named per refusal


def _written_files(out_dir: Path) -> list[str]:
    """Every file under `out_dir`'s OUTPUTS, as sorted POSIX paths relative to `out_dir`."""
    found = []
    for name in OUTPUTS:
        top = out_dir / name
        files = [top] if top.is_file() else (p for p in top.rglob("*") if not p.is_dir())
        found += [p.relative_to(out_dir).as_posix() for p in files]
    return sorted(found)


def _listed(out_dir: Path) -> set[str]:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return set()
    try:
        files = json.loads(path.read_text()).get("files")
    except (ValueError, AttributeError):
        files = None
    if not isinstance(files, list):
        raise FileExistsError(
            f"{path} is not a make-tiny file list, so make-tiny cannot tell its files from "
            "yours. Choose another DIR, or pass `--overwrite` to replace what is there."
        )
    return set(files)


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse to write into `out_dir` over files make-tiny did not write (module docstring)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"`DIR` {out_dir} is a file; give a folder path.")
    if overwrite or not out_dir.is_dir():
        return
    theirs = [name for name in _written_files(out_dir) if name not in _listed(out_dir)]
    if theirs:
        more = f" and {len(theirs) - SHOWN_FILES} more" if len(theirs) > SHOWN_FILES else ""
        raise FileExistsError(
            f"`DIR` {out_dir} holds {', '.join(theirs[:SHOWN_FILES])}{more}, which make-tiny "
            "did not write and would overwrite. Choose another DIR, or pass `--overwrite` to "
            "replace them."
        )


def record_written(out_dir: str | Path) -> Path:
    """Write DIR/make_tiny_files.json: the files now under `out_dir`'s OUTPUTS are make-tiny's."""
    path = Path(out_dir) / MANIFEST_NAME
    path.write_text(json.dumps({"files": _written_files(Path(out_dir))}, indent=1) + "\n")
    return path


def chat_texts(task: str = "shapes", template_name: str = "llama3_chat") -> list[str]:
    """The task's corpus laid out with an XTuner chat template, as the tokenizer will see it."""
    from xtuner.utils import PROMPT_TEMPLATE

    template = PROMPT_TEMPLATE[template_name]
    if task == "compositional":
        texts = compositional.corpus()
        questions = [t for t in texts if t.endswith("?")]
    else:
        texts = list(synthetic.corpus())
        questions = list(synthetic.prompts())  # benchmark formats included
    suffix = template.get("SUFFIX", "")  # Vicuna's template has none: its turns end with eos
    texts += [template.INSTRUCTION.format(input=q, round=1) + suffix for q in questions]
    texts += [template.SYSTEM.format(system="You are a helpful assistant.")]
    return texts


def build_tokenizer(
    texts: list[str],
    vocab_size: int = 512,
    chat: ChatTokens = LLAMA3_CHAT,
    model_max_length: int = MAX_POSITIONS,
):
    """A byte-level BPE (like LLaMA-3's) trained on `texts`, wrapped as PreTrainedTokenizerFast.

    Byte-level means any string encodes (no unknown tokens); `encode` with special tokens prepends
    the bos token (<|begin_of_text|> for LLaMA-3) as the real tokenizers do. `chat` names the
    special tokens (LLAMA3_CHAT, INTERNLM2_CHAT); they get the ids 0, 1, ... in its order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(chat.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = chat.bos
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=chat.eos,
        pad_token=chat.pad,
        additional_special_tokens=[
            t for t in chat.special if t not in (chat.pad, chat.bos, chat.eos)
        ],
        model_max_length=model_max_length,
    )


def tiny_llama3(tokenizer, seed: int = 0, hidden_size: int = 64):
    """A 2-layer LlamaForCausalLM with LLaMA-3's proportions (4 heads over 2 KV heads, MLP 3.5x).

    Initialised with std 8 / hidden_size instead of HF's 0.02, as if trained: the frozen output
    layer reads a final-RMSNorm'd state of norm sqrt(hidden_size), so its logits are capped near
    std * hidden_size. At 0.02 that cap is 1.3, too flat for any adapter to bring the loss much
    below ln(vocab); at 8 / hidden_size it is 8, so the loss curve of a tiny run means something.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 7 // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=8 / hidden_size,
    )
    return LlamaForCausalLM(config)


def tiny_clip(seed: int = 0, hidden_size: int = 64):
    """A TINY_CLIP_LAYERS-layer (3) CLIPVisionModel + its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=TINY_CLIP_LAYERS,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=hidden_size,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return CLIPVisionModel(config), processor


def projector_state_dict(visual_hidden_size: int, llm_hidden_size: int, seed: int = 0) -> dict:
    """XTuner's 2-layer MLP projector, keyed as LLaVAModel.state_dict() keys it."""
    from xtuner.model.modules import ProjectorConfig, ProjectorModel

    torch.manual_seed(seed)
    projector = ProjectorModel(
        ProjectorConfig(
            visual_hidden_size=visual_hidden_size, llm_hidden_size=llm_hidden_size, depth=2
        )
    )
    return projector_keys(projector)


def projector_keys(projector: torch.nn.Module) -> dict:
    """A projector's state keyed as LLaVAModel.state_dict() keys it (`projector.model.0.weight`)."""
    return {f"projector.{k}": v for k, v in projector.state_dict().items()}


def save_projector(state: dict, path: Path, seed: int) -> None:
    """Write a projector's `projector.*` state to `path` (DIR/projector/iter_0.pth) in mmengine's
    checkpoint layout, whose "state_dict" xtuner's LLaVAModel(pretrained_pth=...) reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"seed": seed}, "state_dict": state}, path)


def make_tiny(
    out_dir: str | Path,
    *,
    seed: int = 0,
    samples: int = 320,
    task: str = "shapes",
    benchmark_rounds: tuple[str, ...] = synthetic.BENCHMARK_ROUNDS,
) -> dict[str, Path]:
    """Write the tiny LLaVA setup under `out_dir` (see the module docstring); return its paths.

    `task` picks the data: "shapes" (synthetic.py, the default) or "compositional"
    (compositional.py, `samples` training images plus its held-out evaluation items).
    `benchmark_rounds` are the benchmark-format rounds of each shapes conversation
    (synthetic.write_dataset); the tokenizer covers every format whichever are picked.
    """
    if task not in TASKS:
        raise ValueError(
            f"`task` should be one of {', '.join(TASKS)} but the value passed is {task!r}."
        )
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(
            f"`samples` (`--samples`) should be a positive integer but the value passed is "
            f"{samples!r}: there would be nothing to train on. Use e.g. --samples 320."
        )
    synthetic.check_benchmark_rounds(benchmark_rounds)  # before anything is written
    out_dir = Path(out_dir)
    paths = {
        "llm": out_dir / "llm",
        "clip": out_dir / "clip",
        "projector": out_dir / "projector" / "iter_0.pth",
        "data": out_dir / "data" / "tiny_llava.json",
        "images": out_dir / "data" / "images",
    }

    # The shapes corpus (its benchmark formats' Chinese included) merges down to 705 tokens, one
    # per word: at 512 the rarer words, every Chinese character among them, would stay split into
    # UTF-8 bytes that decode to nothing on their own.
    vocab_size = SHAPES_TASK_VOCAB_SIZE if task == "shapes" else 512
    tokenizer = build_tokenizer(chat_texts(task), vocab_size=vocab_size)
    llm = tiny_llama3(tokenizer, seed)
    tokenizer.save_pretrained(paths["llm"])
    llm.save_pretrained(paths["llm"])

    clip, processor = tiny_clip(seed)
    clip.save_pretrained(paths["clip"])
    processor.save_pretrained(paths["clip"])

    state = projector_state_dict(clip.config.hidden_size, llm.config.hidden_size, seed)
    save_projector(state, paths["projector"], seed)

    if task == "compositional":
        written = compositional.write_task(paths["data"].parent, train_images=samples, seed=seed)
        paths.update(written)
        return paths
    synthetic.write_dataset(
        paths["data"].parent, samples=samples, seed=seed, benchmark_rounds=benchmark_rounds
    )
    paths["heldout"] = synthetic.write_heldout(paths["data"].parent, seed=seed)
    paths["heldout_tsv"] = paths["heldout"].with_name(synthetic.HELDOUT_TSV)
    return paths
