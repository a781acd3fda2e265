"""Diagonal Fisher information of the NLL w.r.t. every cached K/V element (SmolLM2, CPU).

Labels are sampled from the model's own predictions (teacher-forced inputs = the text), so
the squared gradient of one backward is an unbiased estimate of diag(F) (cross-position terms
vanish in expectation); ``kvkernels.eval.codec_quality.kv_fisher`` computes it (the shipped
profile uses the same function). Sensitivity model: mean NLL change ~= 1/(2T) * sum_tc F[t,c] d[t,c]^2.
Writes fisher_<T>.pt: {"F": [2, L, C] summed over tokens 1.., "F0": [2, L, C] of token 0,
"Ft": [2, L, T] summed over channels, "T": T}.
"""
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *

if __name__ == "__main__":
    model, tok = load()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    ids = cq.profile_ids(tok, n)
    t0 = time.time()
    F = cq.kv_fisher(model, ids, n_samples=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    print("seconds", time.time() - t0)
    torch.save({"F": F[:, :, 1:].sum(2).float(), "F0": F[:, :, 0].float(), "Ft": F.sum(3).float(), "T": n},
               CACHE / f"fisher_{n}.pt")
