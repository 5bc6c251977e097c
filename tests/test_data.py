"""The data: training/data.py and training/batches.py. Rows are read as they are and named by file and line, token
ids are those of the whole text, truncation happens only when a pair does not fit, bad columns stop the run before
training, and a step's pairs do not depend on how processes and micro-batches share it."""

import json

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.helpers import tiny_llama
from training import batches, data, errors
from training.arguments import TINY_DATASET, TINY_MODEL, parse_args

KETTLE = {"prompt": "Review of the kettle: ", "chosen": "The price is great.", "rejected": "The price is poor."}


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (the kind every real LLM has), trained here on a few sentences: BOS in front,
    and a chat template that closes every turn with EOS and a newline, as Qwen's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [
        "Review of the kettle: The price is great. The price is poor. The fit is very good.",
        "user assistant Write about the lamp and the chair, please.",
    ] * 20
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<s>", "<|im_end|>", "<pad>", "<|im_start|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    wrapped.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return wrapped


def ids(tokenizer, text, **kwargs):
    return tokenizer(text, **kwargs)["input_ids"]


# ----------------------------------------------------------------------------------------------------
# Ids like the text; a special token's text is text


def test_ids_are_the_whole_texts_where_bpe_merges_across_the_boundary(bpe_tokenizer):
    pair = data.tokenize_pair(KETTLE, bpe_tokenizer, max_length=512, max_prompt_length=256)
    eos = bpe_tokenizer.eos_token_id
    for completion in ("chosen", "rejected"):
        whole = ids(bpe_tokenizer, KETTLE["prompt"] + KETTLE[completion])
        assert pair["prompt_ids"] + pair[f"{completion}_ids"] == whole + [eos]
    # Tokenized alone, the prompt ends in a lone "Ġ"; in the whole text that space is part of "ĠThe".
    alone = ids(bpe_tokenizer, KETTLE["prompt"])
    assert bpe_tokenizer.convert_ids_to_tokens(alone[-1:]) == ["Ġ"] and pair["prompt_ids"] == alone[:-1]
    assert bpe_tokenizer.convert_ids_to_tokens(pair["chosen_ids"][:1]) == ["ĠThe"]
    assert pair["boundary_moved"] and pair["prompt_ids"][0] == bpe_tokenizer.bos_token_id


def test_without_a_merge_the_prompt_is_the_prompt_alone(bpe_tokenizer):
    row = {**KETTLE, "prompt": "Review of the kettle:", "chosen": " The price is great."}
    pair = data.tokenize_pair(row, bpe_tokenizer, 512, 256)
    assert pair["prompt_ids"] == ids(bpe_tokenizer, "Review of the kettle:") and not pair["boundary_moved"]


def test_boundary_moves_are_counted(bpe_tokenizer):
    rows = [("a, line 1", KETTLE), ("a, line 2", {**KETTLE, "prompt": "Review of the kettle:", "chosen": " The fit."})]
    pairs, skipped, boundary_moved = data.tokenize_rows(rows, bpe_tokenizer, 512, 256)
    assert (len(pairs), skipped, boundary_moved) == (2, {}, 1)


def test_conversational_ids_are_the_chat_templates_ids_with_eos_once(bpe_tokenizer):
    prompt = [{"role": "user", "content": "Write about the lamp, please."}]
    chosen = [{"role": "assistant", "content": "The lamp is very good."}]
    rejected = [{"role": "assistant", "content": "The lamp is poor."}]
    eos = bpe_tokenizer.eos_token_id
    for row in (
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},  # explicit prompt
        {"chosen": prompt + chosen, "rejected": prompt + rejected},
    ):  # whole conversations
        pair = data.tokenize_pair(row, bpe_tokenizer, 512, 256)
        whole = bpe_tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
        whole_ids = ids(bpe_tokenizer, whole, add_special_tokens=False)
        assert whole_ids[-2:] == [eos, ids(bpe_tokenizer, "\n", add_special_tokens=False)[0]]  # "<|im_end|>\n"
        assert pair["prompt_ids"] + pair["chosen_ids"] == whole_ids[:-1]  # up to EOS, once
        assert pair["chosen_ids"].count(eos) == 1 and pair["rejected_ids"][-1] == eos
        assert pair["prompt_ids"] == ids(
            bpe_tokenizer,
            bpe_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )


def test_a_prompt_of_word_tokens_gets_bos_and_each_completion_eos_once():
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    row = {"prompt": "Review of the lamp:", "chosen": " The fit is great.", "rejected": " The fit is poor."}
    pair = data.tokenize_pair(row, tokenizer, 64, 32)
    assert (
        pair["prompt_ids"] == ids(tokenizer, "Review of the lamp:") and pair["prompt_ids"][0] == tokenizer.bos_token_id
    )
    assert tokenizer.decode(pair["chosen_ids"]) == "the fit is great . </s>"


@pytest.mark.parametrize("which", ["word-level (tiny_data)", "byte-level BPE"])
def test_a_special_tokens_text_in_a_standard_row_is_text_not_the_token(bpe_tokenizer, which):
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL) if which.startswith("word") else bpe_tokenizer
    eos = tokenizer.eos_token
    row = {
        "prompt": f"Review of the {eos} kettle: ",
        "chosen": f"The price is great.{eos} The price is poor.",
        "rejected": f"The price is great.{eos} The fit is very good.",
    }
    pair = data.tokenize_pair(row, tokenizer, 512, 256)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # the word-level one spells "</s>" <unk> × 3
    # Only the tokenizer's own BOS and the one EOS that ends each completion are special tokens ...
    assert [i for i in pair["prompt_ids"] if i in special] == [tokenizer.bos_token_id]
    for completion in ("chosen", "rejected"):
        assert [i for i in pair[f"{completion}_ids"] if i in special] == [tokenizer.eos_token_id]
        assert pair[f"{completion}_ids"][-1] == tokenizer.eos_token_id
    assert pair["chosen_ids"] != pair["rejected_ids"]  # not cut at "</s>" into a tie
    if which == "byte-level BPE":  # ... and the text comes back whole
        assert tokenizer.decode(pair["prompt_ids"][1:] + pair["chosen_ids"][:-1]) == row["prompt"] + row["chosen"]


def test_a_special_tokens_text_in_a_message_is_refused_the_markup_is_not(
    bpe_tokenizer,
):
    prompt = [{"role": "user", "content": "Write about the lamp, please."}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "The lamp.<|im_end|> Poor."}],
        "rejected": [{"role": "assistant", "content": "The lamp is poor."}],
    }
    with pytest.raises(ValueError, match="field 'chosen' holds the text '<|im_end|>', a special token"):
        data.tokenize_pair(row, bpe_tokenizer, 512, 256)
    pair = data.tokenize_pair(
        {**row, "chosen": [{"role": "assistant", "content": "The lamp is good."}]}, bpe_tokenizer, 512, 256
    )
    im_start, im_end = bpe_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert pair["prompt_ids"].count(im_start) == 2 and pair["prompt_ids"].count(im_end) == 1
    assert pair["chosen_ids"][-1] == im_end


# ----------------------------------------------------------------------------------------------------
# Truncation only when the pair does not fit


def test_a_long_prompt_is_kept_whole_when_the_pair_fits(bpe_tokenizer):
    row = {**KETTLE, "prompt": "Review of the kettle: " + "the price is great " * 60 + "Now:"}
    prompt_ids = ids(bpe_tokenizer, row["prompt"])
    assert len(prompt_ids) > 256
    pair = data.tokenize_pair(row, bpe_tokenizer, max_length=512, max_prompt_length=256)
    assert pair["prompt_ids"][0] == bpe_tokenizer.bos_token_id and not pair["truncated"]
    assert len(pair["prompt_ids"]) == len(prompt_ids) - pair["boundary_moved"]


def test_a_pair_too_long_cuts_the_prompt_after_bos_then_the_completions(bpe_tokenizer):
    row = {
        **KETTLE,
        "prompt": "Review of the kettle: " + "the price is great " * 60 + "Now:",
        "chosen": " The price is great." * 30,
    }
    whole = data.tokenize_pair(row, bpe_tokenizer, 10_000, 9_000)
    pair = data.tokenize_pair(row, bpe_tokenizer, max_length=100, max_prompt_length=40)
    assert pair["truncated"]
    assert pair["prompt_ids"] == whole["prompt_ids"][:1] + whole["prompt_ids"][-39:]  # BOS, then the last 39
    assert pair["chosen_ids"] == whole["chosen_ids"][:60]  # cut from the right
    assert pair["rejected_ids"] == whole["rejected_ids"]  # short enough already


def test_pairs_made_identical_by_truncation_are_skipped_and_counted(bpe_tokenizer):
    rows = [
        (
            "f, line 1",
            {
                **KETTLE,
                "chosen": " The price is great and the fit is poor.",
                "rejected": " The price is great and the fit is good.",
            },
        ),
        ("f, line 2", {**KETTLE, "rejected": KETTLE["chosen"]}),
        ("f, line 3", KETTLE),
    ]
    pairs, skipped, _ = data.tokenize_rows(rows, bpe_tokenizer, max_length=12, max_prompt_length=6)
    assert skipped == {"identical once truncated to --max-length": 1, "chosen identical to rejected": 1}
    (pair,) = pairs
    assert len(pair["prompt_ids"]) + len(pair["chosen_ids"]) <= 12 and pair["chosen_ids"] != pair["rejected_ids"]


def test_max_prompt_length_must_leave_room_for_a_completion(bpe_tokenizer):
    with pytest.raises(ValueError, match=r"max_prompt_length \(8\) must be at least 1 and less than max_length \(8\)"):
        data.tokenize_pair(KETTLE, bpe_tokenizer, 8, 8)
    with pytest.raises(SystemExit):
        parse_args(["--max-length", "64", "--max-prompt-length", "64"])


# ----------------------------------------------------------------------------------------------------
# Rows checked before training, named by file and line


@pytest.mark.parametrize(
    "change, message",
    [
        ({"chosen": None}, "field 'chosen' is missing"),
        ({"chosen": 5}, "field 'chosen' must be a string or a list of messages, not int 5"),
        ({"rejected": "  "}, "field 'rejected' is empty"),
        ({"prompt": None}, "field 'prompt' is missing"),
        ({"prompt": [{"role": "user", "content": "Hi"}]}, "field 'prompt' is a list of messages but"),
        ({"chosen": [{"role": "assistant", "content": "Ok"}]}, "must both be strings or both lists of messages"),
        ({"noisy": "yes"}, "field 'noisy' must be true, false or null, not str 'yes'"),
        ({"noisy": [1]}, "field 'noisy' must be true, false or null, not list [1]"),
        ({"noisy": 1}, "field 'noisy' must be true, false or null, not int 1"),
    ],
)
def test_a_malformed_row_raises_a_value_error_naming_the_field(bpe_tokenizer, change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        data.tokenize_pair({**KETTLE, **change}, bpe_tokenizer, 512, 256)


def test_rows_are_named_by_the_files_line_numbers(tmp_path, bpe_tokenizer):
    good = json.dumps(KETTLE)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(f"{good}\n\n{good}\n\n\n{good}\n\n" + json.dumps({**KETTLE, "noisy": "yes"}) + "\n")
    array = tmp_path / "pairs.json"
    array.write_text("[\n  " + good + ',\n\n  {"prompt": "Review:",\n   "chosen": 7, "rejected": "Bad."}\n]\n')
    for path, line, field in ((jsonl, 8, "'noisy'"), (array, 4, "'chosen'")):
        train_rows, eval_rows, _ = data.load_splits(str(path), eval_fraction=0.01)
        rows = sorted(train_rows + eval_rows, key=lambda r: int(r[0].rsplit(" ", 1)[1]))
        with pytest.raises(errors.ReportedError, match=f"^{path}, line {line}: field {field}"):
            data.tokenize_rows(rows, bpe_tokenizer, 512, 256)


def test_a_completion_that_repeats_the_prompt_is_refused_with_that_reason(bpe_tokenizer):
    user = [{"role": "user", "content": "Write about the lamp, please."}]
    answer = [{"role": "assistant", "content": "The lamp is good."}]
    for row, field in (
        ({**KETTLE, "chosen": KETTLE["prompt"] + KETTLE["chosen"]}, "chosen"),  # standard text
        ({**KETTLE, "rejected": KETTLE["prompt"] + KETTLE["rejected"]}, "rejected"),
        ({"prompt": user[0]["content"], "chosen": user + answer, "rejected": answer}, "chosen"),
        ({"prompt": user, "chosen": answer, "rejected": user + answer}, "rejected"),
    ):  # messages
        with pytest.raises(ValueError, match=f"field '{field}' repeats the prompt"):
            data.tokenize_pair(row, bpe_tokenizer, 512, 256)
    data.tokenize_pair(
        {"chosen": user + answer, "rejected": user + [{"role": "assistant", "content": "Poor."}]},
        bpe_tokenizer,
        512,
        256,
    )  # whole conversations without a prompt: as before


def test_a_raising_template_is_the_rows_fault_an_unparsable_one_is_not(bpe_tokenizer, monkeypatch):
    conversation = {
        "prompt": [{"role": "user", "content": "Write about the lamp."}],
        "chosen": [{"role": "assistant", "content": "Good."}],
        "rejected": [{"role": "assistant", "content": "Poor."}],
    }
    rows = [("a.jsonl, line 1", KETTLE), ("a.jsonl, line 2", conversation)]
    monkeypatch.setattr(bpe_tokenizer, "chat_template", "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(
        errors.ReportedError,
        match=r"^a.jsonl, line 2: the chat template refused it: Conversation roles must "
        r"alternate \(--skip-invalid drops such rows\)$",
    ):
        data.tokenize_rows(rows, bpe_tokenizer, 512, 256)
    pairs, skipped, _ = data.tokenize_rows(rows, bpe_tokenizer, 512, 256, skip_invalid=True)
    assert len(pairs) == 1 and skipped == {"invalid (--skip-invalid)": 1}
    monkeypatch.setattr(bpe_tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }{% endfor %}")
    for skip_invalid in (False, True):
        with pytest.raises(errors.ReportedError, match=r"^--model .*: its chat template, line 1: unexpected '}'$"):
            data.tokenize_rows(rows, bpe_tokenizer, 512, 256, skip_invalid=skip_invalid)


def test_a_chat_template_that_fails_with_a_python_error_is_the_rows_fault(bpe_tokenizer, monkeypatch):
    conversation = {
        "prompt": [{"role": "user", "content": "Write about the lamp."}],
        "chosen": [{"role": "assistant", "content": "Good."}],
        "rejected": [{"role": "assistant", "content": "Poor."}],
    }
    rows = [("a.jsonl, line 1", KETTLE), ("a.jsonl, line 2", conversation)]
    monkeypatch.setattr(bpe_tokenizer, "chat_template", "{{ messages[0]['content'] + 1 }}")  # str + int: TypeError
    with pytest.raises(
        errors.ReportedError,
        match=r"^a.jsonl, line 2: the chat template failed on it \(TypeError: .*\) "
        r"\(--skip-invalid drops such rows\)$",
    ):
        data.tokenize_rows(rows, bpe_tokenizer, 512, 256)
    pairs, skipped, _ = data.tokenize_rows(rows, bpe_tokenizer, 512, 256, skip_invalid=True)
    assert len(pairs) == 1 and skipped == {"invalid (--skip-invalid)": 1}


def test_when_every_pair_is_skipped_the_reasons_are_in_the_message(tmp_path, bpe_tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({**KETTLE, "rejected": KETTLE["chosen"]}) + "\n" for _ in range(10)))
    with pytest.raises(
        errors.ReportedError,
        match=r"0 usable train pairs and 0 held-out pairs; need at least a step's pairs .*; "
        r"skipped 9 train rows: chosen identical to rejected, 1 eval rows: chosen "
        r"identical to rejected$",
    ):
        data.load_pairs(str(path), "train", None, 0.1, 0, bpe_tokenizer, 512, 256)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """tiny_data's tokenizer, as train.py loads it."""
    return data.load_tokenizer(str(TINY_MODEL))


def tiny_row(line=0):
    """A row of tiny_data (its tokenizer's words), without its extra fields."""
    row = json.loads((TINY_DATASET / "train.jsonl").read_text().splitlines()[line])
    return {field: row[field] for field in ("prompt", "chosen", "rejected")}


def test_a_lone_surrogate_is_named_in_one_line_and_skip_invalid_drops_it(tmp_path, tiny_tokenizer):
    """A lone surrogate ("\\ud800") is valid JSON but no text: it gave a tokenizers TypeError traceback, also with
    --skip-invalid and through a chat template. It is one line naming the row and the field, and --skip-invalid drops
    the row, saying why."""
    good = tiny_row()
    conversation = {
        "prompt": [{"role": "user", "content": good["prompt"]}],
        "chosen": [{"role": "assistant", "content": "fine \ud800"}],
        "rejected": [{"role": "assistant", "content": "poor"}],
    }
    rows = [good, {**good, "chosen": " The \ud800 price"}, conversation, good]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(errors.ReportedError) as refused:
        data.load_pairs(str(tmp_path), "train", None, 0.05, 0, tiny_tokenizer, 64, 32)
    assert str(refused.value) == (
        f"{tmp_path / 'train.jsonl'}, line 2: field 'chosen' holds a lone surrogate ('\\ud800', character 6), which "
        "is not text (--skip-invalid drops such rows)"
    )
    loaded = data.load_pairs(str(tmp_path), "train", None, 0.05, 0, tiny_tokenizer, 64, 32, skip_invalid=True)
    assert len(loaded["pairs"]["train"]) == 2
    assert f"{tmp_path / 'train.jsonl'}, line 3: field 'chosen' holds a lone surrogate" in loaded["notes"][0]


def test_non_utf8_is_named_and_skippable_a_bom_is_read_each_drop_says_why(tmp_path, tiny_tokenizer):
    """A byte that is not UTF-8 is named with its line, and --skip-invalid drops that line as any malformed row; a
    UTF-8 byte-order mark is read as the text it starts; the note of the rows dropped gives each one's reason, not
    only 'invalid'."""
    good = json.dumps(tiny_row()).encode()
    (tmp_path / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    (tmp_path / "train.jsonl").write_bytes(
        b"\n".join([b"\xef\xbb\xbf" + good, good[:-2] + b'\xff"}', good, b'{"prompt": "x", "rejected": "y"}', good])
    )
    with pytest.raises(errors.ReportedError) as refused:
        data.load_pairs(str(tmp_path), "train", None, 0.05, 0, tiny_tokenizer, 64, 32)
    assert str(refused.value).startswith(f"{tmp_path / 'train.jsonl'}, line 2: not UTF-8 text (byte 0xff at column")
    loaded = data.load_pairs(str(tmp_path), "train", None, 0.05, 0, tiny_tokenizer, 64, 32, skip_invalid=True)
    assert len(loaded["pairs"]["train"]) == 3 and len(loaded["pairs"]["eval"]) == 1
    assert loaded["skipped"]["train"] == {"invalid (--skip-invalid)": 2}
    assert loaded["notes"] == [
        f"--skip-invalid dropped 2 train rows: {tmp_path / 'train.jsonl'}, line 2: not UTF-8 text (byte 0xff at "
        f"column {len(good) - 1}); {tmp_path / 'train.jsonl'}, line 4: field 'chosen' is missing"
    ]


# ----------------------------------------------------------------------------------------------------
# Files, folders and splits


def test_a_folder_is_read_without_conversion_naming_files_not_loaded(tmp_path, bpe_tokenizer):
    import pyarrow
    import pyarrow.parquet

    rows = [KETTLE] * 6
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "train-00001.parquet")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({**KETTLE, "chosen": i}) + "\n" for i in range(3)))
    (tmp_path / "extra.csv").write_text("prompt,chosen,rejected\n")
    (tmp_path / "README.md").write_text("my notes\n")

    train_rows, eval_rows, notes = data.load_splits(str(tmp_path))
    assert len(train_rows) == 12 and len(eval_rows) == 3  # .jsonl and .parquet both read
    assert notes == [
        f"not loaded from {tmp_path} (not .json, .jsonl or .parquet, or in no split): README.md, extra.csv"
    ]
    with pytest.raises(
        errors.ReportedError,
        match=f"^{tmp_path / 'test.jsonl'}, line 1: field 'chosen' must be a string or a list of messages, not int 0",
    ):
        data.tokenize_rows(eval_rows, bpe_tokenizer, 512, 256)


def test_upper_case_suffixes_are_loaded_in_a_folder_and_as_a_single_file(tmp_path):
    (tmp_path / "train.JSONL").write_text(json.dumps(KETTLE) + "\n" + json.dumps(KETTLE) + "\n")
    (tmp_path / "test.Json").write_text("[" + json.dumps(KETTLE) + "]")
    train_rows, eval_rows, notes = data.load_splits(str(tmp_path))
    assert (len(train_rows), len(eval_rows), notes) == (2, 1, [])
    train_rows, eval_rows, _ = data.load_splits(str(tmp_path / "train.JSONL"))
    assert len(train_rows) + len(eval_rows) == 2


@pytest.mark.parametrize("after", ["\n[" + json.dumps(KETTLE) + "]\n", "\nmore notes\n", ",\n"])
def test_a_json_file_is_read_whole_or_refused_at_the_line_after_its_array(tmp_path, after):
    path = tmp_path / "pairs.json"
    path.write_text("[\n" + ",\n".join([json.dumps(KETTLE)] * 8) + "\n]" + after)
    with pytest.raises(errors.ReportedError, match=f"^{path}, line 1[01]: not valid JSON \\(more text after the array"):
        data.load_splits(str(path))
    path.write_text("[\n" + ",\n".join([json.dumps(KETTLE)] * 8) + "\n]\n\n")  # one array: all 8 rows
    train_rows, eval_rows, _ = data.load_splits(str(path), eval_fraction=0.01)
    assert len(train_rows + eval_rows) == 8


def test_json_nested_too_deeply_is_one_line_naming_file_and_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    for name, text, line in (
        ("pairs.jsonl", json.dumps(KETTLE) + "\n" + deep + "\n", 2),
        ("pairs.json", "[\n" + json.dumps(KETTLE) + ",\n" + deep + "\n]\n", 3),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(
            errors.ReportedError, match=f"^{tmp_path / name}, line {line}: JSON nested too deeply to read$"
        ):
            data.load_splits(str(tmp_path / name))


def test_evaluating_on_the_training_split_is_refused(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(KETTLE) + "\n")
    with pytest.raises(errors.ReportedError, match="--eval-split train is the training split"):
        data.load_splits(str(path), train_split="train", eval_split="train")


def test_an_absent_eval_split_is_refused_but_by_default_rows_are_held_out(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(KETTLE) + "\n" * 2 + json.dumps(KETTLE) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(KETTLE) + "\n")
    with pytest.raises(
        errors.ReportedError, match=r"has no split 'tset' for --eval-split \(it has \['test', 'train'\]\)"
    ):
        data.load_splits(str(tmp_path), eval_split="tset")
    assert [len(rows) for rows in data.load_splits(str(tmp_path))[:2]] == [2, 1]  # test is the default
    (tmp_path / "test.jsonl").unlink()
    assert [len(rows) for rows in data.load_splits(str(tmp_path))[:2]] == [1, 1]  # none: held out
    with pytest.raises(errors.ReportedError, match="has no split 'test' for --eval-split"):
        data.load_splits(str(tmp_path), eval_split="test")


def test_a_validation_or_valid_split_is_held_out_and_unused_splits_named(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {key: [value] * 3 for key, value in KETTLE.items()}
    for name in ("validation", "valid"):
        folder = tmp_path / name
        DatasetDict(
            {
                "train": Dataset.from_dict(rows),
                name: Dataset.from_dict({k: v[:2] for k, v in rows.items()}),
                "other": Dataset.from_dict(rows),
            }
        ).save_to_disk(str(folder))
        train_rows, eval_rows, notes = data.load_splits(str(folder))
        assert (len(train_rows), len(eval_rows)) == (3, 2) and all(f"split {name}" in where for where, _ in eval_rows)
        assert notes == [f"--dataset {folder}: its split 'other' is not used (--eval-split NAME holds one out)"]


def test_a_gold_reward_that_is_not_a_python_file_is_one_line(tmp_path):
    path = tmp_path / "gold.txt"
    path.write_text("def score(prompt, completion):\n    return 1.0\n")
    with pytest.raises(errors.ReportedError, match=r"^--gold-reward .*gold.txt: expected a Python file \(.py\)"):
        data.load_gold_reward(str(path))


# ----------------------------------------------------------------------------------------------------
# Batches


def test_the_prompt_is_never_scored(bpe_tokenizer):
    pairs = [
        data.tokenize_pair(KETTLE, bpe_tokenizer, 512, 256),
        data.tokenize_pair({**KETTLE, "chosen": "Great."}, bpe_tokenizer, 512, 256),
    ]
    batch = batches.collate(pairs, bpe_tokenizer.pad_token_id, "cpu")
    assert batch.input_ids.shape[0] == 4
    scored = [batch.input_ids[row][batch.completion_mask[row].bool()].tolist() for row in range(4)]
    assert scored == [
        pairs[0]["chosen_ids"],
        pairs[1]["chosen_ids"],
        pairs[0]["rejected_ids"],
        pairs[1]["rejected_ids"],
    ]
    assert (batch.attention_mask.sum(1) == batch.completion_mask.sum(1) + len(pairs[0]["prompt_ids"])).all()


def test_a_steps_pairs_depend_on_its_size_not_on_processes_micro_batches():
    """What lets a run resume on another number of processes: 8 pairs a step as 8 × 1 on 1 process, 4 × 2 on 1, 4 × 1
    on 2 or 1 × 2 on 4 are the same pairs, step after step and across epochs (20 pairs: 2 steps an epoch)."""
    pairs = list(range(20))

    def steps(batch_size, grad_accum, world_size, first_step=1, count=5):
        ranks = [
            batches.micro_batches(pairs, batch_size, grad_accum, world_size, rank, seed=3, first_step=first_step)
            for rank in range(world_size)
        ]
        return [sorted(i for _ in range(grad_accum) for rank in ranks for i in next(rank)) for _ in range(count)]

    one = steps(8, 1, 1)
    assert all(len(set(step)) == 8 for step in one) and one[0] != one[2]  # epoch 2: a fresh order
    assert steps(4, 2, 1) == steps(4, 1, 2) == steps(1, 2, 4) == one
    assert steps(4, 1, 2, first_step=4, count=2) == one[3:5]  # resumed at step 4


def test_right_padded_rows_give_the_same_logits_without_an_attention_mask():
    """Causal attention and padding only after each row's tokens: every position that is not padding sees the same
    tokens with or without the mask, so its logits are the same; only the padding's own differ (nothing reads them)."""
    model = tiny_llama()
    pairs = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11, 12], "rejected_ids": [13, 14]},
        {"prompt_ids": [3] * 9, "chosen_ids": [4], "rejected_ids": [20, 21, 22]},
    ]
    batch = batches.collate(pairs, 0, torch.device("cpu"))
    with torch.no_grad():
        masked = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        unmasked = model(**batches.model_inputs(batch.input_ids)).logits
    tokens = batch.attention_mask.bool()
    assert (~tokens).any()  # there is padding to ignore
    torch.testing.assert_close(unmasked[tokens], masked[tokens], rtol=1e-5, atol=1e-6)
