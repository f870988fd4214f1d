"""Chat templates rendered within bounds.

A model's chat template is code written by whoever made the model. jinja's sandbox keeps it away
from Python internals, but not from work: nested loops run for hours, a string doubled in a loop
or `'x' * 10**10` allocates without end, and jinja folds constant expressions (filters included)
while it compiles. Here every loop iteration and call is a step, everything a template builds
(output, concatenations, filter and method results) is charged by its length before or as it is
made, and a render stops at a step, size or time limit with one line naming the template's owner
and the limit. No thread is involved: the limits are checked inside the render itself.

`render` mirrors the environment transformers and llama-cpp-python render chat templates in (the
same options, filters and globals), so a template renders to the same text. `check_compiles`
audits a template that another library will compile (llama-cpp-python does at every model load).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from edgekd.errors import EdgekdError

MAX_STEPS = 1_000_000  # loop iterations, calls and filters in one render
MAX_CHARS = 16_000_000  # characters (list items, int bytes) built in one render
MAX_SECONDS = 10.0  # one render
# The widest indent tojson may use: a single indented line is up to indent x nesting depth.
MAX_JSON_INDENT = 1024


class TemplateRefused(EdgekdError):
    """A chat template stopped at a limit or by the sandbox (not merely failing to render)."""


class _Refused(Exception):
    """A render went past a limit (internal: render turns it into an EdgekdError)."""


@dataclass
class _Budget:
    deadline: float
    steps: int = 0
    chars: int = 0
    refused: str | None = None  # the first refusal, even one jinja swallowed while folding

    def refuse(self, why: str) -> None:
        self.refused = self.refused or why
        raise _Refused(why)


_budget: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


@contextlib.contextmanager
def _bounded() -> Iterator[_Budget]:
    budget = _Budget(time.monotonic() + MAX_SECONDS)
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def _current() -> _Budget:
    budget = _budget.get()
    if budget is None:  # only render and check_compiles run templates
        raise _Refused("it ran outside a bounded render")
    return budget


def _step() -> None:
    budget = _current()
    budget.steps += 1
    if budget.steps > MAX_STEPS:
        budget.refuse(f"it took more than {MAX_STEPS:,} loop iterations and calls")
    if budget.steps % 256 == 0 and time.monotonic() > budget.deadline:
        budget.refuse(f"it rendered for more than {MAX_SECONDS:g} s")


_SIZED = (str, list, tuple, dict, set, frozenset)


def _size(value) -> int:
    if type(value) in _SIZED or isinstance(value, _SIZED):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 8
    return 0


def _charge(n: int) -> None:
    """Count `n` characters about to be (or just) built; refuse past the limit."""
    budget = _current()
    budget.chars += n
    if budget.chars > MAX_CHARS:
        budget.refuse(f"it built more than {MAX_CHARS:,} characters")


def _charged(value):
    _charge(_size(value))
    return value


# --- what a single operation would build, checked before it runs -------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_NUMBER = re.compile(r"\d+")


def _ints(args, kwargs) -> list[int]:
    values = [*args, *kwargs.values()]
    if len(args) == 1 and isinstance(args[0], tuple | dict):  # '%' with a tuple or mapping
        values += list(args[0].values() if isinstance(args[0], dict) else args[0])
    return [v for v in values if isinstance(v, int)]


def _percent_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on len(fmt % args): the text, the widths, the arguments as text."""
    widths = 0
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for n in (width, precision):
            if n == "*":
                widths += max(_ints(args, kwargs), default=0)
            elif n:
                widths += int(n)
    return len(fmt) + widths + sum(len(str(v)) for v in [*args, *kwargs.values()])


def _format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on len(fmt.format(...)): widths in the specs, nested ones as arguments."""
    widths = sum(int(n) for n in _BRACE_NUMBER.findall(fmt) if len(n) < 12)
    if any(len(n) >= 12 for n in _BRACE_NUMBER.findall(fmt)):
        widths = MAX_CHARS + 1
    if "{" in fmt.replace("{{", ""):
        widths += sum(max(v, 0) for v in _ints(args, kwargs))
    return len(fmt) + widths + sum(len(str(v)) for v in [*args, *kwargs.values()])


def _replace_size(s: str, old: str, new: str) -> int:
    hits = len(s) + 1 if old == "" else s.count(old)
    return len(s) + hits * max(len(new) - len(old), 0)


def _joined(sep: str, items) -> tuple[list, int]:
    items = list(items)
    return items, sum(len(str(x)) for x in items) + len(sep) * max(len(items) - 1, 0)


def _width(value) -> int:
    return len(value) if isinstance(value, str) else int(value or 0)


def _precheck(n: int) -> None:
    budget = _current()
    if n > MAX_CHARS - budget.chars:
        budget.refuse(f"it would build more than {MAX_CHARS:,} characters (one step: {n:,})")


def _check_binop(op: str, left, right) -> None:
    if op == "*":
        if isinstance(left, int) and isinstance(right, int):
            _precheck((left.bit_length() + right.bit_length()) // 8)
        elif isinstance(right, int) and not isinstance(left, int | float):
            _precheck(_size(left) * max(right, 0))
        elif isinstance(left, int) and not isinstance(right, int | float):
            _precheck(_size(right) * max(left, 0))
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        _precheck(left.bit_length() * right // 8)
    elif op == "%" and isinstance(left, str):
        args = right if isinstance(right, tuple) else (right,)
        _precheck(_percent_size(left, args, {}))


# String methods a template can call whose result can be far longer than their arguments.
def _check_str_method(name: str, s: str, args: tuple, kwargs: dict) -> tuple:
    bound = inspect.signature(getattr(str, name)).bind(s, *args, **kwargs).arguments
    if name in ("center", "ljust", "rjust", "zfill"):
        _precheck(max(len(s), bound["width"]))
    elif name == "expandtabs":
        _precheck(len(s) * max(bound.get("tabsize", 8), 1))
    elif name == "replace":
        _precheck(_replace_size(s, bound["old"], bound["new"]))
    elif name == "join":
        items, n = _joined(s, bound["iterable"])
        _precheck(n)
        return (items,)
    return args


_STR_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join"}


def _check_filter(name: str, func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Refuse a filter call that would build more than the budget; returns the arguments to use
    (a join's items, materialized once so they can be measured)."""
    bound = inspect.signature(func).bind(*args, **kwargs)
    a = bound.arguments
    if name == "center":
        _precheck(max(len(str(a["value"])), int(a.get("width", 80))))
    elif name == "indent":
        s = str(a["s"])
        _precheck(len(s) + (s.count("\n") + 1) * _width(a.get("width", 4)))
    elif name == "wordwrap":
        s, width = str(a["s"]), max(int(a.get("width", 79)), 1)
        wrap = a.get("wrapstring") or "\n"
        _precheck(len(s) + (len(s) // width + 1) * len(wrap))
    elif name == "replace":
        _precheck(_replace_size(str(a["s"]), str(a["old"]), str(a["new"])))
    elif name == "join" and a.get("attribute") is None:
        a["value"], n = _joined(a.get("d", ""), a["value"])
        _precheck(n)
    elif name == "format":
        _precheck(_percent_size(str(a["value"]), a.get("args", ()), a.get("kwargs", {})))
    elif name == "sum" and not isinstance(a.get("start", 0), int | float):
        # Summing sequences copies the running total at every item: quadratic time.
        _current().refuse("it sums sequences with the sum filter")
    elif name == "tojson" and _width(a.get("indent")) > MAX_JSON_INDENT:
        _current().refuse(f"it indents JSON by more than {MAX_JSON_INDENT}")
    return bound.args, bound.kwargs


# Filters that can build more than they are given, checked before they run.
_AMPLIFYING_FILTERS = {"center", "indent", "wordwrap", "replace", "join", "format", "sum", "tojson"}


def _bounded_filter(name: str, func):
    amplifies = name in _AMPLIFYING_FILTERS

    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _step()
        if amplifies:
            args, kwargs = _check_filter(name, func, args, kwargs)
        return _charged(func(*args, **kwargs))

    return bounded


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' and llama-cpp-python's tojson (no HTML escaping), built piece by piece so a
    # deep structure at a wide indent is refused before it is whole.
    encoder = json.JSONEncoder(
        ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    if indent is None:
        return encoder.encode(x)
    parts = []
    for part in encoder.iterencode(x):
        _charge(len(part))
        parts.append(part)
    return "".join(parts)


def _lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (jinja's names)
    _precheck(n * max * 16)  # words of up to 15 letters and a space
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _raise_exception(message):
    raise TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Hooks(Extension):
    """Where the rewritten template calls in: each loop item, each output, each `~`."""

    tags = {"generation"}  # transformers' assistant-mask tag: its body renders as is

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)

    def loop(self, iterable):
        for item in iterable:
            _step()
            yield item

    def emit(self, value):
        _charge(len(value) if isinstance(value, str) else len(str(value)))
        return value

    def concat(self, *parts):
        texts = [str(p) for p in parts]
        _precheck(sum(map(len, texts)))
        return _charged("".join(texts))


class _Rewrite(NodeTransformer):
    """Route every loop, output and concatenation of a parsed template through _Hooks."""

    def __init__(self, hooks: _Hooks):
        self.hooks = hooks

    def _call(self, name: str, args: list, lineno: int) -> nodes.Call:
        return self.hooks.call_method(name, args, lineno=lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._call("loop", [node.iter], node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [self._call("emit", [child], child.lineno) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return self._call("concat", list(node.nodes), node.lineno)


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox transformers renders chat templates in, with every operation that can loop
    or build text counted."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self):
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Hooks, "jinja2.ext.loopcontrols"]
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals["lipsum"] = _lipsum
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.hooks = next(e for e in self.extensions.values() if isinstance(e, _Hooks))

    def call_binop(self, context, operator, left, right):
        if operator != "+":  # a sum is at most twice what is already charged
            _check_binop(operator, left, right)
        return _charged(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        if getattr(__obj, "__self__", None) is __self.hooks:
            # jinja passes the scope's variables to calls made in loops and blocks.
            return __obj(*args)
        _step()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and getattr(__obj, "__name__", "") in _STR_METHODS:
            args = _check_str_method(__obj.__name__, owner, args, kwargs)
        elif isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (__self.hooks.loop(args[0]), *args[1:])
        return _charged(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        text = value.__self__

        def bounded(*args, **kwargs):
            mapping = value.__name__ == "format_map" and args and isinstance(args[0], dict)
            _precheck(_format_size(text, *(((), args[0]) if mapping else (args, kwargs))))
            return sandboxed(*args, **kwargs)

        return bounded


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    env = _Environment()
    tree = _Rewrite(env.hooks).visit(env.parse(template))
    return env.from_string(tree)


def _refusal(owner: str, why: str) -> TemplateRefused:
    return TemplateRefused(
        f"the chat template of {owner} was refused: {why}; use a model whose chat template you "
        "trust, or fix the template"
    )


def _failure(owner: str, err: Exception) -> EdgekdError:
    if isinstance(err, SecurityError):
        return _refusal(
            owner, f"it tried an unsafe operation ({err}) and was stopped by the sandbox"
        )
    if isinstance(err, _Refused | RecursionError | MemoryError | OverflowError):
        return _refusal(owner, str(err) or type(err).__name__)
    text = " ".join(str(err).split())[:200]
    return EdgekdError(
        f"the chat template of {owner} failed to render a conversation "
        f"({type(err).__name__}: {text}); fix the template or use {{'text'}} rows"
    )


def render(template: str, owner: str, **variables) -> str:
    """The template rendered with `variables` (messages, add_generation_prompt, special tokens),
    within MAX_STEPS, MAX_CHARS and MAX_SECONDS; EdgekdError naming `owner` otherwise."""
    with _bounded() as budget:
        try:
            text = _compiled(template).render(**variables)
        except Exception as err:
            if budget.refused is not None:
                raise _refusal(owner, budget.refused) from None
            raise _failure(owner, err) from None
        if budget.refused is not None:  # refused while compiling, swallowed by jinja's folding
            raise _refusal(owner, budget.refused)
    return text


# --- templates other libraries compile --------------------------------------------------------

_AMPLIFYING_NODES = (nodes.BinExpr, nodes.Concat, nodes.Filter)


def _fold(node: nodes.Node, env: _Environment, memo: dict):
    """The node's value as jinja's optimizer would fold it at compile time, every operation that
    builds text bounded; nodes.Impossible where jinja would not fold it."""
    if id(node) in memo:
        value = memo[id(node)]
        if value is nodes.Impossible:
            raise nodes.Impossible()
        return value
    try:
        value = _fold_uncached(node, env, memo)
    except nodes.Impossible:
        memo[id(node)] = nodes.Impossible
        raise
    memo[id(node)] = value
    return value


def _const_clone(node: nodes.Node, env: _Environment, memo: dict) -> nodes.Node:
    """A copy of `node` whose expression children are constants (their folded values)."""

    def replace(child):
        if isinstance(child, list):
            return [replace(c) for c in child]
        if isinstance(child, nodes.Expr):
            return nodes.Const(_fold(child, env, memo), lineno=child.lineno, environment=env)
        if isinstance(child, nodes.Node):
            return _const_clone(child, env, memo)
        return child

    values = [replace(getattr(node, f)) for f in node.fields]
    return type(node)(*values, lineno=node.lineno, environment=env)


def _fold_uncached(node: nodes.Node, env: _Environment, memo: dict):
    if isinstance(node, nodes.BinExpr):
        left, right = _fold(node.left, env, memo), _fold(node.right, env, memo)
        try:
            return env.call_binop(None, node.operator, left, right)
        except Exception as err:
            raise nodes.Impossible() from err
    if isinstance(node, nodes.Concat):
        parts = [_fold(n, env, memo) for n in node.nodes]
        return env.hooks.concat(*parts)
    if not isinstance(node, nodes.Expr):
        raise nodes.Impossible()
    # The rest fold as jinja folds them, over already-folded children (filters through the
    # bounded ones: a refusal there is recorded in the budget even though jinja swallows it).
    return _const_clone(node, env, memo).as_const(nodes.EvalContext(env))


def check_compiles(template: str, owner: str) -> None:
    """Refuse a template whose compilation by another library would do unbounded work: jinja's
    optimizer folds constant expressions (`'x' * 10**10`, `'x'|center(10**10)`) at compile time,
    and llama-cpp-python compiles a GGUF's templates whenever it loads the model."""
    env = _Environment()
    with _bounded() as budget:
        try:
            tree = env.parse(template)
        except TemplateSyntaxError as err:
            raise _failure(owner, err) from None
        memo: dict = {}
        for node in tree.find_all(_AMPLIFYING_NODES):
            with contextlib.suppress(nodes.Impossible, _Refused):
                _fold(node, env, memo)
        if budget.refused is not None:
            raise _refusal(owner, budget.refused)
