"""What a run reads, fingerprinted: a resumed run trains on what the run trained on, or refuses naming what changed.

The first run keeps in every checkpoint the fingerprints of --model (its files, or its Hub revision), of its
adapter's base, of --ref-model, and of the train and held-out pairs as tokenized (the ids trained on, so a
rewritten dataset, another tokenizer or other truncation all show); a resumed run takes them again and compares.
"""

import array
import hashlib
import json
import pathlib
import re
import struct

from training.adapters import adapter_base
from training.data import gold_reward_path
from training.errors import ReportedError, note

# The files of a model's folder that loading it reads (weights, configuration, tokenizer, a model's own code).
READ_BY_LOADING = re.compile(
    r".*\.(safetensors|bin|model|py|tiktoken)|.*\.index\.json|(adapter_|generation_)?config\.json|"
    r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|chat_template\..*"
)
WHOLE, SAMPLE = 64 * 2**20, 4096  # files up to WHOLE bytes are hashed whole; weights, in samples


def checked_inputs(args, data, checkpoint=None):
    """What the run reads, fingerprinted (input_fingerprints), and --model's adapter base resolved once (into
    args.model_base, which the checkpoints keep). Resuming, the fingerprints the checkpoint holds must be those of
    what is read now, or ReportedError naming what changed."""
    if args.model_base is None:
        args.model_base = adapter_base(args.model)
    inputs = input_fingerprints(args, data["pairs"])
    saved = checkpoint[1].get("inputs") if checkpoint else inputs
    if not saved:
        note(f"{checkpoint[0]} holds no fingerprints of what the run read (an older checkpoint): not compared")
    _check_gold_reward(args, inputs, saved)
    for what, then in (saved or {}).items():  # as written: --model first, then the pairs
        now = inputs.get(what)
        if now == then:
            continue
        named = {
            "--model": f"--model {args.model}",
            "--model-base": f"--model-base {args.model_base}",
            "--ref-model": f"--ref-model {args.ref_model}",
        }.get(what, what)
        if now is None or not isinstance(then, dict):
            change = f"the run read {named}, which it does not now"
        elif "pairs" in what:
            change = (
                f"the {what} of --dataset {args.dataset} differ from the run's "
                f"({then.get('pairs')} then, {now['pairs']} now)"
            )
        else:
            changed = sorted({*then, *now} - {name for name in then if then[name] == now.get(name)})
            change = (
                f"{named} changed since the run ("
                + ", ".join(
                    f"{name} {'is new' if name not in then else 'is gone' if name not in now else 'differs'}"
                    for name in changed[:4]
                )
                + ")"
            )
        raise ReportedError(f"--resume {args.resume}: {change}; a resumed run trains on what the run trained on")
    return inputs


def _check_gold_reward(args, inputs, saved):
    """The gold reward is an input of the run like its data: its numbers before and after a resume must be one
    scorer's. Resumed without one (it runs code, so it is never taken from the checkpoint), the samples are not
    scored; with another file, or the run's file edited since, the run is refused. Its fingerprint is carried on."""
    path = gold_reward_path(args)
    if path and pathlib.Path(path).is_file():
        inputs["--gold-reward"] = {"file": str(path), "digest": _file_digest(pathlib.Path(path))}
    then, now = (saved or {}).get("--gold-reward"), inputs.get("--gold-reward")
    if now is None or not isinstance(then, dict):
        if isinstance(then, dict):
            inputs["--gold-reward"] = then
        return
    if now["file"] != then.get("file"):
        raise ReportedError(
            f"--resume {args.resume}: the run scored its samples with --gold-reward {then.get('file')}, not "
            f"{now['file']}: its gold reward before and after would be two scorers'. Give --gold-reward "
            f"{then.get('file')}, or leave it out to score nothing from now on"
        )
    if now["digest"] != then.get("digest"):
        raise ReportedError(
            f"--resume {args.resume}: --gold-reward {now['file']} changed since the run (its bytes differ): its gold "
            "reward before and after would be two scorers'. Put back the file the run had, or leave --gold-reward "
            "out to score nothing from now on"
        )


def input_fingerprints(args, pairs):
    """{what: fingerprint} of --model (and its adapter's base), --ref-model (and its base), and the train and held-out
    pairs as tokenized: what a resumed run must read again. Taken in a fraction of a second: see model_fingerprint."""
    inputs = {"--model": model_fingerprint(args.model)}
    if args.model_base:
        inputs["--model-base"] = model_fingerprint(args.model_base)
    if args.ref_model:
        inputs["--ref-model"] = model_fingerprint(args.ref_model)
        ref_base = adapter_base(args.ref_model)
        if ref_base:
            inputs[f"the base of --ref-model, {ref_base},"] = model_fingerprint(ref_base)
    for name, split in (("train pairs", "train"), ("held-out pairs", "eval")):
        digest = hashlib.sha256()
        for pair in pairs[split]:
            ids = (pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"])
            digest.update(struct.pack("<3qb", *map(len, ids), {None: 0, False: 1, True: 2}[pair.get("noisy")]))
            for part in ids:
                digest.update(array.array("q", part).tobytes())
        inputs[name] = {"pairs": len(pairs[split]), "sha256": digest.hexdigest()}
    return inputs


def model_fingerprint(name):
    """{file: its size and sha256} for the files loading reads from a model's folder (READ_BY_LOADING); for a Hub
    id, {"revision": the commit of its cached snapshot}, which is content-addressed.

    A file up to WHOLE bytes is hashed whole. Weights are sampled: a safetensors file's header and the first,
    middle and last SAMPLE bytes of every tensor in it, other files at 256 places: weights edited in place (all
    of a tensor, or any part of its first, middle or last 4 KiB) change it, at a few reads per tensor."""
    folder = pathlib.Path(name)
    if folder.is_dir():
        return {
            path.name: _file_digest(path)
            for path in sorted(folder.iterdir())
            if path.is_file() and READ_BY_LOADING.fullmatch(path.name)
        }
    from transformers.utils import cached_file

    for file in ("config.json", "adapter_config.json"):
        found = cached_file(
            name, file, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
        )
        if found:
            return {"revision": pathlib.Path(found).parent.name}
    return {}


def _file_digest(path):
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as file:
        if size <= WHOLE:
            digest.update(file.read())
        else:
            for offset in _sampled_offsets(file, size, path.suffix == ".safetensors"):
                file.seek(offset)
                digest.update(file.read(SAMPLE))
    return f"{size} bytes, sha256 {digest.hexdigest()[:32]}"


def _sampled_offsets(file, size, safetensors):
    try:
        if not safetensors:
            raise ValueError
        length = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(length)) if length <= 2**27 else None
        starts = [0] + [
            8 + length + at
            for key, entry in header.items()
            if key != "__metadata__"
            for begin, end in [entry["data_offsets"]]
            for at in (begin, (begin + end) // 2, max(begin, end - SAMPLE))
        ]
        return starts + list(range(SAMPLE, 8 + length, SAMPLE))  # the whole header too
    except (ValueError, AttributeError, KeyError, TypeError, struct.error):
        return [size * i // 256 for i in range(256)] + [max(0, size - SAMPLE)]
