"""One cold start, in a fresh process as a server's: imports, then setup's load of base + refiner + checker from
the weights folder given (already in the page cache). Prints one JSON line: imports_s, load_s.

    python -m tools.bench.gpu_coldstart WEIGHTS_DIR      # SDXL_DIRECT_LOAD=1 in the environment for direct loading
"""

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()
import torch  # noqa: E402

from sdxl.model.loading import load_pipelines  # noqa: E402


def main() -> None:
    imported = time.perf_counter()
    load_pipelines(Path(sys.argv[1]))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    loaded = time.perf_counter()
    print(json.dumps({"imports_s": imported - started, "load_s": loaded - imported}))


if __name__ == "__main__":
    main()
