"""Score pairs with sentence-transformers ``CrossEncoder(backend="onnx")``; run in a side venv.

sentence-transformers' ONNX backend needs ``optimum-onnx``, whose only release pins
``transformers<4.58``, so it cannot share crossrank's environment. ``cpu_peers.py`` runs this
file with that environment's interpreter (``--st-onnx-python``) on the same model and pairs
and reads one JSON object from stdout: pairs/s, load seconds, raw scores, library versions.
It imports nothing from crossrank.

    python st_onnx_worker.py MODEL_DIR PAIRS_JSON REPEATS
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path


def main(model_dir: str, pairs_file: str, repeats: int) -> dict[str, object]:
    import torch
    from sentence_transformers import CrossEncoder

    pairs = json.loads(Path(pairs_file).read_text(encoding="utf-8"))
    start = time.perf_counter()
    model = CrossEncoder(model_dir, device="cpu", max_length=512, backend="onnx")
    identity = torch.nn.Identity()
    model.predict(pairs[:4], activation_fn=identity, show_progress_bar=False)
    load_s = time.perf_counter() - start

    def score() -> list[float]:
        out = model.predict(pairs, batch_size=32, activation_fn=identity, show_progress_bar=False)
        return [float(x) for x in out]

    score()  # same protocol as cpu_peers.timed: one untimed full call, best of the timed ones
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        scores = score()
        rates.append(len(pairs) / (time.perf_counter() - start))
    return {
        "pairs_per_s": max(rates),
        "load_s": load_s,
        "scores": scores,
        "versions": {
            name: version(name)
            for name in ("sentence-transformers", "transformers", "optimum-onnx", "onnxruntime")
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
