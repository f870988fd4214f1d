"""KD against hard labels only: the same pruned student, data, seed and number of tokens, trained
once with the default KD loss and once with alpha=0 (cross-entropy on the teacher's answers).

    python bench/kd_vs_ce.py [--profile phone-1gb] [--set k=v ...]

The KD arm is the distill stage of the default build (export/<profile>, reused when it is up to
date); the CE arm is built in export/<profile>-ce from the same cached corpus. Prints both
students' held-out kld and ppl (against the teacher) and the ratios KD / CE.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from edgekd import pipeline
from edgekd.config import load_profile, load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="phone-1gb")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    profile = load_profile(args.profile)
    reports = {}
    kd_run = Path("export") / profile.name
    for name, run, extra in (
        ("kd", kd_run, []),
        ("ce", kd_run.with_name(kd_run.name + "-ce"), ["distill.kd.alpha=0"]),
    ):
        if name == "ce" and (kd_run / "cache").exists():
            # Same corpus and teacher reference: copy the cache instead of generating it again.
            shutil.copytree(kd_run / "cache", run / "cache", dirs_exist_ok=True)
        pipeline.build(profile, load_recipe(None, [*args.overrides, *extra]), run, ["distill"])
        reports[name] = json.loads((run / "01-distill" / "report.json").read_text())

    before = reports["kd"]["quality"]["student before"]
    print(f"\nheld-out slice: {before['tokens']} tokens; teacher reference at T=1")
    print(f"{'':22}{'kld':>10}{'ppl':>10}{'top1':>8}")
    row = f"{before['kld']:>10.4f}{before['ppl']:>10.3f}{before['top1']:>8.3f}"
    print(f"{'pruned, untrained':22}{row}")
    for name in ("kd", "ce"):
        q = reports[name]["quality"]["student after"]
        label = f"{name} (alpha={reports[name]['settings']['distill']['alpha']})"
        print(f"{label:22}{q['kld']:>10.4f}{q['ppl']:>10.3f}{q['top1']:>8.3f}")
    kd, ce = (reports[n]["quality"]["student after"] for n in ("kd", "ce"))
    print(f"ratio KD/CE: kld {kd['kld'] / ce['kld']:.3f}, ppl {kd['ppl'] / ce['ppl']:.3f}")


if __name__ == "__main__":
    main()
