"""How much of the Q4_K_M quantization loss qat_kd recovers, measured through llama.cpp.

    python bench/qat_recovery.py [--profile phone-1gb] [--out export/phone-1gb] [--set k=v ...]

Builds (or reuses) distill, qlora and qat_kd for the embedded default, then prints
gap before = kld(Q4_K_M GGUF of the student without qat_kd) - kld(full-precision student),
gap after  = kld(Q4_K_M GGUF of the student after qat_kd)   - kld(full-precision student),
recovered  = 1 - gap after / gap before.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgekd import pipeline, stages
from edgekd.config import load_profile, load_recipe
from edgekd.effective import build_chain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="phone-1gb")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    profile = load_profile(args.profile)
    recipe = load_recipe(None, args.overrides)
    run = args.out or Path("export") / profile.name
    trained = [s.name for s in build_chain(profile, recipe, []) if s.kind == "train"]
    pipeline.build(profile, recipe, run, trained)
    report = json.loads((run / stages.get("qat_kd").folder / "report.json").read_text())
    rec = report["recovery"]
    print(f"\nmeasured in {rec['measured_in']}; held-out kld to the teacher")
    print(f"full-precision student   {rec['kld_full_precision']:.4f}")
    print(f"gap before (no qat_kd)   {rec['gap_before']:.4f}")
    print(f"gap after  (qat_kd)      {rec['gap_after']:.4f}")
    print(f"recovered                {rec['recovered']:.1%}")
    print(f"gap after, own weights   {rec['gap_after_own_weights']:.4f}  (qat_kd also trains on)")
    print(f"recovered, own weights   {rec['recovered_own_weights']:.1%}")


if __name__ == "__main__":
    main()
