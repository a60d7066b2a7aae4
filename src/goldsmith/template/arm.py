"""Just enough of ARM template expressions for image templates: `[parameters('x')]`, `[variables('x')]`, `[concat(...)]`.

Those three are what AIB's published deployment templates use. Anything else is reported as unsupported rather
than guessed at. A parameter with no value becomes the placeholder `<name>`, so it is resolved (or reported)
together with the `<token>` placeholders.
"""

from __future__ import annotations

import re
from typing import Any, Callable

_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[(),.\[\]]))")


MAX_REFERENCES = 10_000
MAX_DEPTH = 64
MAX_STRING = 64 * 1024


class ArmError(ValueError):
    """An expression that can't be evaluated; `path` is where it sits in the template."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def _convert(name: str, declared: str, value: Any) -> Any:
    """`--set` gives strings; ARM parameters are typed."""
    if not isinstance(value, str) or declared in ("string", "securestring", ""):
        return value
    try:
        if declared == "int":
            return int(value)
        if declared == "bool":
            return {"true": True, "false": False}[value.lower()]
    except (ValueError, KeyError):
        raise ArmError(f"parameters.{name}", f"parameter '{name}' is {declared}; '{value}' is not") from None
    return value


def _section(template: dict, key: str) -> dict:
    value = template.get(key) or {}
    if not isinstance(value, dict):
        raise ArmError(key, f"'{key}' must be an object of name -> definition")
    return value


class Evaluator:
    def __init__(self, template: dict, values: dict[str, Any]):
        self.declared = _section(template, "parameters")
        self.variables = _section(template, "variables")
        self.values = values
        self.used: set[str] = set()
        self.unresolved: dict[str, list[str]] = {}  # parameter name -> paths that use it
        self._resolving: set[str] = set()  # "parameters('x')" and "variables('x')" being evaluated
        self._references = 0

    def parameter(self, name: str, path: str) -> Any:
        # ARM names are case-insensitive: parameters('managedimagename') finds 'managedImageName'.
        name = next((k for k in self.declared if k.lower() == name.lower()), name)
        spec = self.declared.get(name)
        if name in self.declared and not isinstance(spec, dict):
            raise ArmError(f"parameters.{name}", f"parameter '{name}' must be an object such as "
                                                 '{"type": "string", "defaultValue": "..."}')
        if not isinstance(spec, dict):
            known = ", ".join(sorted(self.declared)) or "none"
            raise ArmError(path, f"parameters('{name}') is not declared in 'parameters' (declared: {known})")
        given = next((k for k in self.values if k.lower() == name.lower()), None)
        if given is not None:
            self.used.add(given)
            return _convert(name, str(spec.get("type", "")).lower(), self.values[given])
        if "defaultValue" in spec:
            return self._once(f"parameters('{name}')", path, spec["defaultValue"], f"parameters.{name}.defaultValue")
        self.unresolved.setdefault(name, []).append(path)
        return f"<{name}>"

    def variable(self, name: str, path: str) -> Any:
        name = next((k for k in self.variables if k.lower() == name.lower()), name)
        if name not in self.variables:
            known = ", ".join(sorted(self.variables)) or "none"
            raise ArmError(path, f"variables('{name}') is not declared in 'variables' (declared: {known})")
        return self._once(f"variables('{name}')", path, self.variables[name], f"variables.{name}")

    def _once(self, ref: str, path: str, value: Any, where: str) -> Any:
        """Evaluates a parameter's default or a variable, refusing a cycle (`a` defined through itself)."""
        if ref in self._resolving:
            raise ArmError(path, f"{ref} refers to itself")
        # Bounds keep one file from stalling the DAG file past its import timeout (an expansion bomb).
        self._references += 1
        if self._references > MAX_REFERENCES:
            raise ArmError(path, f"the ARM expressions expand to more than {MAX_REFERENCES} parameter and variable "
                                 "references: simplify the variables")
        if len(self._resolving) >= MAX_DEPTH:
            raise ArmError(path, f"{ref} is reached through a chain of more than {MAX_DEPTH} variables and "
                                 "parameters: shorten the chain")
        self._resolving.add(ref)
        try:
            return self.evaluate(value, where)
        finally:
            self._resolving.discard(ref)

    def evaluate(self, value: Any, path: str) -> Any:
        """Evaluates every expression string inside `value` (a JSON value)."""
        if isinstance(value, dict):
            return {k: self.evaluate(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.evaluate(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
            if value.startswith("[["):  # ARM's escape for a literal leading '['
                return value[1:]
            return _Parser(value[1:-1], path, self).parse()
        return value


class _Parser:
    """Recursive descent over `call := name '(' [expr (',' expr)*] ')'`, `expr := call | 'string' | int`."""

    def __init__(self, text: str, path: str, ev: Evaluator):
        self.tokens = self._tokenize(text, path)
        self.pos = 0
        self.path = path
        self.ev = ev
        self.functions: dict[str, Callable[[list[Any]], Any]] = {
            "parameters": lambda a: ev.parameter(self._one_string("parameters", a), path),
            "variables": lambda a: ev.variable(self._one_string("variables", a), path),
            "concat": self._concat,
        }

    @staticmethod
    def _tokenize(text: str, path: str) -> list[tuple[str, str]]:
        tokens, i = [], 0
        while i < len(text):
            m = _TOKEN.match(text, i)
            if not m or m.end() == i:
                if text[i:].strip() == "":
                    break
                raise ArmError(path, f"can't read the ARM expression '[{text}]' at '{text[i:].strip()[:20]}'")
            kind = m.lastgroup
            tokens.append((kind, m.group(kind)))
            i = m.end()
        return tokens

    def parse(self) -> Any:
        value = self._expr()
        if self.pos != len(self.tokens):
            raise ArmError(self.path, f"unexpected '{self.tokens[self.pos][1]}' in an ARM expression")
        return value

    def _next(self) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise ArmError(self.path, "ARM expression ends too early")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _expr(self) -> Any:
        kind, text = self._next()
        if kind == "str":
            return text[1:-1].replace("''", "'")
        if kind == "num":
            return int(text)
        if kind != "name":
            raise ArmError(self.path, f"unexpected '{text}' in an ARM expression")
        text = text.lower() if text.lower() in self.functions else text
        if text not in self.functions:
            supported = ", ".join(self.functions)
            raise ArmError(self.path, f"ARM function '{text}()' is not supported here (supported: {supported})")
        if self._next() != ("punct", "("):
            raise ArmError(self.path, f"expected '(' after '{text}'")
        args: list[Any] = []
        if self.pos < len(self.tokens) and self.tokens[self.pos] == ("punct", ")"):
            self.pos += 1
        else:
            while True:
                args.append(self._expr())
                sep = self._next()
                if sep == ("punct", ")"):
                    break
                if sep != ("punct", ","):
                    raise ArmError(self.path, f"expected ',' or ')' in {text}(...)")
        return self.functions[text](args)

    def _one_string(self, fn: str, args: list[Any]) -> str:
        if len(args) != 1 or not isinstance(args[0], str):
            raise ArmError(self.path, f"{fn}() takes one string argument")
        return args[0]

    def _concat(self, args: list[Any]) -> Any:
        if args and all(isinstance(a, list) for a in args):
            items = [item for a in args for item in a]
            if len(items) > MAX_REFERENCES:
                raise ArmError(self.path, f"concat() makes an array over {MAX_REFERENCES} items")
            return items
        if any(isinstance(a, (dict, list)) for a in args):
            raise ArmError(self.path, "concat() takes all strings or all arrays")
        joined = "".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
        if len(joined) > MAX_STRING:
            raise ArmError(self.path, f"concat() makes a string over {MAX_STRING} characters")
        return joined
