"""A multi grader's `calculate_output`: arithmetic over grader names, evaluated by walking its AST.

Reads a formula string; never calls eval(). Allowed: numbers, names, + - * / and ^ or ** (power, as
in OpenAI's formulas), unary + and -, parentheses, and the functions min, max, abs, floor, ceil,
exp, sqrt, log. Anything else (attributes, subscripts, other calls, comparisons, lambdas, strings)
is refused with a message naming it. A formula is at most MAX_FORMULA_CHARS long and nests at most
MAX_FORMULA_DEPTH deep (a chain of 1,500 `a+` terms is refused at load, never a RecursionError).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
    "sqrt": math.sqrt, "log": math.log,
}


MAX_FORMULA_CHARS = 2000
MAX_FORMULA_DEPTH = 200


class FormulaError(ValueError):
    """The formula is not safe arithmetic, or it cannot be computed for these scores."""


def _shown(formula: str) -> str:
    """The formula as an error message quotes it: whole when short, else its start."""
    return repr(formula) if len(formula) <= 80 else repr(formula[:80]) + "..."


def _depth(tree: ast.AST) -> int:
    """How deep the tree nests, counted without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _parse(formula: str) -> ast.expr:
    if len(formula) > MAX_FORMULA_CHARS:
        raise FormulaError(f"calculate_output of {len(formula)} characters: at most {MAX_FORMULA_CHARS}")
    try:  # OpenAI writes power as ^: read as ** so it binds tighter than * and /
        tree = ast.parse(formula.strip().replace("^", "**"), mode="eval")
    except SyntaxError as err:
        raise FormulaError(f"calculate_output {_shown(formula)} is not a formula ({err.msg})") from None
    except (RecursionError, MemoryError):
        raise FormulaError(f"calculate_output {_shown(formula)}: nested too deeply") from None
    if _depth(tree) > MAX_FORMULA_DEPTH:
        raise FormulaError(f"calculate_output {_shown(formula)}: nests more than {MAX_FORMULA_DEPTH} deep; "
                           "write a long sum with fewer levels, e.g. (a + b) + (c + d)")
    for node in ast.walk(tree):
        allowed = isinstance(node, ast.Expression | ast.BinOp | ast.UnaryOp | ast.Name | ast.Load | ast.Call) or (
            isinstance(node, ast.Constant) and type(node.value) in (int, float)) or (
            type(node) in _BINARY or type(node) in _UNARY)
        if not allowed:
            raise FormulaError(f"calculate_output {_shown(formula)}: {type(node).__name__} is not allowed "
                               "(only numbers, grader names, + - * / ^, parentheses and "
                               f"{', '.join(_FUNCTIONS)})")
        if isinstance(node, ast.BinOp) and type(node.op) not in _BINARY:
            raise FormulaError(f"calculate_output {_shown(formula)}: operator {type(node.op).__name__} is not allowed")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords
        ):
            shown = node.func.id if isinstance(node.func, ast.Name) else type(node.func).__name__
            raise FormulaError(f"calculate_output {_shown(formula)}: call of {shown} is not allowed "
                               f"(functions: {', '.join(_FUNCTIONS)})")
        if isinstance(node, ast.Name) and node.id.startswith("__"):
            raise FormulaError(f"calculate_output {_shown(formula)}: name {node.id} is not allowed")
    return tree.body


def formula_names(formula: str) -> set[str]:
    """The grader names a formula uses (raises FormulaError when it is not safe arithmetic)."""
    body = _parse(formula)
    called = {id(node.func) for node in ast.walk(body) if isinstance(node, ast.Call)}
    return {node.id for node in ast.walk(body) if isinstance(node, ast.Name) and id(node) not in called}


def evaluate_formula(formula: str, scores: Mapping[str, float]) -> float:
    """The formula's value for these grader scores."""

    def walk(node: ast.expr) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return float(scores[node.id])
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return float(_FUNCTIONS[node.func.id](*(walk(arg) for arg in node.args)))
        raise FormulaError(f"calculate_output {_shown(formula)}: {type(node).__name__} is not allowed")

    body = _parse(formula)
    try:
        value = walk(body)
    except (ArithmeticError, ValueError, TypeError, RecursionError) as err:
        raise FormulaError(f"calculate_output {_shown(formula)} failed: {err}") from None
    if not math.isfinite(value):
        raise FormulaError(f"calculate_output {_shown(formula)} is not finite ({value}) for scores {dict(scores)}")
    return value
