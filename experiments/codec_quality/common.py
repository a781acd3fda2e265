"""Shared helpers of the codec quality study (fake-quant; CPU)."""
import math, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kvkernels.eval import codec_quality as cq, ppl as _ppl

CACHE = Path("/tmp/codecq_cache"); CACHE.mkdir(exist_ok=True)

def load():
    torch.set_num_threads(2)
    return _ppl.load_smollm2("cpu", torch.float32)

def ids_of(tok, text="Pride and Prejudice", n=2048):
    return cq.tokens(tok, cq.TEXTS[text], n)

def run_fq(model, ids, fq):
    """ppl with fq(li, kind, t [T, C]) -> [T, C] applied as each layer writes."""
    H = model.config.num_key_value_heads
    def f(li, kind, x):
        _, H, T, D = x.shape
        t = x[0].transpose(0, 1).reshape(T, H * D).float()
        y = fq(li, kind, t)
        return y.reshape(T, H, D).transpose(0, 1).unsqueeze(0).to(x.dtype)
    return cq.run(model, ids, f if fq is not None else None)
