"""Where the monitor's thresholds come from: each drift check on two halves of the stdlib (no drift) and on other
packages' source (drift), against a profile of one half.

    .venv/bin/python bench/drift_thresholds.py        # ~3 minutes on 2 CPU cores

Writes bench/results/drift-thresholds.json and prints the table. A threshold belongs between the stdlib rows and the
others.
"""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

from codetune.core.config import DataConfig, MonitorConfig
from codetune.core.data import Examples
from codetune.core.data.prepare import read_source
from codetune.core.data.profile import profile_splits
from codetune.lifecycle.monitoring import compare

PACKAGES = ("omegaconf", "prefect", "mlflow", "transformers")
RESULTS = Path(__file__).parent / "results" / "drift-thresholds.json"


def main() -> None:
    stdlib = read_source(DataConfig(), Examples.pairs)
    random.Random(0).shuffle(stdlib)
    half = len(stdlib) // 2
    profile = profile_splits({"train": stdlib[:half], "validation": [], "test": []})
    # Small samples of the same code: a statistic that grows with sparseness would call them drifted.
    sources = {"stdlib half": stdlib[half:], "300 stdlib functions": stdlib[half : half + 300]}
    sources["90 stdlib functions"] = stdlib[half : half + 90]
    for name in PACKAGES:
        sources[name] = read_source(
            DataConfig(path=str(Path(importlib.import_module(name).__file__).parent)), Examples.pairs
        )
    settings = MonitorConfig()
    rows = {}
    for name, current in sources.items():
        checks, _, _ = compare(profile, current, settings)
        rows[name] = {"functions": len(current), **{c.feature: round(c.value, 3) for c in checks}}
    features = list(rows["stdlib half"])
    print(f"reference: {half} stdlib functions; thresholds: {settings}")
    print("| source | " + " | ".join(features) + " |")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row[f]) for f in features) + " |")
    RESULTS.write_text(json.dumps({"reference_functions": half, "sources": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
