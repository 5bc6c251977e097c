"""Preference data for ε-DPO: from a dataset name to tokenized pairs.

    load_splits      a Hub id, a JSON/JSONL/Parquet file, a folder of them or a save_to_disk folder -> rows
    check_row        what is wrong with a row, naming the field
    load_tokenizer   a model's tokenizer, with EOS and a pad token
    tokenize_pair    one row -> prompt_ids, chosen_ids, rejected_ids (usable on its own, like TRL's tokenize_row)
    tokenize_rows    every row of a split: the usable pairs, and the rows left out and why
    load_gold_reward a task's score(prompt, completion), for evaluation (tiny_data/gold_reward.py)

and batches.py: pairs -> the micro-batches of a step, collated.

Formats (as TRL's DPOTrainer takes them): standard rows hold "prompt", "chosen" and "rejected" strings, the
completions without the prompt; conversational rows hold lists of {"role", "content"} messages that the
tokenizer's chat template renders, either an explicit "prompt" or whole conversations whose messages before
the last one are the prompt. An optional "noisy" (true, false or null) marks pairs known to be mislabelled.

Tokenization follows the DPO authors' code and TRL: prompt + completion are tokenized as one text, so the
model is trained on the ids it sees at inference; the prompt is truncated (from the left, BOS kept) only
when the pair does not fit in max_length, and then the completions (from the right).
"""

import json
import math
import numbers
import pathlib
import re

import torch

from training.arguments import TINY_DATASET, TINY_GOLD_REWARD
from training.errors import ReportedError
from training.signals import StopAtOnce, StopNow

SUFFIXES = (".json", ".jsonl", ".parquet")  # the files read, in any case (train.JSONL too)
# The split a file in a dataset folder belongs to, by a word of its path (datasets' own convention).
SPLIT_WORDS = {
    "train": {"train", "training"},
    "validation": {"validation", "valid", "val", "dev"},
    "test": {"test", "testing", "eval", "evaluation"},
}
HELD_OUT = ("test", "validation", "valid")  # the held-out split when --eval-split is not given


# ----------------------------------------------------------------------------------------------------
# Loading: every row with where it came from ("pairs.jsonl, line 8"), read as it is, never converted


def load_splits(dataset, train_split="train", eval_split=None, eval_fraction=0.05, seed=0):
    """(train rows, held-out rows, notes): rows are lists of (where, row); notes say what was not loaded.

    The held-out rows are eval_split, which must exist when named; with eval_split None, the first of the splits
    HELD_OUT ("test", "validation", "valid") the dataset has (other than train_split), else a seeded eval_fraction
    of train_split; a note names the splits left unused.
    Local JSON, JSON Lines and Parquet files are read here, without a schema, so that a value of the wrong
    type reaches check_row as it is (a loader that unifies types would turn the number 0 into "0").
    """
    if eval_split == train_split:
        raise ReportedError(
            f"--eval-split {eval_split} is the training split: held-out metrics would be "
            f"measured on the data trained on. Name another split, or none to hold out "
            f"--eval-fraction of {train_split}"
        )
    path, notes = pathlib.Path(dataset).expanduser(), []
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise ReportedError(f"--dataset {path}: expected a .json, .jsonl or .parquet file")
        splits = {train_split: _read_rows(path)}
    elif path.is_dir() and not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        splits, notes = _read_folder(path)
    elif path.is_dir() or not _looks_local(dataset):
        splits = _load_with_datasets(dataset, path)  # a save_to_disk folder, or a Hub id
    else:
        raise ReportedError(f"--dataset {dataset}: no such file or folder")
    if train_split not in splits:
        raise ReportedError(f"--dataset {dataset} has no split {train_split!r} (it has {sorted(splits)})")
    if eval_split is not None and eval_split not in splits:  # a typo must not hold out train rows
        raise ReportedError(
            f"--dataset {dataset} has no split {eval_split!r} for --eval-split (it has {sorted(splits)}); "
            f"leave --eval-split out to hold out --eval-fraction of {train_split}"
        )
    eval_split = eval_split or next((name for name in HELD_OUT if name in splits and name != train_split), None)
    unused = sorted(set(splits) - {train_split, eval_split})
    if unused:
        notes.append(
            f"--dataset {dataset}: its split{'s' * (len(unused) > 1)} {', '.join(map(repr, unused))} "
            f"{'are' if len(unused) > 1 else 'is'} not used (--eval-split NAME holds one out)"
        )
    if eval_split in splits:
        return splits[train_split], splits[eval_split], notes
    rows = splits[train_split]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[: max(1, int(eval_fraction * len(rows)))])
    return (
        [row for i, row in enumerate(rows) if i not in held_out],
        [row for i, row in enumerate(rows) if i in held_out],
        notes,
    )


def _looks_local(name):
    path = pathlib.Path(name).expanduser()
    return (
        name.startswith((".", "/", "~"))
        or path.suffix.lower() in SUFFIXES
        or (len(path.parts) > 1 and pathlib.Path(path.parts[0]).exists())
    )


def _read_folder(folder):
    """The rows of every data file in a folder, by split, and a note naming the files not loaded."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    data_files = [p for p in files if p.suffix.lower() in SUFFIXES]

    def split_of(file):
        words = set(re.split(r"[-._ 0-9]+", str(file.relative_to(folder).with_suffix("")).replace("/", " ")))
        return next((split for split, aliases in SPLIT_WORDS.items() if words & aliases), None)

    by_split = {}
    for file in data_files:
        by_split.setdefault(split_of(file), []).append(file)
    if list(by_split) == [None]:  # no file names a split: all are train
        by_split = {"train": by_split[None]}
    not_loaded = [p for p in files if p not in data_files] + by_split.pop(None, [])
    if not by_split:
        raise ReportedError(f"--dataset {folder}: no .json, .jsonl or .parquet file in it")
    notes = []
    if not_loaded:
        names = ", ".join(str(p.relative_to(folder)) for p in not_loaded[:10])
        more = f" and {len(not_loaded) - 10} more" if len(not_loaded) > 10 else ""
        notes.append(f"not loaded from {folder} (not .json, .jsonl or .parquet, or in no split): {names}{more}")
    return {
        split: [row for file in split_files for row in _read_rows(file)] for split, split_files in by_split.items()
    }, notes


class Unreadable:
    """A line that is not text (not UTF-8): a row check_row refuses, naming why, and --skip-invalid drops."""

    def __init__(self, reason):
        self.reason = reason


def _not_utf8(raw, error):
    return f"not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})"


def _read_rows(path):
    """(where, row) for every row of a .jsonl, .json or .parquet file; where names the file and the line. UTF-8, a
    byte-order mark at its start allowed; a line that is not UTF-8 is a row of its own (Unreadable)."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet

            return [
                (f"{path}, row {number}", row)
                for number, row in enumerate(pyarrow.parquet.read_table(path).to_pylist(), start=1)
            ]
        raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # the BOM some editors write
    except Exception as error:  # unreadable, not Parquet
        raise ReportedError(
            f"{path}: could not be read ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"
        ) from None
    if path.suffix.lower() == ".json" and raw.decode("utf-8", "replace").lstrip().startswith("["):
        try:
            return _json_array_rows(raw.decode("utf-8"), path)
        except UnicodeDecodeError as error:  # one document: not a row to drop
            line = raw.count(b"\n", 0, error.start) + 1
            raise ReportedError(f"{path}, line {line}: not UTF-8 text (byte {raw[error.start]:#04x})") from None
    rows = []  # JSON Lines (a .json file may be too), split on line ends alone (U+2028 is text)
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as error:
            rows.append((f"{path}, line {number}", Unreadable(_not_utf8(line, error))))
            continue
        if line.strip():
            try:
                rows.append((f"{path}, line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ReportedError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            except RecursionError:
                raise ReportedError(f"{path}, line {number}: JSON nested too deeply to read") from None
    return rows


def _json_array_rows(text, path):
    """The elements of a JSON array, each with the line it starts on; the array must be all the file holds."""
    space, decoder, rows = re.compile(r"[ \t\n\r]*"), json.JSONDecoder(), []
    position = space.match(text, text.index("[") + 1).end()
    line, counted_to = 1, 0
    try:
        while text[position] != "]":
            line, counted_to = line + text.count("\n", counted_to, position), position
            row, end = decoder.raw_decode(text, position)
            rows.append((f"{path}, line {line}", row))
            position = space.match(text, end).end()
            if text[position] == ",":
                position = space.match(text, position + 1).end()
            elif text[position] != "]":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
        if text[position + 1 :].strip():  # a second array, or any other text
            raise json.JSONDecodeError(
                "more text after the array; a .json file holds one array, or JSON Lines",
                text,
                space.match(text, position + 1).end(),
            )
    except (json.JSONDecodeError, IndexError) as error:
        where = text.count("\n", 0, getattr(error, "pos", len(text))) + 1
        raise ReportedError(
            f"{path}, line {where}: not valid JSON ({getattr(error, 'msg', 'unexpected end')})"
        ) from None
    except RecursionError:  # in the row that starts on `line`
        raise ReportedError(f"{path}, line {line}: JSON nested too deeply to read") from None
    return rows


def _load_with_datasets(dataset, path):
    """A save_to_disk folder or a Hub dataset, through the datasets library: {split: [(where, row)]}."""
    from datasets import Dataset, load_dataset, load_from_disk

    try:
        splits = load_from_disk(str(path)) if path.is_dir() else load_dataset(dataset)
    except Exception as error:  # datasets' own errors, in one line
        message = str(error).splitlines()[0] if str(error) else ""
        raise ReportedError(f"--dataset {dataset}: could not be loaded ({type(error).__name__}: {message})") from None
    if isinstance(splits, Dataset):
        splits = {"train": splits}
    return {
        split: [(f"{dataset} (split {split}), row {number}", row) for number, row in enumerate(rows.to_list(), start=1)]
        for split, rows in splits.items()
    }


# ----------------------------------------------------------------------------------------------------
# Checking and rendering one row


def _is_messages(value):
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def check_row(row):
    """Raise ValueError naming the field if the row is not a preference pair of one of the two formats."""
    if isinstance(row, Unreadable):
        raise ValueError(row.reason)
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with prompt, chosen and rejected, not {type(row).__name__}")
    for field in ("chosen", "rejected"):
        value = row.get(field)
        if value is None:
            raise ValueError(f"field {field!r} is missing")
        if not (isinstance(value, str) or _is_messages(value)):
            raise ValueError(f"field {field!r} must be a string or a list of messages, not {_describe(value)}")
        if not (value if isinstance(value, str) else value[-1]["content"] if value else "").strip():
            raise ValueError(f"field {field!r} is empty")
    if isinstance(row["chosen"], str) != isinstance(row["rejected"], str):
        raise ValueError("fields 'chosen' and 'rejected' must both be strings or both lists of messages")
    prompt = row.get("prompt")
    if prompt is None and not (isinstance(row["chosen"], list) and len(row["chosen"]) > 1):
        raise ValueError("field 'prompt' is missing")
    if prompt is not None and not (isinstance(prompt, str) or _is_messages(prompt)):
        raise ValueError(f"field 'prompt' must be a string or a list of messages, not {_describe(prompt)}")
    if isinstance(prompt, list) and isinstance(row["chosen"], str):
        raise ValueError("field 'prompt' is a list of messages but 'chosen' and 'rejected' are strings")
    if row.get("noisy") is not None and not isinstance(row["noisy"], bool):  # not even 0 or 1
        raise ValueError(f"field 'noisy' must be true, false or null, not {_describe(row['noisy'])}")
    for field in ("prompt", "chosen", "rejected"):  # "\ud800" is valid JSON, but no text: no tokenizer takes it
        value = row.get(field)
        for text in [value] if isinstance(value, str) else [v for m in value or [] for v in m.values()]:
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise ValueError(
                        f"field {field!r} holds a lone surrogate ({text[error.start]!r}, character "
                        f"{error.start + 1}), which is not text"
                    ) from None
    for field in ("chosen", "rejected"):
        if prompt is not None and _repeats(prompt, row[field]):
            raise ValueError(
                f"field {field!r} repeats the prompt: a completion holds what follows the prompt alone "
                f"(or leave 'prompt' out and give whole conversations)"
            )


def _repeats(prompt, completion):
    """The completion starts with the whole prompt (as in some copies of UltraFeedback): its text, or its messages."""
    if isinstance(completion, str):
        return bool(prompt.strip()) and completion.lstrip().startswith(prompt.strip())
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return len(completion) > len(messages) and [
        (m["role"], m["content"].strip()) for m in completion[: len(messages)]
    ] == [(m["role"], m["content"].strip()) for m in messages]


def _describe(value):
    return f"{type(value).__name__} {value!r}"[:60]


def render(row, tokenizer):
    """(prompt, chosen, rejected) as text, and whether tokenizing them adds the tokenizer's special tokens.

    Standard rows are their own text. Conversational rows are rendered with the chat template, which
    writes the special tokens itself: the completion is what the template adds after the prompt. A
    message holding the text of a special token ("</s>") is refused: in the rendered text it could not be
    told from the template's own markup, and would become the token itself.
    """
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str):
        return prompt, chosen, rejected, True
    if prompt is None:  # whole conversations: the prompt is what they share
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("fields 'chosen' and 'rejected' differ before their last message (the prompt)")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template is None:
        raise ValueError("a conversational row, but the tokenizer has no chat template to render it")
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    }
    for field, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        for message in messages:
            token = next((token for token in special if token in message["content"]), None)
            if token is not None:
                raise ValueError(
                    f"field {field!r} holds the text {token!r}, a special token of the tokenizer: in a "
                    f"conversation it would become that token (the standard format keeps it as text)"
                )
    prompt_text = _apply_chat_template(tokenizer, prompt, add_generation_prompt=True)
    completions = []
    for completion in (chosen, rejected):
        conversation = _apply_chat_template(tokenizer, prompt + completion)
        if not conversation.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as the start of the conversation")
        completions.append(conversation[len(prompt_text) :])
    return prompt_text, completions[0], completions[1], False


def _apply_chat_template(tokenizer, messages, **options):
    """The chat template's text of messages. A template that refuses the row (raise_exception) or fails on it (a
    TypeError of its code, say) is the row's fault (ValueError); one that cannot be parsed is the tokenizer's
    (ReportedError)."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except TemplateSyntaxError as error:
        raise ReportedError(
            f"--model {tokenizer.name_or_path}: its chat template, line {error.lineno}: {error.message}"
        ) from None
    except TemplateError as error:
        raise ValueError(f"the chat template refused it: {error}") from None
    except Exception as error:  # the template's own code failed on this row
        raise ValueError(
            f"the chat template failed on it ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})"
        ) from None


# ----------------------------------------------------------------------------------------------------
# Tokenizing: ids like the text, truncation only when the pair does not fit


def load_tokenizer(name, trust_remote_code=False, model=None):
    """The tokenizer of a model (a Hub id or a folder), with EOS to end completions and a pad token. model: --model
    as given, when the tokenizer is its adapter's base's (a problem is reported under it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as error:
        where = f"--model {model}: its base {name}" if model not in (None, name) else f"--model {name}"
        raise ReportedError(f"{where}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ReportedError(f"--model {name}: its tokenizer has no EOS token, which must end every completion")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out anyway
    return tokenizer


def tokenize_pair(row, tokenizer, max_length, max_prompt_length):
    """Token ids of one preference pair, as the model sees the whole text prompt + completion.

    Returns {"prompt_ids", "chosen_ids", "rejected_ids"} (lists of ints) and, for the caller's report,
    "prompt" (the prompt's text), "boundary_moved" and "truncated". Raises ValueError naming the field
    for a malformed row.

    - prompt_ids + chosen_ids are the ids of the text prompt + chosen as the tokenizer encodes it (its BOS
      included), and the same for rejected. Where the tokenizer merges tokens across the boundary (a BPE
      tokenizer makes "ĠThe" of the prompt's trailing space and the completion's "The"), the prompt is the
      part the three encodings share, and boundary_moved is True.
    - Each completion ends with EOS exactly once (a chat template may already close the turn with it).
    - A standard row's text is text: "</s>" in it is the four characters, never EOS (the tokenizer's
      split_special_tokens); only the BOS and EOS added here are special. Conversational rows: see render().
    - Only when prompt + the longer completion exceeds max_length: the prompt keeps its last
      max_prompt_length tokens after its leading special tokens (BOS), then the completions are cut from
      the right to what is left. Since max_prompt_length < max_length, every completion keeps a token.
    """
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be at least 1 and less than max_length ({max_length})"
        )
    check_row(row)
    prompt, chosen, rejected, add_special_tokens = render(row, tokenizer)

    def encode(text):
        return tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=add_special_tokens)[
            "input_ids"
        ]

    prompt_alone, chosen_whole, rejected_whole = encode(prompt), encode(prompt + chosen), encode(prompt + rejected)
    shared = 0
    while shared < len(prompt_alone) and prompt_alone[shared] == chosen_whole[shared] == rejected_whole[shared]:
        shared += 1
    if shared == 0:
        raise ValueError("field 'prompt' has no token of its own before the completion")
    prompt_ids = prompt_alone[:shared]
    chosen_ids = _ending_with_eos_once(chosen_whole[shared:], tokenizer.eos_token_id)
    rejected_ids = _ending_with_eos_once(rejected_whole[shared:], tokenizer.eos_token_id)

    truncated = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length
    if truncated:
        if len(prompt_ids) > max_prompt_length:
            special = set(tokenizer.all_special_ids)
            lead = 0
            while lead < max_prompt_length - 1 and prompt_ids[lead] in special:
                lead += 1  # BOS (and the like) stays in front
            prompt_ids = prompt_ids[:lead] + prompt_ids[len(prompt_ids) - (max_prompt_length - lead) :]
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "prompt": prompt,
        "boundary_moved": shared < len(prompt_alone),
        "truncated": truncated,
    }


def _ending_with_eos_once(ids, eos_token_id):
    if eos_token_id in ids:  # a chat template closed the turn: drop what follows ("\n")
        return ids[: len(ids) - ids[::-1].index(eos_token_id)]
    return ids + [eos_token_id]


def tokenize_rows(rows, tokenizer, max_length, max_prompt_length, skip_invalid=False, dropped=None):
    """(pairs, skipped, boundary_moved) for rows of (where, row).

    pairs: what tokenize_pair returns, plus "noisy". skipped: {reason: count} for rows never trained
    (the README promises they are reported). boundary_moved: how many pairs had their prompt/completion
    boundary moved by the tokenizer. A malformed row stops everything with a message naming where it is
    and the field, unless skip_invalid; then dropped (a list) gets (where, why) of each row it drops.
    """
    pairs, skipped, boundary_moved = [], {}, 0

    def skip(reason):
        skipped[reason] = skipped.get(reason, 0) + 1

    for where, row in rows:
        try:
            pair = tokenize_pair(row, tokenizer, max_length, max_prompt_length)
        except ValueError as error:
            if not skip_invalid:
                raise ReportedError(f"{where}: {error} (--skip-invalid drops such rows)") from None
            skip("invalid (--skip-invalid)")
            if dropped is not None:
                dropped.append((where, str(error)))
            continue
        if row["chosen"] == row["rejected"]:
            skip("chosen identical to rejected")
        elif pair["chosen_ids"] == pair["rejected_ids"]:
            skip(
                "identical once truncated to --max-length"
                if pair["truncated"]
                else "chosen and rejected tokenize alike"
            )
        else:
            boundary_moved += pair["boundary_moved"]
            pairs.append({**pair, "noisy": row.get("noisy")})
    return pairs, skipped, boundary_moved


def load_pairs(
    dataset,
    train_split,
    eval_split,
    eval_fraction,
    seed,
    tokenizer,
    max_length,
    max_prompt_length,
    skip_invalid=False,
    least=1,
):
    """The train and held-out pairs of a dataset, tokenized: {"pairs": {"train", "eval"}, "skipped", "boundary_moved",
    "notes"}, the last three for the report of what was left out or changed. At least `least` train pairs and one
    held-out pair, or ReportedError."""
    train_rows, eval_rows, notes = load_splits(dataset, train_split, eval_split, eval_fraction, seed)
    dropped = {"train": [], "eval": []}
    tokenized = {
        split: tokenize_rows(rows, tokenizer, max_length, max_prompt_length, skip_invalid, dropped[split])
        for split, rows in (("train", train_rows), ("eval", eval_rows))
    }
    for split, rows in dropped.items():  # each row --skip-invalid dropped, and why
        if rows:
            listed = "; ".join(f"{where}: {why}" for where, why in rows[:10])
            more = f"; and {len(rows) - 10} more" if len(rows) > 10 else ""
            notes.append(f"--skip-invalid dropped {len(rows)} {split} rows: {listed}{more}")
    pairs = {split: pairs for split, (pairs, _, _) in tokenized.items()}
    if len(pairs["train"]) < least or not pairs["eval"]:
        skipped = ", ".join(
            f"{count} {split} rows: {reason}"
            for split, (_, reasons, _) in tokenized.items()
            for reason, count in reasons.items()
        )
        raise ReportedError(
            f"--dataset {dataset}: {len(pairs['train'])} usable train pairs and {len(pairs['eval'])} "
            f"held-out pairs; need at least a step's pairs (--batch-size × --grad-accum × processes, "
            f"{least}) and 1" + (f"; skipped {skipped}" if skipped else "")
        )
    return {
        "pairs": pairs,
        "skipped": {split: skipped for split, (_, skipped, _) in tokenized.items()},
        "boundary_moved": {split: moved for split, (_, _, moved) in tokenized.items()},
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------------
# The gold reward: a task's own score of a completion, which evaluation gives to samples of the policy


def gold_reward_path(args):
    """The gold reward a run scores its samples with: --gold-reward, else for tiny_data its own; None: none."""
    if args.gold_reward:
        return args.gold_reward
    return str(TINY_GOLD_REWARD) if pathlib.Path(args.dataset).resolve() == TINY_DATASET else None


def load_gold_reward(path):
    """score(prompt, completion) -> float from a Python file (None for None). It runs the file's code: only
    ever for a file the user named on the command line, or tiny_data's own."""
    import importlib.util

    if path is None:
        return None
    if not pathlib.Path(path).is_file():
        raise ReportedError(f"--gold-reward {path}: no such file")
    if pathlib.Path(path).suffix != ".py":
        raise ReportedError(
            f"--gold-reward {path}: expected a Python file (.py) that defines score(prompt, completion)"
        )
    try:
        spec = importlib.util.spec_from_file_location("gold_reward", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ReportedError(f"--gold-reward {path}, line {error.lineno}: {error.msg}") from None
    except (StopNow, StopAtOnce):  # Ctrl-C or SIGTERM: the run's to handle
        raise
    except BaseException as error:  # sys.exit() or a KeyboardInterrupt of its own is its failure, not a stop
        raise ReportedError(f"--gold-reward {path}: running it raised {type(error).__name__}: {error}") from None
    if not callable(getattr(module, "score", None)):
        raise ReportedError(f"--gold-reward {path}: it defines no function score(prompt, completion)")
    return module.score


def gold_score(gold_reward, prompt, completion):
    """gold_reward(prompt, completion), which must be a finite number."""
    try:
        value = gold_reward(prompt, completion)
    except (StopNow, StopAtOnce):  # Ctrl-C or SIGTERM: the run's to handle
        raise
    except BaseException as error:  # sys.exit() or a KeyboardInterrupt of its own is its failure, not a stop
        raise ReportedError(f"--gold-reward: score() raised {type(error).__name__}: {error}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ReportedError(f"--gold-reward: score() returned {value!r} for {completion!r}, not a finite number")
    return float(value)
