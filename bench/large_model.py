"""Costs of a 1,000,100-parameter model (100 classes x 10,000 features) on the coordinator:
encoding each model codec, splitting into chunks under a 128 KiB packet limit, assembling
them on a device, and the checkpoint written at every group commit; plus the memory of
the published-model history (`--history`, 32 versions by default).

Prints and writes bench/results/large_model.json; docs/benchmarks.md quotes it.

    python bench/large_model.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.server import Coordinator  # noqa: E402
from coordinator.strategies import make_strategy  # noqa: E402
from coordinator.validation import UpdateValidator  # noqa: E402
from protocol import chunking  # noqa: E402
from protocol.codec import MODEL_CODECS  # noqa: E402
from protocol.messages import decode_model  # noqa: E402
from protocol.model_spec import ModelSpec  # noqa: E402
from protocol.topics import Topics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "large_model.json"
LIMIT = 131072


def best_ms(fn, repeat: int) -> float:
    """Fastest of `repeat` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * min(times), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    topics = Topics("big")
    spec = ModelSpec("sgd-classifier", 10_000, tuple(range(100)))
    rng = np.random.default_rng(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for codec in MODEL_CODECS:
            core = Coordinator(topics, spec, make_strategy("fedasync"), UpdateValidator(topics, spec.n_params),
                               checkpoint_dir=tmp, model_codec=codec)
            core.params_ = rng.normal(0, 0.1, spec.n_params)
            payload = core.model_payload()
            room = chunking.capacity(LIMIT, topics.model_chunk(chunking.MAX_CHUNKS - 1))
            chunks = chunking.split(payload, room)
            decoded = [chunking.decode_chunk(c) for c in chunks]
            m = chunking.manifest(payload, topics.fleet, core.version_, len(chunks))

            def device() -> None:
                col = chunking.Collector(max_bytes=2 * len(payload))
                for c in chunks:
                    col.add(chunking.decode_chunk(c))
                decode_model(col.expect(m.digest))

            rows[codec] = {
                "model_bytes": len(payload),
                "chunks_at_128KiB": len(chunks),
                "encode_ms": best_ms(core.model_payload, args.repeat),
                "split_ms": best_ms(lambda: chunking.split(payload, room), args.repeat),
                "device_assemble_and_decode_ms": best_ms(device, args.repeat),
                "checkpoint_ms": best_ms(core.checkpoint, args.repeat),
                "history_entry_bytes": int(core.published_[core.version_].nbytes),
            }
            assert sum(len(c.data) for c in decoded) == len(payload)
            print(json.dumps({codec: rows[codec]}), file=sys.stderr)
    out = {"benchmark": "large_model", "n_params": spec.n_params, "packet_limit": LIMIT, "history": 32,
           "command": "python bench/large_model.py " + " ".join(sys.argv[1:]), "results": rows}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
