#!/usr/bin/env python
"""Pack the training anatomies into one small file that travels with the code (e.g. to a GPU
machine without network): every non-test subject of the data folder, affinely aligned to the
reference, on one 2 mm grid (see liquidreg_tools.data.bundle and DATA.md).

    python scripts/fetch_data.py --out data
    python scripts/make_training_bundle.py --data data --out data/bundle.npz
"""
import argparse
import sys
from pathlib import Path

from liquidreg_tools.data import bundle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data", help="folder written by scripts/fetch_data.py")
    parser.add_argument("--out", default="data/bundle.npz")
    args = parser.parse_args(argv)
    packed = bundle.build(args.data)
    bundle.save(packed, args.out)
    size = Path(args.out).stat().st_size / 2 ** 20
    print(f"wrote {args.out}: {len(packed.names)} subjects on {packed.grid.shape} at "
          f"{bundle.SPACING:g} mm, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
