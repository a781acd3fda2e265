"""atheris fuzz harness for the CPU entropy decoders (not run in CI: needs ``pip install atheris``).

The input bytes drive everything the decoder sees: coder, shape (S, N, C), table rows, table
ids, offsets and the payload. The decoders must return or raise CoderError, nothing else.

    python fuzz/fuzz_codec.py -atheris_runs=200000          # libFuzzer flags
    # under ASan: build with scripts/asan_codec.sh's flags, then
    # LD_PRELOAD=$(g++ -print-file-name=libasan.so) KVK_CODEC_CPU_PATH=/tmp/.../_codec_cpu*.so python fuzz/fuzz_codec.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import atheris  # noqa: E402

with atheris.instrument_imports():
    import torch

    from kvkernels.codec import coders


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    coder = fdp.ConsumeIntInRange(0, 2)
    S, N, C = fdp.ConsumeIntInRange(1, 3), fdp.ConsumeIntInRange(1, 40), fdp.ConsumeIntInRange(1, 70)
    bins, K = fdp.ConsumeIntInRange(2, 40), fdp.ConsumeIntInRange(1, 4)
    pb = fdp.ConsumeIntInRange(1, 12)
    table = torch.tensor(fdp.ConsumeIntListInRange(K * (bins + (coder == 0)), -2, 70000), dtype=torch.int32)
    if coder == 0:
        table = table.reshape(K, bins + 1)
        if fdp.ConsumeBool():  # mostly valid cdf rows, to get past the checks
            table = torch.sort(table.clamp(0, 65535), dim=1).values
            table[:, 0] = 0
    else:
        table = table.reshape(K, bins)
        if fdp.ConsumeBool():
            table = table.clamp(1, 1 << 12)
            table[:, 0] += (1 << pb) - table.sum(1).to(torch.int32)
    tid = torch.tensor(fdp.ConsumeIntListInRange(S * C, -1, K), dtype=torch.int32).reshape(S, C) \
        if fdp.ConsumeBool() else torch.zeros(S, C, dtype=torch.int32)
    n_streams = S * C if coder == 0 else S * ((C + 31) // 32)
    payload = torch.frombuffer(bytearray(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096)) or b"\0"),
                               dtype=torch.uint8)
    if fdp.ConsumeBool():
        cuts = sorted(fdp.ConsumeIntListInRange(n_streams - 1, 0, payload.numel()))
        offsets = torch.tensor([0] + cuts + [payload.numel()], dtype=torch.int64)
    else:
        offsets = torch.tensor(fdp.ConsumeIntListInRange(n_streams + 1, -2**40, 2**40), dtype=torch.int64)
    try:
        if coder == 0:
            coders.ac_decode(payload, offsets, table, tid, N)
        elif coder == 1:
            coders.rans_decode(payload, offsets, table, tid, N, pb)
        else:
            coders.rans_decode_dequant(payload, offsets, table, tid, N, pb, torch.ones(table.shape))
    except coders.CoderError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
