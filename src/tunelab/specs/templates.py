"""Grader templates: `{{ sample.output_text }}`, `{{ sample.output_json.field }}`, `{{ item.a.b }}`.

Reads a template string and one (sample, item) pair; returns the rendered text. Rendering runs in
jinja2's SandboxedEnvironment (no attribute access to Python internals). A key the item lacks is an
error for that example (the data or the template is wrong: never a silent empty string); a key the
sample's output_json lacks renders empty (the model did not produce it: the grader scores that).
Dicts and lists render as JSON.

A template substitutes values; it does not compute. At load (check_template) a template is at most
MAX_TEMPLATE_CHARS and holds only text, values (`{{ item.a.b }}`, `{{ item.list[0] }}`), filters of
SAFE_FILTERS, and `{% if %}` / `x if c else y` with comparisons and tests: no
loops, calls, arithmetic or string repetition, so rendering is linear in the template and the record
(`{{ range(10**8) }}`, `{{ 'a' * 3000000000 }}` and nested loops are refused before any example).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.sandbox import SandboxedEnvironment

MAX_TEMPLATE_CHARS = 65536
# filters whose output is no larger than a small multiple of their input, whatever their arguments
SAFE_FILTERS = frozenset({"lower", "upper", "trim", "title", "capitalize", "tojson", "string", "length", "count",
                          "first", "last", "default", "d", "striptags", "escape", "e", "float", "int", "abs",
                          "round", "list", "unique", "sort", "reverse", "min", "max", "sum"})
_ALLOWED_NODES = (nodes.Template, nodes.Output, nodes.TemplateData, nodes.Name, nodes.Getattr, nodes.Getitem,
                  nodes.Const, nodes.Filter, nodes.If, nodes.CondExpr, nodes.Compare, nodes.Operand, nodes.And,
                  nodes.Or, nodes.Not, nodes.Test, nodes.Neg, nodes.Pos, nodes.Keyword)


class TemplateProblem(ValueError):
    """A template does not render for this example (one line, names the missing key)."""


class _StrictItem(dict):
    """An item (or a mapping inside it): reading a key it lacks is an error, not an empty string."""

    path: str = "item"


def strict_item(value: Any, path: str = "item") -> Any:
    if isinstance(value, Mapping):
        wrapped = _StrictItem({key: strict_item(child, f"{path}.{key}") for key, child in value.items()})
        wrapped.path = path
        return wrapped
    if isinstance(value, list):
        return [strict_item(child, f"{path}[{i}]") for i, child in enumerate(value)]
    return value


class _Environment(SandboxedEnvironment):
    """Mappings are read by key first, so a record key named like a dict method (items, values, get)
    gives its value, as a JSON path would."""

    def _key(self, obj: Any, key: Any) -> Any:
        if key in obj:
            return obj[key]
        if isinstance(obj, _StrictItem):
            keys = ", ".join(sorted(map(str, obj))) or "none"
            raise TemplateProblem(f"{obj.path} has no key '{key}' (keys: {keys})")
        return self.undefined(obj=obj, name=key)

    def getattr(self, obj: Any, attribute: str) -> Any:
        return self._key(obj, attribute) if isinstance(obj, Mapping) else super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        return self._key(obj, argument) if isinstance(obj, Mapping) else super().getitem(obj, argument)


def _finalize(value: Any) -> Any:
    if isinstance(value, Mapping | list):
        return json.dumps(value, ensure_ascii=False)
    return value


_ENVIRONMENT = _Environment(autoescape=False, keep_trailing_newline=True, finalize=_finalize)


@lru_cache(maxsize=256)
def _compiled(template: str) -> Any:
    try:
        return _ENVIRONMENT.from_string(template)
    except TemplateError as err:
        raise TemplateProblem(f"template {template!r} does not parse: {err}") from None


def check_template(template: str, namespaces: tuple[str, ...] = ("sample", "item")) -> None:
    """Raises TemplateProblem when the template does not parse or names a namespace other than these
    (checked when the recipe loads, so a typo such as {{ itme.x }} never reaches an example)."""
    from jinja2 import meta

    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateProblem(f"template of {len(template)} characters: at most {MAX_TEMPLATE_CHARS}")
    try:
        tree = _ENVIRONMENT.parse(template)
        names = meta.find_undeclared_variables(tree)
    except (TemplateError, RecursionError) as err:
        raise TemplateProblem(f"template {template[:80]!r} does not parse: {str(err)[:200]}") from None
    for node in tree.find_all(nodes.Node):
        if not isinstance(node, _ALLOWED_NODES) or isinstance(node, nodes.Filter) and node.name not in SAFE_FILTERS:
            what = f"filter {node.name}" if isinstance(node, nodes.Filter) else type(node).__name__
            raise TemplateProblem(f"template {template[:80]!r}: {what} is not allowed; a grader template substitutes "
                                  "values ({{ item.key }}, {{ sample.output_text | lower }}, {% if %}), without "
                                  "loops, calls or arithmetic")
    unknown = sorted(names - set(namespaces))
    if unknown:
        raise TemplateProblem(f"template {template!r} uses {', '.join(unknown)}; templates read only "
                              f"{' and '.join(namespaces)}, e.g. {{{{ {namespaces[-1]}.reference }}}}")


def render(template: str, sample: Mapping[str, Any], item: Mapping[str, Any],
           more: Mapping[str, Any] | None = None) -> str:
    """`more`: further namespaces (a pairwise judge's sample_a and sample_b)."""
    try:
        return str(_compiled(template).render(sample=sample, item=strict_item(item), **(more or {})))
    except TemplateProblem:
        raise
    except (TemplateError, ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as err:
        raise TemplateProblem(f"template {template[:80]!r}: {type(err).__name__}: {str(err)[:200]}") from None
