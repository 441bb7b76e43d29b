"""Stands in for the main job in launcher tests: records what device the worker was pinned to."""

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    overrides = dict(arg.split("=", 1) for arg in sys.argv[1:])
    out = Path(overrides["hydra.run.dir"].strip("'"))
    out.mkdir(parents=True, exist_ok=True)
    seen = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK")}
    (out / "probe.json").write_text(json.dumps({**seen, "overrides": overrides}))
