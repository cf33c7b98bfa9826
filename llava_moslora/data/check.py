"""Find the samples of a LLaVA-format instruction set that would break or silently vanish in training.

XTuner's `LLaVADataset` trusts its JSON. What goes wrong with the 665K LLaVA-1.5 mix, and when:

    fault                                  what XTuner 0.2.0 does
    -------------------------------------  ------------------------------------------------------
    image file missing / corrupt           crashes in a DataLoader worker, hours into the run
    entry without `conversations`, wrong   crashes while tokenizing (KeyError / NotImplementedError)
      types, a role other than human/gpt
    two `<image>` in one human turn        AssertionError in `encode_fn`
    `<image>` count != number of images    image features and placeholders misalign in LLaVAModel
    gpt turn first / human turn last       dropped silently by `llava_map_fn`
    prompt fills `max_length`              every answer token truncated: the sample is filtered out
                                           silently (`process_hf_dataset` keeps labels >= 0 only)

`check_data` finds all of these before step 1 and returns a `DataReport`: per problem kind, the
offending samples and one line on how to fix them. `llava-moslora check-data` prints it, and
`CheckedLLaVADataset` (dataset.py) refuses to train on it unless told to drop the bad samples.

The length check does not re-implement XTuner's prompt building: it runs the configured
`dataset_map_fn` (`llava_map_fn`), `template_map_fn` and XTuner's own `encode_fn` on each sample,
so it sees exactly the token ids and labels that training would see.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"  # xtuner.utils.DEFAULT_IMAGE_TOKEN
ROLES = ("human", "gpt")  # what llava_map_fn accepts; anything else raises NotImplementedError
# Where a missing `foo.jpg` is often found instead: LLaVA's OCR-VQA download script saves every
# image as .jpg in the JSON, but some files arrive as GIF/PNG and get those extensions on disk.
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


@dataclass(frozen=True)
class ProblemKind:
    """One kind of bad sample: its report name, what it means and how to fix it."""

    name: str
    meaning: str
    fix: str


# Report order: structural problems first (they hide the others), then images, then text.
KINDS: dict[str, ProblemKind] = {
    kind.name: kind
    for kind in (
        ProblemKind(
            "malformed",
            "entry is not {id, conversations: [{from, value}, ...], image?} with the right types",
            "each entry needs `id` (str or int), `conversations` (a non-empty list of "
            '{"from": "human"|"gpt", "value": str}) and optionally `image` (a path relative '
            "to the image folder); fix or drop these entries",
        ),
        ProblemKind(
            "duplicate_id",
            "the `id` was already used by an earlier entry",
            "give every sample its own `id` (later copies are the ones reported and dropped); "
            "if they are true duplicates, delete them",
        ),
        ProblemKind(
            "missing_image",
            "the `image` file does not exist under the image folder",
            "check that the image folder is the one the `image` paths are relative to "
            "(`llava_images/` for llava_v1_5_mix665k.json) and that every subset is downloaded. "
            "OCR-VQA: LLaVA's download script stores some images as .gif/.png while the JSON "
            "names them .jpg; convert or rename them to the .jpg names (the detail says which "
            "exist under another suffix), or re-download; else drop the samples",
        ),
        ProblemKind(
            "image_outside_folder",
            "the `image` path leads outside the image folder (absolute, or climbs out with '..')",
            "make every `image` path relative to the image folder and inside it (move or link the "
            "files into it); training would read whatever file the path reaches",
        ),
        ProblemKind(
            "unreadable_image",
            "PIL cannot decode the image file (truncated, corrupt or not an image)",
            "re-download these files (a truncated file usually means an interrupted download) "
            "or drop the samples",
        ),
        ProblemKind(
            "image_token_count",
            "a sample with an `image` does not have exactly one `<image>` in its human turns",
            "put exactly one `<image>` in the first human turn (LLaVA's layout) and none in "
            "gpt turns, or drop the samples",
        ),
        ProblemKind(
            "image_token_without_image",
            "a text-only sample (no `image`) has `<image>` in its text",
            "remove `<image>` from the text or add the missing `image` field",
        ),
        ProblemKind(
            "empty_turn",
            "a turn's `value` is empty or only whitespace",
            "fill in or remove the empty turn (keeping human/gpt alternation), or drop the samples",
        ),
        ProblemKind(
            "turn_order",
            "turns do not alternate human, gpt, human, gpt, ... from a human turn to a gpt turn",
            "reorder or trim the turns: XTuner's llava_map_fn silently skips leading gpt turns, "
            "merges consecutive human turns and loses a trailing human turn",
        ),
        ProblemKind(
            "too_long",
            "prompt (template and image tokens included) fills `max_length`: no answer token left",
            "raise `max_length` (up to the LLM's context minus the image tokens), shorten the "
            "prompt, or drop the samples; XTuner would drop them silently",
        ),
    )
}


@dataclass(frozen=True)
class Finding:
    """One problem of one sample: its position in the file, its id and what exactly is wrong."""

    index: int
    id: str
    detail: str


@dataclass
class DataReport:
    """What `check_data` found. `findings[kind]` lists the bad samples of each kind, in order."""

    total: int
    findings: dict[str, list[Finding]] = field(default_factory=dict)
    images_checked: int = 0
    images_decoded: bool = False
    lengths_checked: bool = False
    seconds: float = 0.0

    def add(self, kind: str, index: int, sample_id: str, detail: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"`kind` should be one of {list(KINDS)}, got {kind!r}")
        self.findings.setdefault(kind, []).append(Finding(index, sample_id, detail))

    @property
    def ok(self) -> bool:
        return not any(self.findings.values())

    @property
    def bad_indices(self) -> set[int]:
        """Positions (in the JSON list) of every sample with at least one problem."""
        return {f.index for found in self.findings.values() for f in found}

    def bad_ids(self) -> list[str]:
        """Ids of the samples with at least one problem, in file order, each once."""
        by_index = {f.index: f.id for found in self.findings.values() for f in found}
        return [by_index[index] for index in sorted(by_index)]

    def counts(self) -> dict[str, int]:
        """Bad samples per kind, in report order (kinds with none left out)."""
        return {
            kind: len({f.index for f in self.findings[kind]})
            for kind in KINDS
            if self.findings.get(kind)
        }

    def summary(self, first: int = 5) -> str:
        """Human-readable report: one block per kind with its count, first ids, detail and fix."""
        if self.ok:
            return f"all {self.total} samples passed"
        lines = [f"{len(self.bad_indices)} of {self.total} samples have errors:"]
        for kind, count in self.counts().items():
            found = self.findings[kind]
            ids = ", ".join(f.id for f in found[:first]) + (", ..." if len(found) > first else "")
            lines.append(f"  {kind}: {count} ({KINDS[kind].meaning}); first ids: {ids}")
            lines.append(f"    e.g. {found[0].id}: {found[0].detail}")
            lines.append(f"    fix: {KINDS[kind].fix}")
        return "\n".join(lines)


class DataFileError(ValueError):
    """The data file itself cannot be read as a LLaVA JSON list / JSONL file."""


def load_records(data_path: str | os.PathLike) -> list[Any]:
    """Read a LLaVA `.json` (one list) or `.jsonl` file, as `LLaVADataset` would.

    Entries are returned as parsed, whatever their type: judging them is `check_records`' job.
    """
    path = Path(data_path)
    if path.suffix not in (".json", ".jsonl"):
        raise DataFileError(
            f"`data_path` should end in .json or .jsonl (what XTuner's LLaVADataset reads), "
            f"got {str(path)!r}"
        )
    if not path.is_file():
        raise DataFileError(f"`data_path` {str(path)!r} does not exist or is not a file")
    where = ""  # a JSONL line is parsed alone: the decoder's "line 1" is the file's line `where`
    try:
        with path.open(encoding="utf-8") as file:
            if path.suffix == ".json":
                records = json.load(file)
            else:
                records = []
                for line_number, line in enumerate(file, 1):
                    where = f" at line {line_number}"
                    if line.strip():
                        records.append(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFileError(
            f"`data_path` {str(path)!r} is not valid JSON{where}: {error}; re-download or repair it"
        ) from None
    if not isinstance(records, list):
        raise DataFileError(
            f"`data_path` {str(path)!r} should hold a JSON list of samples, "
            f"got a {type(records).__name__}"
        )
    if not records:
        raise DataFileError(
            f"`data_path` {str(path)!r} holds no samples: there is nothing to train on. "
            "Pass the dataset file itself (e.g. llava_v1_5_mix665k.json)."
        )
    return records


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="it", file=sys.stderr, mininterval=0.5)


def _sample_id(record: Any) -> str | None:
    """The id XTuner would use (ints become strings), or None when it has no usable id."""
    if not isinstance(record, dict):
        return None
    value = record.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _malformed(record: Any) -> str | None:
    """Why `record` is not a LLaVA sample XTuner can tokenize, or None when its shape is right."""
    if not isinstance(record, dict):
        return f"entry is a {type(record).__name__}, not an object"
    if "id" not in record:
        return "no `id`"
    if _sample_id(record) is None:
        return f"`id` should be a string or an int, got {type(record['id']).__name__}"
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image):
        return f"`image` should be a non-empty string path, got {image!r}"
    if "conversations" not in record:
        return "no `conversations`"
    turns = record["conversations"]
    if not isinstance(turns, list):
        return f"`conversations` should be a list, got {type(turns).__name__}"
    if not turns:
        return "`conversations` is empty"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {i} is a {type(turn).__name__}, not an object"
        if turn.get("from") not in ROLES:
            return f'turn {i} has `from` {turn.get("from")!r}; should be "human" or "gpt"'
        if not isinstance(turn.get("value"), str):
            return f"turn {i} `value` should be a string, got {type(turn.get('value')).__name__}"
    return None


def _conversation_problems(record: dict) -> list[tuple[str, str]]:
    """(kind, detail) for the image-token, empty-turn and turn-order rules of one sample."""
    problems = []
    turns = record["conversations"]
    human_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in turns if t["from"] == "human")
    gpt_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in turns if t["from"] == "gpt")
    if record.get("image") is not None:
        if human_tokens != 1 or gpt_tokens:
            detail = f"`<image>` appears {human_tokens}x in human turns"
            if gpt_tokens:
                detail += f" and {gpt_tokens}x in gpt turns"
            problems.append(("image_token_count", detail + "; expected once, in a human turn"))
    elif human_tokens or gpt_tokens:
        count = human_tokens + gpt_tokens
        problems.append(
            ("image_token_without_image", f"no `image`, but `<image>` appears {count}x")
        )
    # A human turn of just "<image>" is a prompt (the image is the question); nothing is not.
    empty = [i for i, t in enumerate(turns) if not t["value"].strip()]
    if empty:
        problems.append(("empty_turn", f"turn(s) {empty} empty"))
    roles = [t["from"] for t in turns]
    expected = [ROLES[i % 2] for i in range(len(roles))]
    if roles != expected or len(roles) % 2:
        shown = " ".join(roles[:6]) + (" ..." if len(roles) > 6 else "")
        problems.append(("turn_order", f"roles are: {shown}"))
    return problems


def answer_tokens_kept(
    record: dict,
    tokenizer: Any,
    max_length: int,
    *,
    dataset_map_fn: Callable[[dict], dict],
    template_map_fn: Callable[[dict], dict] | None,
    image_tokens: int = 1,
) -> int:
    """How many answer tokens (labels >= 0) of `record` survive truncation to `max_length`.

    Runs XTuner's own pipeline (`dataset_map_fn`, `template_map_fn`, `encode_fn`) untruncated, then
    truncates the way `encode_fn` does. `encode_fn` puts one IMAGE_TOKEN_INDEX placeholder per
    `<image>` into `input_ids`, so with `image_tokens=1` this is exactly XTuner's count (and a result
    of 0 is exactly the set `process_hf_dataset` filters out); the configs subtract the patch tokens
    from `max_length` up front (2048 - 576). `image_tokens=576` with `max_length=2048` instead
    counts the expanded sequence against the LLM's full context.
    """
    from xtuner.dataset.utils import encode_fn
    from xtuner.utils import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    example = copy.deepcopy(record)  # llava_map_fn edits the turns in place
    example.update(dataset_map_fn(example))
    if template_map_fn is not None:
        example.update(template_map_fn(example))
    if not example.get("conversation"):
        return 0
    encoded = encode_fn(example, tokenizer, max_length=sys.maxsize, with_image_token=True)
    labels: list[int] = []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if token == IMAGE_TOKEN_INDEX:
            labels.extend([IGNORE_INDEX] * image_tokens)
        else:
            labels.append(label)
    return sum(label >= 0 for label in labels[:max_length])


def _map_in_window(
    pool: ThreadPoolExecutor, fn: Callable[[str], Any], items: Iterable[str], window: int = 4096
) -> Iterator[Any]:
    """`pool.map(fn, items)` in order, but with at most `window` tasks in flight.

    `Executor.map` submits every task up front: 600K futures at once for the 665K mix.
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _inside(path: str, folder: str | os.PathLike) -> bool:
    """Whether the normalised `path` lies under `folder` (by name: links inside it are allowed)."""
    folder = os.path.normpath(os.path.abspath(folder))
    return os.path.commonpath([os.path.abspath(path), folder]) == folder


def _image_problem(path: str, decode: bool) -> tuple[str, str] | None:
    """(kind, detail) if the image at `path` is missing or (with `decode`) undecodable."""
    if not os.path.isfile(path):
        stem, _ = os.path.splitext(path)
        elsewhere = [stem + s for s in OTHER_IMAGE_SUFFIXES if os.path.isfile(stem + s)]
        hint = f"; found as {', '.join(map(os.path.basename, elsewhere))}" if elsewhere else ""
        return "missing_image", f"{path} not found{hint}"
    if decode:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.load()  # decode every pixel: a truncated file fails here, not in open()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
            return "unreadable_image", f"{path}: {type(error).__name__}: {error}"
    return None


_LENGTH_JOB: dict[str, Any] = {}  # a tokenizing worker process's arguments (set by fork)


def _set_length_job(job: dict[str, Any]) -> None:
    _LENGTH_JOB.update(job)


def _count_chunk(chunk: list[tuple[int, dict]]) -> list[tuple[int, int]]:
    return [(index, answer_tokens_kept(record, **_LENGTH_JOB)) for index, record in chunk]


def _answer_counts(
    samples: list[tuple[int, dict]],
    job: dict[str, Any],
    workers: int | None,
    progress: bool,
    chunk: int = 512,
) -> Iterator[tuple[int, int]]:
    """(index, answer tokens kept) per sample, in order; in `workers` processes when it pays.

    Tokenizing is mostly Python (XTuner's map fns and `encode_fn`), so threads would not help:
    like XTuner's own `datasets.map(num_proc=...)`, big sets are split over forked processes.
    """
    import multiprocessing

    workers = workers or min(16, os.cpu_count() or 1)
    chunks = [samples[i : i + chunk] for i in range(0, len(samples), chunk)]
    serial = workers == 1 or len(chunks) < 2
    if "fork" not in multiprocessing.get_all_start_methods():
        serial = True  # spawn would pickle the tokenizer into every worker: not worth it here
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="tokenizing", file=sys.stderr, mininterval=0.5)
    try:
        if serial:
            _set_length_job(job)
            parts: Iterable[list[tuple[int, int]]] = map(_count_chunk, chunks)
            for part in parts:
                yield from part
                if bar is not None:
                    bar.update(len(part))
        else:
            with ProcessPoolExecutor(
                max_workers=min(workers, len(chunks)),
                mp_context=multiprocessing.get_context("fork"),  # inherits the tokenizer
                initializer=_set_length_job,
                initargs=(job,),
            ) as pool:
                for part in pool.map(_count_chunk, chunks):
                    yield from part
                    if bar is not None:
                        bar.update(len(part))
    finally:
        _LENGTH_JOB.clear()
        if bar is not None:
            bar.close()


def check_records(
    records: Sequence[Any],
    image_folder: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    image_tokens: int = 1,
    dataset_map_fn: Callable[[dict], dict] | None = None,
    template_map_fn: Callable[[dict], dict] | None = None,
    decode_images: bool = True,
    workers: int | None = None,
    tokenize_workers: int | None = None,
    progress: bool = False,
) -> DataReport:
    """Check parsed LLaVA samples; see the module docstring for what is checked and why.

    The length check runs only with both `tokenizer` and `max_length` (it needs the template too:
    `template_map_fn`, e.g. `template_map_fn_factory(PROMPT_TEMPLATE.llama3_chat)`), and only on
    samples without structural problems, which XTuner could not tokenize anyway. Images are
    checked once per distinct path, in a pool of `workers` threads (PIL decodes without the GIL);
    samples are tokenized in `tokenize_workers` forked processes (default: CPUs, at most 16).
    """
    if (tokenizer is None) != (max_length is None):
        raise ValueError(
            "`tokenizer` and `max_length` go together: the length check needs both, "
            f"got tokenizer={type(tokenizer).__name__} and max_length={max_length!r}"
        )
    if max_length is not None and max_length < 1:
        raise ValueError(f"`max_length` should be a positive integer, got {max_length}")
    if image_tokens < 1:
        raise ValueError(f"`image_tokens` should be a positive integer, got {image_tokens}")
    for name, value in (("workers", workers), ("tokenize_workers", tokenize_workers)):
        if value is not None and value < 1:
            raise ValueError(f"`{name}` should be a positive integer, got {value}")
    if tokenizer is not None and dataset_map_fn is None:
        from xtuner.dataset.map_fns import llava_map_fn as dataset_map_fn  # slow import: only here

    start = time.perf_counter()
    report = DataReport(total=len(records), images_decoded=decode_images)
    first_seen: dict[str, int] = {}
    well_formed: list[int] = []  # no structural problem: worth tokenizing
    images: dict[str, list[int]] = {}  # path -> samples that use it
    ids: list[str] = []
    for index, record in enumerate(records):
        sample_id = _sample_id(record)
        ids.append(sample_id if sample_id is not None else f"#{index}")
        reason = _malformed(record)
        if reason is not None:
            report.add("malformed", index, ids[index], reason)
            continue
        if sample_id in first_seen:
            report.add("duplicate_id", index, sample_id, f"also entry #{first_seen[sample_id]}")
        else:
            first_seen[sample_id] = index
        if record.get("image") is not None:
            path = os.path.join(image_folder, record["image"])
            if not _inside(path, image_folder):
                detail = (
                    f"{record['image']!r} resolves to {os.path.normpath(path)}, outside "
                    f"{image_folder}"
                )
                report.add("image_outside_folder", index, sample_id, detail)
            else:
                images.setdefault(path, []).append(index)
        problems = _conversation_problems(record)
        for kind, detail in problems:
            report.add(kind, index, sample_id, detail)
        if not problems:
            well_formed.append(index)

    if images and not os.path.isdir(image_folder):
        raise DataFileError(
            f"`image_folder` (`--images`) {str(image_folder)!r} is not a folder, and "
            f"{len(images)} distinct image path(s) are relative to it. Pass the folder the `image` "
            "paths are relative to (`llava_images/` for llava_v1_5_mix665k.json)."
        )
    report.images_checked = len(images)
    image_findings: list[tuple[str, int, str]] = []
    with ThreadPoolExecutor(max_workers=workers or min(32, (os.cpu_count() or 1) * 4)) as pool:
        results = _map_in_window(pool, lambda path: _image_problem(path, decode_images), images)
        desc = "decoding images" if decode_images else "finding images"
        pairs = zip(images, results, strict=True)
        for path, problem in _progress(pairs, len(images), desc, progress):
            if problem is not None:
                image_findings.extend((problem[0], index, problem[1]) for index in images[path])
    for kind, index, detail in sorted(image_findings, key=lambda finding: finding[1]):
        report.add(kind, index, ids[index], detail)

    if tokenizer is not None:
        report.lengths_checked = True
        job = dict(
            tokenizer=tokenizer,
            max_length=max_length,
            dataset_map_fn=dataset_map_fn,
            template_map_fn=template_map_fn,
            image_tokens=image_tokens,
        )
        counts = _answer_counts(
            [(index, records[index]) for index in well_formed], job, tokenize_workers, progress
        )
        for index, kept in counts:
            if kept == 0:
                report.add("too_long", index, ids[index], f"0 answer tokens within {max_length}")
    for found in report.findings.values():
        found.sort(key=lambda finding: finding.index)
    report.seconds = time.perf_counter() - start
    return report


def check_data(
    data_path: str | os.PathLike, image_folder: str | os.PathLike, **kwargs: Any
) -> DataReport:
    """`check_records(load_records(data_path), image_folder, **kwargs)`."""
    return check_records(load_records(data_path), image_folder, **kwargs)
