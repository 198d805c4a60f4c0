"""Write the seeded tiny weight set, offline, in the production layout: python scripts/make_tiny_weights.py DIR"""

import argparse
import logging
from pathlib import Path

from sdxl.model.random_weights import SEED, write_tiny_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(write_tiny_weights(args.dir, seed=args.seed))


if __name__ == "__main__":
    main()
