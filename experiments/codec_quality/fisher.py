"""Diagonal Fisher information of the NLL w.r.t. every cached K/V element (SmolLM2, CPU).

Labels are sampled from the model's own predictions (teacher-forced inputs = the text), so
the squared gradient of one backward is an unbiased estimate of diag(F) (cross-position terms
vanish in expectation). Sensitivity model: mean NLL change ~= 1/(2T) * sum_tc F[t,c] d[t,c]^2.
Writes fisher.pt: {"F": [2, L, C] summed over tokens 1.., "F0": [2, L, C] of token 0,
"Ft": [2, L, T] summed over channels, "T": T}.
"""
import inspect as _inspect, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *
from transformers import DynamicCache

class GradCache(DynamicCache):
    def __init__(self, *a, **k):
        super().__init__(*a, **k); self.leaves = []
    def update(self, ks, vs, li, *a, **k):
        ks = ks.detach().requires_grad_(); vs = vs.detach().requires_grad_()
        self.leaves.append((ks, vs))
        return super().update(ks, vs, li, *a, **k)

def fisher(model, ids, n_samples=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    key = "cache" if "cache" in _inspect.signature(model.forward).parameters else "past_key_values"
    acc = None
    for s in range(n_samples):
        cache = GradCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{key: cache})
        lg = out.logits[0, :-1].float()
        y = torch.multinomial(torch.softmax(lg.detach(), -1), 1, generator=g)[:, 0]
        loss = torch.nn.functional.cross_entropy(lg, y, reduction="sum")
        loss.backward()
        gr = torch.stack([torch.stack([kv[k].grad[0].transpose(0, 1).reshape(ids.shape[1], -1) for kv in cache.leaves]) for k in range(2)])  # [2, L, T, C]
        sq = gr.double() ** 2
        acc = sq if acc is None else acc + sq
        model.zero_grad(set_to_none=True)
        print("sample", s, flush=True)
    acc /= n_samples
    return acc

if __name__ == "__main__":
    model, tok = load()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    ids = profile_ids(tok, n)
    t0 = time.time()
    F = fisher(model, ids, n_samples=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    print("seconds", time.time() - t0)
    torch.save({"F": F[:, :, 1:].sum(2).float(), "F0": F[:, :, 0].float(), "Ft": F.sum(3).float(), "T": n},
               CACHE / f"fisher_{n}.pt")
