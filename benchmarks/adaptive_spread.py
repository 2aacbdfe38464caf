"""How much of the adaptive A2's ROC-AUC is the attacker's own luck? The same attack, several training seeds.

`semid bench` trains the adaptive attacker A2 once per method (sampling seed 0), on the method's outputs
of the training subjects, and reads one ROC-AUC off its 16 probes. Two versions of a method, or two
methods, can then differ by the attacker's draw rather than by what the outputs give away. This script
repeats that attack with several sampling seeds on the same outputs (each method de-identifies each
volume once) and prints, per method, the AUC of each seed with their mean and spread.

The configuration is the full `semid bench`'s (16 subjects of seed 2026, 200 steps on 20 training
subjects x 2 visits) at ``p = 1``; seed 0 is the bench's own attacker, so its column repeats the
bench table's `a2_adaptive_auc`.

Usage: ``python benchmarks/adaptive_spread.py [--methods semid,block] [--seeds 0,1,2,3,4] [--quick]
[--population-seed N] [--out FILE.md]`` (``--quick``: the quick bench's population and attacker).
The tables of this script in the README are in ``benchmarks/results/adaptive_spread_*.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from semid.eval.attack_reid import ReidAttack
from semid.eval.baselines import get_method
from semid.eval.bench import BenchConfig, _cases


def spread(config: BenchConfig, methods: dict[str, Any], seeds: list[int], level: float = 1.0) -> list[dict]:
    """Per method (name -> ``get_method(name)``): the adaptive A2's ROC-AUC and rank-1 for each sampling
    seed, on the same outputs."""
    gallery, cases, _ = _cases(config, lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr))
    reid = ReidAttack.load()
    rows = []
    for name, method in methods.items():
        probes = [(c.subject_id, method.run(c.image, level).image) for c in cases]
        static = reid.evaluate(gallery, probes)
        cache: dict = {}  # the training subjects' outputs, made once and shared by every seed
        aucs, rank1s = [], []
        for seed in seeds:
            adapted = reid.adapt(deidentify=lambda img, m=method: m.run(img, level).image,
                                 steps=config.adaptive_steps, n_subjects=config.adaptive_subjects,
                                 deid_visits=config.adaptive_visits, cache=cache, seed=seed)
            result = adapted.evaluate(gallery, probes)
            aucs.append(result["roc_auc"])
            rank1s.append(result["rank1"])
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: adaptive AUC {result['roc_auc']:.4f}",
                  file=sys.stderr)
        rows.append({"method": name, "static_auc": static["roc_auc"], "aucs": aucs, "rank1s": rank1s})
    return rows


def table(rows: list[dict], seeds: list[int]) -> str:
    head = ["method", "static AUC", *[f"seed {s}" for s in seeds], "mean", "sd", "min–max", "rank-1 mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a = r["aucs"]
        sd = statistics.stdev(a) if len(a) > 1 else 0.0
        lines.append("| " + " | ".join([r["method"], f"{r['static_auc']:.3f}", *[f"{v:.3f}" for v in a],
                                        f"{statistics.mean(a):.3f}", f"{sd:.3f}", f"{min(a):.3f}–{max(a):.3f}",
                                        f"{statistics.mean(r['rank1s']):.3f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="semid,block")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--quick", action="store_true", help="the quick bench's population and attacker")
    parser.add_argument("--population-seed", type=int, help="another phantom population (the bench's `--seed`)")
    parser.add_argument("--out", help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    config = BenchConfig.quick() if args.quick else BenchConfig()
    if args.population_seed is not None:
        config = dataclasses.replace(config, seed=args.population_seed)
    # both checked before the population is made
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes integers separated by commas, not {args.seeds!r}")
    try:
        methods = {name: get_method(name) for name in args.methods.split(",")}
    except ValueError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    rows = spread(config, methods, seeds)
    text = (f"Adaptive A2 at p = 1 with {len(seeds)} attacker seeds: {config.n_subjects} subjects of seed "
            f"{config.seed}, {config.adaptive_steps} steps on {config.adaptive_subjects} training subjects x "
            f"{len(config.adaptive_visits)} visit(s); {time.perf_counter() - started:.0f} s.\n\n" + table(rows, seeds))
    print(text)
    if args.out:
        out = Path(args.out)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
