"""Packing: packed bytes against ceil(n*b/8) for every width, and pack/unpack throughput.

    python benchmarks/packing.py [--numel 16777216] [--repeats 5]

Prints a table and writes benchmarks/results/packing.json. Throughput is the best of
``--repeats`` runs (weights per second), on this machine's CPU threads.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from _common import print_table, write_json
from moeq.quant.pack import pack_codes, unpack_codes


def best_seconds(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=16 * 2**20 + 3, help="codes per run (odd on purpose)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.numel
    rows = []
    for bits in range(1, 9):
        codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, n), codes), "round trip must be bit-exact"
        theory = math.ceil(n * bits / 8)
        pack_s = best_seconds(lambda: pack_codes(codes, bits), args.repeats)
        unpack_s = best_seconds(lambda: unpack_codes(packed, bits, n), args.repeats)
        rows.append({
            "bits": bits, "codes": n, "packed_bytes": packed.numel(), "theory_bytes": theory,
            "exact": packed.numel() == theory, "pack_weights_per_s": n / pack_s, "unpack_weights_per_s": n / unpack_s,
        })
    print_table(
        ["bits", "codes", "packed bytes", "ceil(n*b/8)", "equal", "pack Mw/s", "unpack Mw/s"],
        [[r["bits"], r["codes"], r["packed_bytes"], r["theory_bytes"], r["exact"],
          f"{r['pack_weights_per_s'] / 1e6:.0f}", f"{r['unpack_weights_per_s'] / 1e6:.0f}"] for r in rows],
    )
    print(f"wrote {write_json('packing', rows, numel=n, repeats=args.repeats)}")


if __name__ == "__main__":
    main()
