"""Compare per-test outcomes of PEFT's tests unpatched (baseline) and patched by coto_kernels; write the report.

A *regression* is a test that passes unpatched and does not pass patched. Under the real schedule
(``schedule`` mode) adapters are switched off at random in training forwards, which legitimately changes what
a training test measures, so there a failing assertion counts only if no adapter was gated off during the test
(its forwards then computed exactly what ``schedule="off"`` computes); any other exception is a crash and counts.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

HUB = "needs the Hugging Face Hub"


def _counts(records: dict[str, dict]) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for record in records.values():
        counts[record["outcome"]] += 1
    return counts


def _is_regression(base: dict, patched: dict | None, mode: str) -> bool:
    if base["outcome"] != "passed":
        return False
    if patched is None or patched["outcome"] == "skipped":
        return True
    if patched["outcome"] == "passed":
        return False
    # Under the schedule a failing assertion after a forward with adapters gated off is expected.
    return not (mode == "schedule" and patched["error"] == "AssertionError" and patched["gated_off"])


def compare(base: dict[str, dict], patched: dict[str, dict], mode: str) -> dict:
    """Regressions, tests fixed by the patch, and the schedule's expected differences of one patched mode."""
    regressions, expected = [], []
    for nodeid, record in base.items():
        other = patched.get(nodeid)
        if _is_regression(record, other, mode):
            regressions.append({"nodeid": nodeid, "patched": other})
        elif record["outcome"] == "passed" and other is not None and other["outcome"] == "failed":
            expected.append(nodeid)
    fixed = [n for n, r in base.items() if r["outcome"] == "failed" and patched.get(n, {}).get("outcome") == "passed"]
    return {"mode": mode, "counts": _counts(patched), "regressions": regressions, "expected_differences": expected,
            "passes_only_patched": fixed}


def write_report(out: Path, peft_version: str, results: dict[str, dict[str, dict]], comparisons: dict[str, dict],
                 selection: dict) -> Path:
    base = results["none"]
    hub = sorted(n for n, r in base.items() if r["outcome"] == "skipped" and HUB in (r["message"] or ""))
    skipped_other = sorted((n, r["message"]) for n, r in base.items()
                           if r["outcome"] == "skipped" and HUB not in (r["message"] or ""))
    failing = sorted((n, r["error"], r["message"]) for n, r in base.items() if r["outcome"] == "failed")
    lines = [
        f"# PEFT {peft_version}'s own tests, unpatched vs patched by coto_kernels",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; selection (file: test-id regex):",
        "",
        *[f"- `{path}`: `{pattern or 'all'}`" for path, pattern in selection.items()],
        "",
        "| mode | passed | failed | skipped | regressions |",
        "|---|---|---|---|---|",
        f"| none (baseline) | {_counts(base)['passed']} | {_counts(base)['failed']} | {_counts(base)['skipped']} | |",
    ]
    for mode, c in comparisons.items():
        n = c["counts"]
        lines.append(f"| {mode} | {n['passed']} | {n['failed']} | {n['skipped']} | {len(c['regressions'])} |")
    for mode, c in comparisons.items():
        lines += ["", f"## Regressions in mode `{mode}` (pass unpatched, fail patched): {len(c['regressions'])}"]
        for item in c["regressions"]:
            patched = item["patched"] or {"outcome": "missing", "error": None, "message": ""}
            lines.append(f"- `{item['nodeid']}`: {patched['outcome']} {patched['error'] or ''} {patched['message']}")
        if c["expected_differences"]:
            lines.append(f"\nFailing assertions after a training forward with adapters gated off (expected under the "
                         f"schedule): {len(c['expected_differences'])}")
            lines += [f"- `{n}`" for n in c["expected_differences"]]
        if c["passes_only_patched"]:
            lines.append(f"\nPass only patched: {len(c['passes_only_patched'])}")
    lines += ["", f"## Skipped: need the Hugging Face Hub (offline here): {len(hub)}", *[f"- `{n}`" for n in hub]]
    lines += ["", f"## Skipped for other reasons: {len(skipped_other)}",
              *[f"- `{n}`: {m}" for n, m in skipped_other]]
    lines += ["", f"## Fail unpatched too (not counted): {len(failing)}", *[f"- `{n}`: {e} {m}" for n, e, m in failing]]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "outcomes.json").write_text(json.dumps({"peft": peft_version, "results": results,
                                                   "comparisons": comparisons}, indent=1))
    return report
