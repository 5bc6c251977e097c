"""The GPU path, as far as a CPU shows it: bf16 mixed precision, TF32, gradient checkpointing, the reference in
bf16, a GPU per process, batches copied without waiting, sampled units gathered only where they fit."""

import os
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import epsdpo
import train
from tests.helpers import read_metrics, tiny_llama
from training import batches, errors, models
from training.arguments import TINY_MODEL, parse_args

# ----------------------------------------------------------------------------------------------------
# Precision and gradient checkpointing


def changed_weights(output_dir):
    """How many weights of the saved policy differ from the reference, and the saved dtypes."""
    trained, reference = load_file(output_dir / "model.safetensors"), load_file(TINY_MODEL / "model.safetensors")
    return sum(int((trained[name] != reference[name]).sum()) for name in reference), {t.dtype for t in trained.values()}


def test_bf16_is_mixed_precision_moving_the_weights_as_float32_does(tmp_path, small_data):
    arguments = ["--max-steps", "2", "--eval-every", "1000", "--lr", "5e-7", "--warmup-ratio", "0", *small_data]
    train.main(["--output-dir", str(tmp_path / "float32"), "--dtype", "float32", *arguments])
    train.main(["--output-dir", str(tmp_path / "bfloat16"), "--dtype", "bfloat16", *arguments])
    float32_changed, float32_dtypes = changed_weights(tmp_path / "float32")
    bfloat16_changed, bfloat16_dtypes = changed_weights(tmp_path / "bfloat16")
    assert float32_changed > 0.9 * 86_080  # nearly every weight gets a gradient
    assert bfloat16_changed >= 0.99 * float32_changed  # pure bf16 weights would keep ~1 % of them
    assert float32_dtypes == bfloat16_dtypes == {torch.float32}  # the saved model keeps float32 weights
    float32_rows, bfloat16_rows = (read_metrics(tmp_path / run) for run in ("float32", "bfloat16"))
    # At the start the bf16 reference computes the policy's logits bit for bit: a tie, every s 0.
    start = bfloat16_rows[0]
    assert (start["rewards/margins"], start["s/weaker"], start["s/stronger"], start["loss"]) == (
        0.0,
        0.0,
        0.0,
        float32_rows[0]["loss"],
    )
    for float32_row, bfloat16_row in zip(float32_rows[1:], bfloat16_rows[1:], strict=True):  # the training steps
        assert bfloat16_row["loss"] == pytest.approx(float32_row["loss"], abs=2**-8)  # within bf16's rounding


def test_gradient_checkpointing_recomputes_layers_giving_the_same_losses(tmp_path, monkeypatch, small_data):
    real_load_model, layer_calls = models.load_model, []

    def load_and_count(name, *args):
        model = real_load_model(name, *args)
        if not layer_calls:  # the policy is loaded first
            for layer in model.model.layers:  # (hooks do not fire in a recomputation)
                real_forward = layer.mlp.forward
                layer.mlp.forward = lambda *a, _real=real_forward: (
                    layer_calls.append(torch.is_grad_enabled()),
                    _real(*a),
                )[1]
        layer_calls.append("loaded")
        return model

    monkeypatch.setattr(models, "load_model", load_and_count)
    arguments = ["--max-steps", "2", "--eval-every", "1000", "--grad-accum", "2", *small_data]
    counts = {}
    for run, flags in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        layer_calls.clear()
        train.main(["--output-dir", str(tmp_path / run), *arguments, *flags])
        counts[run] = layer_calls.count(True)  # MLP calls with gradients: training
    assert counts == {"plain": 2 * 2 * 2, "checkpointed": 2 * 2 * 2 * 2}  # layers × micro-batches × steps, twice
    plain, checkpointed = (read_metrics(tmp_path / run) for run in ("plain", "checkpointed"))
    assert [r["loss"] for r in checkpointed] == [r["loss"] for r in plain]
    assert changed_weights(tmp_path / "checkpointed") == changed_weights(tmp_path / "plain")


def test_the_bf16_reference_has_bf16_product_weights_and_starts_exactly():
    """Tiny random Llama (tied and untied), Qwen2, Gemma-2 and Mixtral (both expert implementations): under
    autocast the bf16 reference gives the float32 policy's logits exactly, so every s is 0 and the loss log 2."""
    from transformers import Gemma2Config, LlamaConfig, MixtralConfig, Qwen2Config

    shape = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    mixtral = dict(**shape, num_local_experts=4, num_experts_per_tok=2)
    configs = [
        ("llama tied", LlamaConfig(**shape, tie_word_embeddings=True), {}),
        ("llama", LlamaConfig(**shape, tie_word_embeddings=False), {}),
        ("qwen2", Qwen2Config(**shape, tie_word_embeddings=True), {}),
        ("gemma2", Gemma2Config(**shape, head_dim=8, tie_word_embeddings=True), {}),
        ("mixtral", MixtralConfig(**mixtral), {}),
        ("mixtral eager", MixtralConfig(**mixtral), {"experts_implementation": "eager"}),
    ]
    input_ids = torch.randint(3, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 5:] = 1
    for name, config, options in configs:
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_config(config, **options).eval()
        reference = AutoModelForCausalLM.from_config(config, **options).eval()
        reference.load_state_dict(policy.state_dict())
        models.frozen_weights_in_bf16(reference.requires_grad_(False))
        in_bf16 = {n for n, p in reference.named_parameters() if p.dtype == torch.bfloat16}
        products = {n for n, _ in reference.named_parameters() if "embed" not in n and "norm" not in n}
        experts = {n for n in products if "experts" in n}  # grouped_mm, not cast: float32
        router = {n for n in products if "mlp.gate." in n}  # a Parameter of its own: float32
        assert in_bf16 == products - router - (experts if name == "mixtral" else set()), name
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits, ref_logits = policy(input_ids).logits, reference(input_ids).logits
        assert torch.equal(logits, ref_logits), name
        out = epsdpo.epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, 0.1, 0.5)
        assert (out.s == 0).all() and torch.equal(out.losses, -torch.nn.functional.logsigmoid(torch.zeros(2))), name


def test_the_reference_is_cast_before_moving_and_ddp_broadcasts_no_buffers(monkeypatch):
    seen, wrapped = [], []
    real_convert = models.frozen_weights_in_bf16
    monkeypatch.setattr(
        models,
        "frozen_weights_in_bf16",
        lambda model: seen.append({p.device.type for p in model.parameters()}) or real_convert(model),
    )
    monkeypatch.setattr(
        torch.nn.parallel, "DistributedDataParallel", lambda model, **kwargs: wrapped.append(kwargs) or model
    )
    monkeypatch.setattr(models, "shared_linear_head", lambda *args: (None, "a meta device computes nothing to check"))
    args, _ = parse_args([])
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    pair = {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2]}
    setup = models.setup_models(args, torch.device("meta"), 2, True, tokenizer, [pair])
    assert seen == [{"cpu"}]  # converted on the CPU, then moved
    assert {p.device.type for p in setup.reference.parameters()} == {"meta"}
    assert setup.reference.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert wrapped == [{"device_ids": None, "broadcast_buffers": False}]


def test_weights_are_read_in_their_stored_dtype_and_upcast_exactly(tmp_path):
    """A model saved in bf16 (as Llama-3's weights are): read_weights, process 0's one read, keeps bf16 (half the
    memory of a float32 read), and their upcast is exactly what a float32 read gives, as each process casts its
    float32 shards."""
    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    stored = models.read_weights(str(tmp_path / "bf16"), False)
    float32 = models.load_model(str(tmp_path / "bf16"), torch.device("cpu"), False).state_dict()
    assert {value.dtype for value in stored.values() if value.is_floating_point()} == {torch.bfloat16}
    assert stored.keys() == float32.keys()
    for name, value in stored.items():
        assert torch.equal(value.float(), float32[name]) and float32[name].dtype == torch.float32, name


# ----------------------------------------------------------------------------------------------------
# Devices


def test_auto_precision_is_bf16_only_on_the_given_gpu_with_bf16_arithmetic(monkeypatch):
    capability = {0: (8, 0), 1: (7, 0)}  # an A100 and a V100; the current GPU is 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # it counts emulation
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100")
    assert models.precision("auto", torch.device("cuda", 1)) is None
    assert models.precision("auto", torch.device("cuda", 0)).fast_dtype == torch.bfloat16
    with pytest.raises(
        errors.ReportedError, match=r"--dtype bfloat16: Tesla V100 \(compute capability 7.0\) has no bf16"
    ):
        models.precision("bfloat16", torch.device("cuda", 1))


def test_float32_on_a_tf32_gpu_multiplies_in_tf32_and_the_start_says_so(monkeypatch, capsys):
    """TF32: float32's range with a 10-bit mantissa in matrix products, summed in float32; on the GPUs with bf16
    units (compute capability 8.0 on). Not under bf16 autocast, nor on older GPUs."""
    capability = {0: (8, 0), 1: (7, 0)}  # an A100 and a V100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "A100")
    a100, v100 = torch.device("cuda", 0), torch.device("cuda", 1)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        assert models.precision("float32", v100) is None and models.precision("auto", a100).fast_dtype == torch.bfloat16
        assert torch.get_float32_matmul_precision() == "highest" and models.precision_note(a100) == ""
        assert models.precision("float32", a100) is None
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        args, _ = parse_args(["--dtype", "float32"])
        from training import reports

        data = {"pairs": {"train": [None] * 10, "eval": [None] * 2}}
        models_run = types.SimpleNamespace(policy=torch.nn.Linear(1, 1), loss_note="")
        reports.print_start(args, None, 1, 3, data, 1, a100, models_run)
        assert "on 1 × cuda:0 (A100), float32 products in TF32, β = 0.1" in capsys.readouterr().out
        assert models.precision_note(torch.device("cpu")) == ""
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_under_torchrun_each_process_takes_its_local_ranks_gpu_or_refuses(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(models.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(models.dist, "init_process_group", lambda backend, **kwargs: calls.append(("backend", backend)))
    monkeypatch.setattr(models.dist, "get_rank", lambda: 1)
    for name in ("auto", "cuda"):
        calls.clear()
        assert models.init_distributed(name) == (1, 2, torch.device("cuda", 1))
        assert calls == [("set_device", 1), ("backend", "nccl")]
    calls.clear()
    assert models.init_distributed("cpu") == (1, 2, torch.device("cpu")) and calls == [("backend", "gloo")]
    for name in ("cuda:0", "mps"):
        with pytest.raises(errors.ReportedError, match=f"--device {name}: under torchrun each process uses the GPU"):
            models.init_distributed(name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(errors.ReportedError, match="--device cuda: process 1 of this machine has no GPU"):
        models.init_distributed("cuda")


def test_batches_go_to_a_gpu_from_pinned_memory_without_waiting(monkeypatch):
    copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: copies.append("pinned") or self)
    real_to = torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor,
        "to",
        lambda self, device, **kwargs: (
            copies.append((str(device), kwargs))
            or (self if torch.device(device).type == "cuda" else real_to(self, device, **kwargs))
        ),
    )
    pairs = [{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2]}]
    batches.collate(pairs, 0, torch.device("cuda", 0))
    assert copies == ["pinned", ("cuda:0", {"non_blocking": True})] * 4  # input ids, two masks, noise flags
    copies.clear()
    batches.collate(pairs, 0, torch.device("cpu"))
    assert copies == [("cpu", {})] * 4


def test_fsdp_sampling_keeps_units_gathered_only_in_half_the_free_memory(monkeypatch):
    from training import sharding

    model = torch.nn.Linear(1000, 1000, bias=False)  # a million weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3_000_000, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1_500_000)  # 1,000,000 of it unused:
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 500_000)  # free for torch's tensors
    model.gathered_dtype = torch.bfloat16  # 2 MB gathered, half of the 4 MB free
    assert sharding.gathered_fits(model, torch.device("cuda", 0))
    model.gathered_dtype = torch.float32  # 4 MB
    assert not sharding.gathered_fits(model, torch.device("cuda", 0))
    assert sharding.gathered_fits(model, torch.device("cpu"))


def test_gpu_runs_get_dist_timeout_expandable_segments_and_fused_adamw(monkeypatch):
    """For long runs on real clusters: the process group times out after --dist-timeout minutes (30 unless given;
    torch's own is 10), CUDA's allocator grows expandable segments unless the user set PYTORCH_CUDA_ALLOC_CONF,
    and AdamW is fused on a GPU (foreach on the CPU, as before)."""
    import datetime

    import torch.distributed as dist

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    args, _ = parse_args(["--dist-timeout", "45"])
    assert models.init_distributed("cpu", args.dist_timeout) == (0, 2, torch.device("cpu"))
    assert joined == [("gloo", {"timeout": datetime.timedelta(minutes=45)})]
    assert parse_args([])[0].dist_timeout == models.DIST_TIMEOUT_MINUTES == 30  # torch's own: 10 minutes
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # a user's own setting stays
    models.init_distributed("cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    weights, args = [torch.nn.Parameter(torch.zeros(3))], parse_args([])[0]
    assert models.make_optimizer(weights, args, torch.device("cuda")).defaults["fused"] is True
    assert not models.make_optimizer(weights, args, torch.device("cpu")).defaults["fused"]  # foreach, as before
