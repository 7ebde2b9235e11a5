"""Markdown table of DAGER frontier records (issue 20): one row per trial with the model, B, the
declared defense, ROUGE-1/2, seconds per batch, the certified fraction and whether the ranked
search ran. ``python bench/dager_frontier_table.py RUN_DIR/*/records.jsonl``."""
from __future__ import annotations

import json
import sys


def rows(paths: list[str]) -> list[str]:
    out = ["| model | B | defense | seed/trial | ROUGE-1 | ROUGE-2 | s/batch | certified | ranked search | commit |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            case, st, m = r["case"], r.get("attack_stats") or {}, r.get("metrics") or {}
            d = case.get("defenses") or []
            dfn = ", ".join(f"{x['name']} {x.get('sigma', '')}".strip() for x in d) or "none"
            b = case.get("protocol", {}).get("batch_size")
            code = r.get("code") or {}
            commit = code.get("git", "")[:8] + (" (dirty)" if code.get("dirty") else "")
            out.append(f"| {case['model']} | {b} | {dfn} | {r.get('seed')}/{r.get('trial')} | "
                       f"{m.get('rouge1', 0):.3f} | {m.get('rouge2', 0):.3f} | {r['cost']['attack_s']:.0f} | "
                       f"{st.get('certified', 0):.2f} | {'yes' if st.get('frontier') else 'no'} | {commit} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows(sys.argv[1:])))
