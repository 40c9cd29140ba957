"""`.. public-api:: MODULE`: the API reference of a module, generated from its `__all__`.

Emits a summary table and one autodoc entry (autofunction/autoclass/autodata) per public name, in
`__all__` order, so a function added to `__all__` appears in the reference without touching the
docs. Submodules and dunder names are skipped (they get their own sections). An object already
documented under another module on the same page (e.g. `functorch_lite.func.vmap` is
`functorch_lite.vmap`) is listed as an alias instead of being documented twice. With `:optional:`
a module that does not exist produces nothing, so the page builds before it exists.
"""

import importlib
import importlib.util
import inspect

from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective


def public_names(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return [n for n in names if not n.startswith("__") and not inspect.ismodule(getattr(module, n, None))]


class PublicAPI(SphinxDirective):
    required_arguments = 1
    option_spec = {"optional": directives.flag}

    def run(self):
        modname = self.arguments[0]
        if "optional" in self.options and importlib.util.find_spec(modname) is None:
            return []
        module = importlib.import_module(modname)  # a module that exists but fails: an error
        seen = self.env.temp_data.setdefault("public_api_seen", {})
        own, aliases = [], []
        for name in public_names(module):
            obj = getattr(module, name)
            if id(obj) in seen:
                aliases.append((name, seen[id(obj)]))
            else:
                seen[id(obj)] = f"{modname}.{name}"
                own.append((name, obj))
        lines = [f".. currentmodule:: {modname}", ""]
        if own:
            lines += [".. autosummary::", "   :nosignatures:", ""]
            lines += [f"   {name}" for name, _ in own]
            lines.append("")
        if aliases:
            lines += [f"Same objects as documented above: {', '.join(_alias(n, t) for n, t in aliases)}.", ""]
        for name, obj in own:
            if inspect.isclass(obj):
                lines += [f".. autoclass:: {name}", "   :members:", "   :show-inheritance:", ""]
            elif callable(obj):
                lines += [f".. autofunction:: {name}", ""]
            else:
                lines += [f".. autodata:: {name}", "   :no-value:", ""]
        return self.parse_text_to_nodes("\n".join(lines))


def _alias(name, target):
    return f"``{name}`` (:py:obj:`{target}`)"


def setup(app):
    app.add_directive("public-api", PublicAPI)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
