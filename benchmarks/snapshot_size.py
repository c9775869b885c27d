"""Snapshot size (trainable state only) versus the whole model's size, per variant.

    python benchmarks/snapshot_size.py

The last line printed is ``{"variants": {NAME: {snapshot_bytes, full_model_bytes,
ratio, trainable_params, total_params}}}``; both sizes are safetensors bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="em3,id_only,content_frozen,full_finetune")
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import save

    from em3.model import EM3Model, ModelConfig
    from em3.snapshot import pack

    out = {}
    for name in args.variants.split(","):
        cfg = ModelConfig.for_variant(name)
        model = EM3Model(cfg, cache_items=0)
        blob, manifest = pack(model.trainable_state_dict(), model_line="size", version=1, config=cfg)
        full = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        # Tied / shared tensors are saved once.
        seen, unique = set(), {}
        for k, v in full.items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v.clone()
        full_bytes = len(save(unique))
        out[name] = {"snapshot_bytes": manifest.num_bytes, "full_model_bytes": full_bytes,
                     "ratio": round(manifest.num_bytes / full_bytes, 4),
                     "trainable_params": model.num_trainable_params(),
                     "total_params": sum(p.numel() for p in model.parameters())}
        print(f"{name}: snapshot {manifest.num_bytes / 2**20:.1f} MiB of {full_bytes / 2**20:.1f} MiB", file=sys.stderr)
    report = {"variants": out}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
