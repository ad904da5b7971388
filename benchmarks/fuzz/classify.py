"""Group the non-ok instances of results*.jsonl into families.

usage: python benchmarks/fuzz/classify.py fuzz_results_0_700.jsonl
"""
import collections
import json
import sys

HUGE = 1e8  # 1 + |grad f(start)| beyond this: the start sits where exp(.) is astronomically large


def family(r):
    v, st, it = r["verdict"], r["ours"], r["iters"]
    sd = r.get("scale_dual", float("nan"))
    far_rows = any(t.endswith("_far") for t in r["tags"])
    if v.startswith("WRONG"):
        return "A: 'optimal' but wrong (stopping test scaled by the start)"
    if v.startswith("fail_") and r["clarabel"] == "optimal":
        if st == "numerical_error" and it == 0:
            return "B: no start with finite residuals (it 0)" + (" [log(h - Gx)]" if "neglogaff" in r["tags"] else " [other]")
        if st == "numerical_error" and sd > HUGE:
            return "E: early breakdown, huge start gradient"
        if st == "max_iter" and sd > HUGE:
            return "E': max_iter, huge start gradient"
        if st == "max_iter":
            return "C: max_iter (crawl/stall)" + (" [far rows]" if far_rows else " [no far rows]")
        if st == "numerical_error":
            return "F: numerical_error mid-run" + (" [far rows]" if far_rows else "")
        return "other:" + v
    if v.startswith("fail_") and r["clarabel"] in ("infeasible", "unbounded"):
        return "H: infeasible/unbounded not certified (" + st + ")"
    if v.startswith("other_cert"):
        return "H2: wrong kind of certificate"
    return None


def main():
    recs = [json.loads(l) for f in sys.argv[1:] for l in open(f)]
    recs = [r for r in recs if "inst" in r]
    counts = collections.Counter()
    seeds = collections.defaultdict(set)
    dt = collections.Counter()
    for r in recs:
        f = family(r)
        if f:
            counts[f] += 1
            seeds[f].add(r["seed"])
            dt[(f, r["dtype"])] += 1
    total = collections.Counter(r["dtype"] for r in recs)
    print("instances:", dict(total), " problems:", len({r["seed"] for r in recs}))
    print("verdicts:", dict(collections.Counter(r["verdict"] for r in recs).most_common()))
    for f, c in sorted(counts.items()):
        print(f"{c:5d}  ({dt[(f, 'float64')]} f64, {dt[(f, 'float32')]} f32; {len(seeds[f])} problems)  {f}  "
              f"e.g. seeds {sorted(seeds[f])[:6]}")


if __name__ == "__main__":
    main()
