"""Print the requirements of one of setup.py's extras, one per line (scripts/docs.sh installs
them without building the package). Reads setup.py's extras_require literal; runs nothing."""

import ast
import pathlib
import sys

tree = ast.parse((pathlib.Path(__file__).parent.parent / "setup.py").read_text())
for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "extras_require":
        print("\n".join(ast.literal_eval(node.value)[sys.argv[1]]))
        break
else:
    sys.exit("extras_require not found in setup.py")
