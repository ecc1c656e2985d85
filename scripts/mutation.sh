#!/usr/bin/env bash
# Mutation testing with mutmut (configured in pyproject.toml, [tool.mutmut]); not part of CI.
#
#   scripts/mutation.sh [--minutes N] [--jobs N] [--tests "PATH ..."] [--resume | --retest [--only TEXT]]
#                       [--mutants "PATTERN ..."] [MODULE ...]
#
# MODULE is a file or a folder under tinydeploy/ (default: the only_mutate list of pyproject.toml:
# tinydeploy/growth/ and the export, verify and serving modules). The tree (git's tracked and untracked,
# not ignored files) is copied to $MUTATION_DIR (default .mutation/, git-ignored); mutmut mutates the copy,
# runs the tests that cover each mutated function against it, and stops after --minutes (default 90).
# The score per module (killed / timeout / survived / no tests / equivalent-excluded, see
# tests/mutation_equivalents.md) is printed at the end, and also after a stop at the time limit.
# --tests narrows the tests run against the mutants (default: all of tests/; for tinydeploy/growth/ the
# growth unit tests are enough and several times faster). --resume keeps the results of an earlier run
# of the same modules and tests, and tests only what is left; --retest also runs the survivors and
# timeouts of that run (except listed equivalents) again against the tests as they are now; --only TEXT
# retests only the mutants whose name contains TEXT (e.g. tinydeploy.growth.policy). --mutants tests only
# the mutants whose names match one of the fnmatch patterns (e.g. "*statistics.x__add__mutmut_*" for the
# function _add, "*surgery.xǁGrownOutputǁ*" for a class's methods): the functions a change touched.
set -euo pipefail

minutes=90
jobs=$(nproc 2>/dev/null || echo 2)
resume=0
retest=0
tests=""
only=""
mutants=""
modules=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --minutes) minutes=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --tests) tests=$2; shift 2 ;;
        --resume) resume=1; shift ;;
        --retest) resume=1; retest=1; shift ;;
        --only) only=$2; shift 2 ;;
        --mutants) mutants=$2; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "error: unknown option $1: use --minutes N, --jobs N, --tests PATHS, --resume, --retest, --only TEXT, --mutants PATTERNS or module paths" >&2; exit 2 ;;
        *) modules+=("$1"); shift ;;
    esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python=${PYTHON:-python}
if ! "$python" -c "import mutmut, hypothesis" 2>/dev/null; then
    echo "error: mutmut and hypothesis are not importable by '$python': pip install -e '.[test,mutation]' (or set PYTHON)" >&2
    exit 2
fi
mutmut="$(dirname "$(command -v "$python")")/mutmut"
[[ -x "$mutmut" ]] || mutmut=$(command -v mutmut)

patterns=()
for module in "${modules[@]}"; do
    module=${module%/}
    if [[ -d "$module" && "$module" == tinydeploy* ]]; then
        patterns+=("$module/*")
    elif [[ -f "$module" && "$module" == tinydeploy/*.py ]]; then
        patterns+=("$module")
    else
        echo "error: '$module' is not a Python file or folder under tinydeploy/: pass e.g. tinydeploy/growth/ or tinydeploy/export/verify.py" >&2
        exit 2
    fi
done

test_paths=()
for path in $tests; do  # unquoted: globs such as tests/test_growth*.py expand here
    [[ -e "$path" ]] || { echo "error: --tests: '$path' does not exist: pass test files or folders, e.g. tests/test_growth.py" >&2; exit 2; }
    test_paths+=("$path")
done

work=${MUTATION_DIR:-$repo/.mutation}
selection="${patterns[*]:-default} | ${test_paths[*]:-tests/}"
if [[ $resume -eq 0 || ! -f "$work/.selection" || "$(cat "$work/.selection")" != "$selection" ]]; then
    rm -rf "$work"  # mutmut keeps results per mutant name: a new selection or source starts clean
fi
mkdir -p "$work"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard | grep -zv '^\.mutation/' | tar --null -cf - -T - | tar -xf - -C "$work"
else
    tar --exclude=./.mutation --exclude=./.venv --exclude=./mutants -cf - . | tar -xf - -C "$work"
fi
echo "$selection" > "$work/.selection"
"$python" - "$work/pyproject.toml" "${test_paths[*]:-}" "${patterns[@]}" <<'EOF'
import json, re, sys
path, tests, patterns = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
text = open(path, encoding="utf-8").read()
if patterns:
    text, count = re.subn(r"(?ms)^only_mutate = \[.*?^\]", "only_mutate = " + json.dumps(patterns), text)
    assert count == 1, "pyproject.toml has no multi-line only_mutate list under [tool.mutmut]"
if tests:
    text, count = re.subn(r"(?m)^pytest_add_cli_args_test_selection = .*$",
                          "pytest_add_cli_args_test_selection = " + json.dumps(tests), text)
    assert count == 1, "pyproject.toml has no pytest_add_cli_args_test_selection under [tool.mutmut]"
open(path, "w", encoding="utf-8").write(text)
EOF

cd "$work"
# One thread per process: the workers are forked, and small matrices are faster on one thread anyway.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
unset PYTHONPATH  # the tests must import the mutated copy, never the checkout
again=()
if [[ $retest -eq 1 && -d mutants ]]; then  # mutmut reruns only the mutants it is given by name
    mapfile -t again < <("$python" - "$repo/scripts" "$repo/tests/mutation_equivalents.md" "$only" <<'EOF'
import json, pathlib, sys
sys.path.insert(0, sys.argv[1])
only = sys.argv[3]
from mutation_report import changed_text, function_of, read_equivalents
listed = read_equivalents(pathlib.Path(sys.argv[2]))
for meta in pathlib.Path("mutants").rglob("*.py.meta"):
    source = meta.relative_to("mutants").with_suffix("")
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if only not in name:
            continue
        if code in (0, 5, 33, 36, 24, -24, 152, 255) and (function_of(name), *changed_text(name, source)) not in listed:
            print(name)
EOF
)
    echo "retesting ${#again[@]} mutants that survived or timed out (listed equivalents excluded)"
fi
if [[ $retest -eq 0 && -n "$mutants" ]]; then
    read -r -a again <<< "$mutants"
fi
start=$(date +%s)
status=0
timeout --signal=INT --kill-after=60 "${minutes}m" "$mutmut" run --max-children "$jobs" "${again[@]}" > mutmut.log 2>&1 || status=$?
elapsed=$(( $(date +%s) - start ))
if [[ $status -eq 124 ]]; then
    echo "stopped at the time limit of ${minutes} min: rerun with --resume to test the rest"
elif [[ $status -ne 0 ]]; then
    tail -n 30 mutmut.log | tr '\r' '\n' | grep -v '^\s*$' | tail -n 15 >&2
    echo "error: mutmut failed (exit $status); the log is $work/mutmut.log" >&2
fi
echo "mutmut ran ${elapsed} s with ${jobs} workers in $work"
"$python" "$repo/scripts/mutation_report.py" --equivalents "$repo/tests/mutation_equivalents.md"
[[ $status -eq 0 || $status -eq 124 ]]
