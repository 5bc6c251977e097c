"""ε-DPO through TRL: TRL's DPO training script with two names changed (docs/trl.md).

On tiny_data (a 60-word model and 2,000 pairs), on a CPU, in under a minute:

    python docs/trl_example.py

A real model and dataset, with LoRA, on a GPU with access to the Hugging Face Hub (the paper's β and ε for an
instruct model on UltraFeedback):

    python docs/trl_example.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized --beta 0.01 --epsilon 0.01 \\
        --learning_rate 5e-6 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 \\
        --max_length 1024 --max_steps 1000 --eval_strategy steps --eval_steps 100 --bf16 true \\
        --gradient_checkpointing true --use_peft --lora_r 32 --lora_alpha 16 --output_dir Qwen2.5-0.5B-epsilon-DPO

Every argument of TRL's DPOConfig, ScriptArguments and ModelConfig is accepted, plus --epsilon, --min_beta and
--max_beta; --help lists them. Under accelerate launch or torchrun it trains on every process.
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # epsdpo_trl.py and the method it wraps are at the repository's top

from datasets import Dataset, DatasetDict, load_dataset  # noqa: E402
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config  # noqa: E402

from epsdpo_trl import EpsilonDPOConfig, EpsilonDPOTrainer  # noqa: E402  (was: from trl import DPOConfig, DPOTrainer)

# What the tiny run changes from TRL's defaults: the data and model here, a learning rate for a 60-word model,
# float32 on a CPU, an evaluation every 25 steps. Any of them given on the command line wins.
TINY_DEFAULTS = {
    "model_name_or_path": str(ROOT / "tiny_data" / "model"),
    "output_dir": "out/trl",
    "learning_rate": 5e-4,
    "per_device_train_batch_size": 16,
    "num_train_epochs": 1,
    "bf16": False,
    "gradient_checkpointing": False,
    "eval_strategy": "steps",
    "eval_steps": 25,
    "per_device_eval_batch_size": 64,
    "logging_steps": 25,
    "save_strategy": "no",
    "report_to": "none",
}


def tiny_data():
    """tiny_data/data's train and test splits, read as they are (rows of prompt, chosen, rejected strings)."""
    splits = {}
    for split in ("train", "test"):
        lines = (ROOT / "tiny_data" / "data" / f"{split}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        splits[split] = Dataset.from_list([{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows])
    return DatasetDict(splits)


def main(argv=None):
    parser = TrlParser((ScriptArguments, EpsilonDPOConfig, ModelConfig))
    parser.set_defaults(**TINY_DEFAULTS)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
    }
    if script_args.dataset_name is None:
        dataset = tiny_data()
    else:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)

    trainer = EpsilonDPOTrainer(  # was: DPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"baseline β after {trainer.state.global_step} steps: {trainer.baseline_beta.value:.5f}; "
        f"model saved to {training_args.output_dir}"
    )
    return trainer


if __name__ == "__main__":
    main()
