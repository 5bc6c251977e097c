"""peft adapters: a supervised fine-tuning adapter given as --model (merged into its base by models.load_model),
and the LoRA adapters a run trains: the layers they adapt, the checkpoint's adapter checked against the run's,
and the model an adapter written is to be loaded onto.
"""

import contextlib
import json
import os
import pathlib
import re
import warnings

import torch

from training.errors import ReportedError


def adapter_base(name):
    """The base model that a peft adapter (a folder or Hub id with adapter_config.json) was trained on, a local
    folder by its absolute path; None when `name` is a model.

    A relative base (peft writes the path its user gave) is taken from the working directory, as peft would
    load it, else from the adapter's folder. train.py resolves it once and keeps it in --model-base, so a
    resumed run, from any directory, merges the adapter into the same base."""
    from transformers.utils import find_adapter_config_file

    try:
        config_file = find_adapter_config_file(name)
    except Exception:  # not a folder nor an id: loading says so
        return None
    if config_file is None:
        return None
    try:
        base = json.loads(pathlib.Path(config_file).read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        base = None
    if not isinstance(base, str) or not base:
        raise ReportedError(f"--model {name}: its adapter_config.json names no base_model_name_or_path")
    if _trained_on_sft(base):
        raise ReportedError(
            f"--model {name}: this adapter was trained on another adapter merged into its base ({base}); "
            f"merge them into a model folder and give that as --model"
        )
    path = pathlib.Path(base).expanduser()
    for folder in (pathlib.Path.cwd(), pathlib.Path(config_file).parent):
        if (folder / path).exists():
            if (folder / path / "adapter_config.json").exists():  # an adapter of an adapter: merge one first
                raise ReportedError(
                    f"--model {name}: its base {base} is an adapter itself; merge {base} into its own base, save "
                    f"that model to a folder, and give it as --model-base"
                )
            return str((folder / path).resolve())
    if path.is_absolute() or base.startswith((".", "~")):
        raise ReportedError(
            f"--model {name}: its adapter_config.json names the base {base}, which is not there "
            f"(from the working directory or the adapter's folder); give --model-base"
        )
    return base  # a Hub id


def tokenizer_name(name, base=None):
    """Where --model's tokenizer is: the model, or the adapter if it holds one, else the adapter's base (base:
    the one --model-base gives, else the one adapter_config.json names)."""
    from transformers.utils import cached_file

    base = base or adapter_base(name)
    if base is None or cached_file(
        name,
        "tokenizer_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    ):
        return name
    return base


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 asks transformers 5 whether checkpointing is on by a name it deprecated: a warning for peft's
    authors, not for the user of train.py."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        yield


def add_lora(model, args, checkpoint_folder=None):
    """The model with LoRA adapters on its --lora-target layers (peft): only the adapters train, every other
    weight frozen. They start with B = 0, so the policy starts as the model, bit for bit. Resuming, the
    adapters are the checkpoint's, which must be the run's: of its rank and alpha, on its layers.

    Dropout is off in the adapters, as everywhere (DPO assumes it). The adapter written records what it was
    trained on (lora_base), so that it is loaded onto that model from anywhere."""
    from peft import LoraConfig, PeftModel, get_peft_model

    layers = lora_layers(model, args.lora_target)
    with quiet_peft():
        if checkpoint_folder:
            check_checkpoint_adapter(model, layers, args, checkpoint_folder)
            return PeftModel.from_pretrained(model, checkpoint_folder, is_trainable=True).eval()
        sizes = sorted(
            (min(module.weight.shape), name)
            for name, module in layers.items()
            if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2
        )
        if sizes and args.lora_r > sizes[0][0]:  # weights that add nothing (and 10**20 of them)
            raise ReportedError(
                f"--lora-r {args.lora_r}: more than the rank of a layer it adapts ({sizes[0][1]}: "
                f"{' × '.join(map(str, layers[sizes[0][1]].weight.shape))}); give --lora-r {sizes[0][0]} or less"
            )
        target = "all-linear" if args.lora_target == ["all-linear"] else args.lora_target  # not the output head
        config = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=target, lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        try:
            policy = get_peft_model(model, config)
        except ValueError as error:  # a layer of a kind LoRA does not adapt
            raise ReportedError(f"--lora-target {' '.join(args.lora_target)}: {str(error).splitlines()[0]}") from None
    policy.peft_config["default"].base_model_name_or_path = lora_base(args)
    return policy.eval()


def lora_layers(model, targets):
    """{name: module} of the layers LoRA adapts for --lora-target: all-linear, every linear layer but the output
    head; else each module whose name is a target or ends with "." and one, as peft matches them. A target that
    names no layer is refused: peft would adapt the others and drop it silently."""
    output_layer, modules = model.get_output_embeddings(), dict(model.named_modules())
    linear = {
        name: module
        for name, module in modules.items()
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
    }  # transformers' Conv1D: GPT-2's linear layers
    if targets == ["all-linear"]:
        return {name: module for name, module in linear.items() if module is not output_layer}
    adapted = {}
    for target in targets:
        found = {name: module for name, module in modules.items() if name == target or name.endswith("." + target)}
        if not found:
            kinds = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))
            raise ReportedError(
                f"--lora-target {target}: the model has no layer of that name (its linear layers: {kinds})"
            )
        adapted.update(found)
    return adapted


def check_checkpoint_adapter(model, layers, args, folder):
    """A LoRA checkpoint's adapter (its adapter_config.json) is the run's: --lora-r, --lora-alpha, and on the layers
    --lora-target adapts; else it is not a checkpoint of this run (its optimizer state would not fit either)."""
    try:
        config = json.loads((pathlib.Path(folder) / "adapter_config.json").read_text())
        targets = config["target_modules"]
        if isinstance(targets, str) and targets != "all-linear":  # a regular expression, as peft takes one
            theirs = {name for name, _ in model.named_modules() if re.fullmatch(targets, name)}
        else:
            theirs = set(lora_layers(model, ["all-linear"] if targets == "all-linear" else list(targets)))
        same = (config.get("peft_type"), config.get("r"), config.get("lora_alpha")) == (
            "LORA",
            args.lora_r,
            args.lora_alpha,
        )
    except (OSError, ValueError, KeyError, TypeError, re.error, ReportedError):
        theirs, same = set(), False
    if not same or theirs != set(layers):
        raise ReportedError(
            f"{folder}: its adapter ({pathlib.Path(folder) / 'adapter_config.json'}) is not the run's "
            f"(--lora-r {args.lora_r} --lora-alpha {args.lora_alpha:g} --lora-target "
            f"{' '.join(args.lora_target)}, {len(layers)} layers): it is not a checkpoint of this run"
        )


# What a LoRA adapter trained on a supervised fine-tuning adapter's model names as its base: no model loads by these
# words, so AutoPeftModelForCausalLM stops on them (naming them) instead of loading it onto the base alone.
SFT_BASE = "merge {adapter} into {base}, then load this adapter onto that model (README.md)"
SFT_CARD = """
# Load this adapter onto the supervised fine-tuned model

It was trained (train.py, ε-DPO) on the model that the adapter `{adapter}` makes of `{base}`, merged into it.
Loaded onto `{base}` alone it is another model, so adapter_config.json names no model to load
(AutoPeftModelForCausalLM stops on it). Load it so:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{adapter}").merge_and_unload()
model = PeftModel.from_pretrained(sft_model, "THIS_FOLDER")
```
"""


def _trained_on_sft(base_name):
    """(the SFT adapter, its base) when an adapter's base_model_name_or_path is SFT_BASE's words; else None."""
    return re.fullmatch(
        re.escape(SFT_BASE).replace(r"\{adapter\}", "(.+)").replace(r"\{base\}", "(.+)"), base_name or ""
    )


def sft_model_card(base_name):
    """The model card section (README.md) of an adapter whose base_model_name_or_path is SFT_BASE's words: the code
    that loads it onto the model it was trained on; None for an adapter of a model."""
    sft = _trained_on_sft(base_name)
    return sft and SFT_CARD.format(adapter=sft[1], base=sft[2])


def lora_base(args):
    """adapter_config.json's base_model_name_or_path for the adapters a LoRA run writes: --model, a local folder by
    its absolute path; when --model is itself an adapter (of supervised fine-tuning), SFT_BASE: the adapter was
    trained on that adapter merged into its base, a model no folder holds."""
    model = str(pathlib.Path(args.model).resolve()) if os.path.isdir(args.model) else args.model
    base = getattr(args, "model_base", None) or adapter_base(args.model)
    return model if base is None else SFT_BASE.format(adapter=model, base=base)
