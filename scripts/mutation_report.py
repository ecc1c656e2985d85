"""Score per module of a mutmut run, run from the folder that holds ``mutants/`` (scripts/mutation.sh).

A survivor listed in the equivalents file (one line per mutant: ``- `module.function`: `original` ->
`mutated`: why``) is excluded from the score; it is matched on the function and the changed source
text, not on mutmut's mutant number, which moves when the code changes. Score = (killed + timeout) /
(mutants tested - equivalent). Listed equivalents that no longer survive are reported as stale.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {1, 3, 37}  # a test failed, pytest failed internally, the type checker refused it
SURVIVED = {0}
NO_TESTS = {5, 33}
TIMEOUT = {-24, 24, 152, 255, 36}
LINE = re.compile(r"^- `(?P<function>[\w.]+)`: `(?P<original>.*?)` -> `(?P<mutated>.*?)`: (?P<why>.+)$")


def _normal(text: str) -> str:
    return " ".join(text.split())


def read_equivalents(path: Path) -> dict[tuple[str, str, str], str]:
    """(module.function, original text, mutated text) -> reason."""
    listed = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        match = LINE.match(line.strip())
        if match:
            key = (match["function"], _normal(match["original"]), _normal(match["mutated"]))
            listed[key] = match["why"]
    return listed


def function_of(mutant: str) -> str:
    """tinydeploy.growth.linalg.x_psd_sqrt__mutmut_3 -> tinydeploy.growth.linalg.psd_sqrt (methods: Class.name)."""
    module, _, mangled = mutant.partition("__mutmut_")[0].rpartition(".")
    name = mangled[2:] if mangled.startswith("x_") else ".".join(p for p in mangled[1:].split("ǁ") if p)
    return f"{module}.{name}"


def changed_text(mutant: str, source: Path) -> tuple[str, str]:
    """The removed and added source text of a mutant (whitespace collapsed)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(mutant, path=source).splitlines()[2:]
    removed = [line[1:] for line in diff if line.startswith("-")]
    added = [line[1:] for line in diff if line.startswith("+")]
    return _normal(" ".join(removed)), _normal(" ".join(added))


def status(code: int | None) -> str:
    if code is None:
        return "not run"
    for name, codes in (("killed", KILLED), ("survived", SURVIVED), ("no tests", NO_TESTS), ("timeout", TIMEOUT)):
        if code in codes:
            return name
    return "suspicious"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--equivalents", type=Path, default=Path("tests/mutation_equivalents.md"))
    args = parser.parse_args()
    listed = read_equivalents(args.equivalents)
    counts: dict[str, Counter] = defaultdict(Counter)
    used, left = set(), []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        source = meta.relative_to("mutants").with_suffix("")
        module = source.with_suffix("").as_posix().replace("/", ".")
        try:
            codes = json.loads(meta.read_text())["exit_code_by_key"]
        except json.JSONDecodeError:  # mutmut is rewriting it right now (a report during a run)
            time.sleep(1.0)
            codes = json.loads(meta.read_text())["exit_code_by_key"]
        for mutant, code in sorted(codes.items()):
            verdict = status(code)
            if verdict in ("survived", "no tests", "suspicious"):
                removed, added = changed_text(mutant, source)
                key = (function_of(mutant), removed, added)
                if key in listed:
                    verdict = "equivalent"
                    used.add(key)
                else:
                    left.append(f"{verdict:9s} {mutant}: `{removed}` -> `{added}`")
            counts[module][verdict] += 1
    columns = ("killed", "timeout", "survived", "no tests", "suspicious", "equivalent", "not run")
    header = f"{'module':36s} {'mutants':>7s} " + " ".join(f"{c:>10s}" for c in columns) + f" {'score':>6s}"
    print(header)
    print("-" * len(header))
    total: Counter = Counter()
    for module in sorted(counts):
        total.update(counts[module])
        print(_row(module, counts[module], columns))
    print("-" * len(header))
    print(_row("total", total, columns))
    if left:
        print("\nNot killed (add a test, or list a truly equivalent one in the equivalents file):")
        print("\n".join(left))
    stale = [key for key in listed if key not in used and any(key[0].startswith(f"{m}.") for m in counts)]
    if stale and not total["not run"]:  # only a complete run can tell
        print("\nListed as equivalent but not found among this run's survivors (killed now, or the code changed):")
        print("\n".join(f"- `{f}`: `{o}` -> `{m}`" for f, o, m in stale))
    return 0


def _row(name: str, c: Counter, columns: tuple[str, ...]) -> str:
    tested = sum(c.values()) - c["not run"] - c["equivalent"]
    score = f"{100 * (c['killed'] + c['timeout']) / tested:5.1f}%" if tested else "    -"
    return f"{name:36s} {sum(c.values()):7d} " + " ".join(f"{c[col]:10d}" for col in columns) + f" {score:>6s}"


if __name__ == "__main__":
    raise SystemExit(main())
