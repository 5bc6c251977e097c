"""The peak memory one ε-DPO loss adds (forward + backward) at bench.py's realistic shape with V = 128,256, from hidden
states and from logits (made from the same hidden states inside the measured region, as a head would).

    python tools/loss_memory_128k.py     # each loss twice; a few minutes on 2 cores
"""
import ctypes, sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
import epsdpo
ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)          # M_MMAP_THRESHOLD: freed blocks go back, RSS follows what is alive
def rss(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) / 1024
N, T, H, V, C = 8, 384, 256, 128256, 256
g = torch.Generator().manual_seed(0)
hidden = torch.randn(N, T, H, generator=g).requires_grad_()
ref_hidden = hidden.detach() + 0.01 * torch.randn(N, T, H, generator=g)
weight = (torch.randn(V, H, generator=g) / 16).requires_grad_()
ref_weight = weight.detach() + 0.001 * torch.randn(V, H, generator=g)
ids = torch.randint(0, V, (N, T), generator=g); mask = torch.zeros(N, T, dtype=torch.long); mask[:, T - C:] = 1
def from_hidden():
    return epsdpo.epsilon_dpo_loss_from_hidden(hidden, weight, ref_hidden, ref_weight, ids, mask, 0.1, 0.01).loss
def from_logits():
    logits = hidden @ weight.T
    with torch.no_grad():
        ref_logits = ref_hidden @ ref_weight.T
    return epsdpo.epsilon_dpo_loss(logits, ref_logits, ids, mask, 0.1, 0.01).loss
logits_mib = N * T * V * 4 / 2**20
for name, loss in (("hidden", from_hidden), ("logits", from_logits)) * 2:
    hidden.grad = weight.grad = None
    open("/proc/self/clear_refs", "w").write("5")
    before = rss("VmRSS"); start = time.perf_counter()
    loss().backward()
    seconds = time.perf_counter() - start
    extra = rss("VmHWM") - before - 0   # grads of hidden and weight included (also in a real step)
    print(f"{name}: {seconds:.2f} s, peak {extra:.0f} MiB above the start = {extra / logits_mib:.3f} × one (2B, T, V) float32 logits ({logits_mib:.0f} MiB); grads {(hidden.numel() + weight.numel()) * 4 / 2**20:.0f} MiB of it", flush=True)
