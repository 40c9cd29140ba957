"""Keep batching-rule family registrations one op per line, sorted.

clang-format bin-packs template arguments, which would put a whole family on a few dense lines
where a reader cannot see which ops it holds and a diff cannot show one op.  This tool owns those
statements instead: each `registerFamily<Rule, op, op, ...>(m);` is written as the rule on the
first line, then one op per line in sorted order, fenced by clang-format off/on markers.

  python scripts/families.py --check   # exit 1 and name the files that differ (CI)
  python scripts/families.py --fix     # rewrite them in place (scripts/format.sh runs this)
"""

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OFF, ON = "// clang-format off", "// clang-format on"
# A statement: optional fence, indentation, registerFamily<...>(m); with no nested template brackets.
STMT = re.compile(
    r"(?P<fence>[ \t]*// clang-format off\n)?"
    r"(?P<indent>[ \t]*)registerFamily<(?P<args>[^<>;]*)>\((?P<lib>\w+)\);"
    r"(?P<tail>\n[ \t]*// clang-format on)?"
)


def _render(m: re.Match) -> str:
    indent = m.group("indent")
    args = [a.strip() for a in m.group("args").split(",") if a.strip()]
    rule, ops = args[0], sorted(set(args[1:]))
    if len(ops) != len(args) - 1:
        raise SystemExit(f"duplicate op in registerFamily<{rule}, ...>")
    lines = [f"{indent}{OFF}", f"{indent}registerFamily<{rule},"]
    lines += [f"{indent}    {op}," for op in ops]
    lines[-1] = lines[-1][:-1] + f">({m.group('lib')});"
    lines.append(f"{indent}{ON}")
    return "\n".join(lines)


def format_text(text: str) -> str:
    return STMT.sub(_render, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true")
    g.add_argument("--fix", action="store_true")
    args = ap.parse_args()
    bad = []
    for path in sorted((ROOT / "csrc").rglob("*.cpp")) + sorted((ROOT / "examples").rglob("*.cpp")):
        text = path.read_text()
        new = format_text(text)
        if new != text:
            bad.append(path.relative_to(ROOT))
            if args.fix:
                path.write_text(new)
    if bad and args.check:
        print("family registrations not one op per line, sorted, in:", *map(str, bad), sep="\n  ")
        print("fix with: bash scripts/format.sh")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
