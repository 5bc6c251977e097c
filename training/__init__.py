"""train.py's machinery, one module per concern; the method itself is epsdpo.py (and epsdpo_chunked.py) at the top.

arguments       RunConfig: every flag of train.py, its type, default and range; the parser
data            a dataset (Hub id, JSON/JSONL/Parquet, folder) to tokenized pairs; the gold reward
batches         pairs to a step's micro-batches, collated and padded
models          devices, precision, loading the policy and its reference, DDP, the output layer's kind
adapters        LoRA adapters, and supervised fine-tuning adapters given as --model
sharding        FSDP2: sharding, loading from process 0, gathering
loss            the ε-DPO loss of a micro-batch: both models' forward passes, then epsdpo's or epsdpo_chunked's
evaluation      the sums of a step, held-out metrics, samples scored by the gold reward and by their KL, what the
                criterion measures on the final policy
reports         the lines a run prints and its figures
output_folder   what a run may write: its record, with the proof of each file it wrote
checkpoints     checkpoints, resuming, the final save (dcp_files: a sharded checkpoint's files, read safely)
fingerprints    what a run reads, so that a resume reads the same
signals         Ctrl-C and SIGTERM: the step under way ends, then a checkpoint
errors          one line for every refusal
bench_counts, bench_memory, bench_gpu   what bench.py measures
"""
