"""Every public name of fs_mllm (``fs_mllm.__all__``) documents itself the way docs/api.md renders it (issue 31 item 5).

mkdocstrings reads Google-style docstrings (``docstring_style: google`` in mkdocs.yml), so the checks
read the same sections (``Args:``, ``Attributes:``, ``Returns:``, ``Raises:``) and their entries:

- each public name has a docstring of its own (a dataclass without one gets its signature as ``__doc__``);
- each parameter of each public function, method and non-dataclass class is an entry of its ``Args:``;
- each field a public dataclass declares is an entry of its class's ``Attributes:``;
- a public callable that returns something has a ``Returns:`` section;
- each exception its body raises (``raise X(...)``), or that a function it calls raises in its own body,
  is an entry of its ``Raises:`` (for a class: what ``__init__``, ``__post_init__`` or ``__setattr__`` raise);
- the entry of a tensor or array (parameter, field, return) gives its shape, and the entry of a sigma,
  radius or eps gives its unit ([0,1] pixel space).

The checker is itself tested on a badly documented function, so the checks cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import re
import textwrap
from typing import Any, Callable, Iterator, Optional

import pytest

import fs_mllm

SECTION_NAMES = ("Args", "Attributes", "Returns", "Yields", "Raises", "Example", "Examples", "Note", "Notes")
SECTION = re.compile(rf"^({'|'.join(SECTION_NAMES)}):\s*$")
ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_]\w*)\s*(\([^)]*\))?\s*:(\s|$)")
SHAPE = re.compile(r"\((?:\.\.\.|[A-Za-z0-9_*]+)\s*[,)]|\bshape\b")
UNIT = "[0,1] pixel"
UNIT_NAMES = re.compile(r"^(sigma|sigma_min|sigma_max|radius|eps)$")
ARRAY_TYPES = re.compile(r"\bTensor\b|\bndarray\b")


# ---------------------------------------------------------------------------------------------
# the Google docstring, as sections and entries
# ---------------------------------------------------------------------------------------------

def sections(doc: Optional[str]) -> dict[str, list[str]]:
    """{section name: its indented lines}; the text before the first section is under ""."""
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in inspect.cleandoc(doc or "").splitlines():
        match = SECTION.match(line)
        if match:
            current = match.group(1)
            out[current] = []
        elif current and line.strip() and not line.startswith(" "):
            current = ""  # an unindented line ends a section
            out[current].append(line)
        else:
            out[current].append(line)
    return out


def entries(doc: Optional[str], section: str) -> dict[str, str]:
    """{entry name (stars stripped): its text, continuation lines included} of one section."""
    lines = [line for line in sections(doc).get(section, []) if line.strip()]
    if not lines:
        return {}
    indent = min(len(line) - len(line.lstrip()) for line in lines)
    out: dict[str, str] = {}
    name = None
    for line in lines:
        text = line[indent:]
        match = ENTRY.match(text) if not text.startswith(" ") else None
        if match:
            name = match.group(1).lstrip("*")
            out[name] = text
        elif name is not None:
            out[name] += " " + text.strip()
    return out


# ---------------------------------------------------------------------------------------------
# what the code raises
# ---------------------------------------------------------------------------------------------

def _function(obj: Any) -> Optional[Callable]:
    obj = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
    return inspect.unwrap(obj) if inspect.isfunction(inspect.unwrap(obj)) else None


def _resolve(name: str, namespace: dict) -> Any:
    return namespace.get(name, getattr(builtins, name, None))


def _body(function: Callable) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))


def _own_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes of the function's own body (nested functions and classes are other callables)."""
    (definition,) = tree.body
    stack = list(ast.iter_child_nodes(definition))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _exception(node: Optional[ast.AST], namespace: dict) -> Optional[str]:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Name):
        value = _resolve(target.id, namespace)
        if isinstance(value, type) and issubclass(value, BaseException):
            return value.__name__
    return None


def direct_raises(function: Callable) -> set[str]:
    """Exception classes a function raises itself (``raise X(...)``, bare re-raises skipped)."""
    namespace = function.__globals__
    return {name for node in _own_nodes(_body(function)) if isinstance(node, ast.Raise)
            for name in [_exception(node.exc, namespace)] if name}


def raised(function: Callable, owner: Optional[type] = None) -> set[str]:
    """What ``function`` raises itself, plus what each fs_mllm function it calls (by name, or as
    ``self.``/``cls.`` method of ``owner``) raises in its own body: the errors its caller meets."""
    out = direct_raises(function)
    namespace = function.__globals__
    for node in _own_nodes(_body(function)):
        if not isinstance(node, ast.Call):
            continue
        callee = None
        if isinstance(node.func, ast.Name):
            callee = _function(_resolve(node.func.id, namespace)) if _resolve(node.func.id, namespace) else None
        elif (owner is not None and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
              and node.func.value.id in ("self", "cls")):
            callee = _function(inspect.getattr_static(owner, node.func.attr, None))
        if callee is not None and callee.__module__.startswith("fs_mllm"):
            out |= direct_raises(callee)
    return out


# ---------------------------------------------------------------------------------------------
# the public callables
# ---------------------------------------------------------------------------------------------

def _annotation(value: Any) -> str:
    return value if isinstance(value, str) else getattr(value, "__name__", repr(value))


def _returns_something(signature: inspect.Signature) -> bool:
    return signature.return_annotation not in (None, "None", inspect.Signature.empty)


def public_callables() -> list[tuple[str, Callable, Optional[type], Optional[str], bool]]:
    """(qualified name, function, owner class, docstring it is documented in, whether it returns).

    Public functions; the public methods a public class defines itself (properties are attributes); a
    non-dataclass class's ``__init__``, documented in the class docstring (mkdocstrings'
    ``merge_init_into_class``).
    """
    out = []
    for name in fs_mllm.__all__:
        obj = getattr(fs_mllm, name)
        if inspect.isfunction(obj):
            out.append((name, obj, None, obj.__doc__, _returns_something(inspect.signature(obj))))
            continue
        if not dataclasses.is_dataclass(obj) and "__init__" in obj.__dict__:
            out.append((f"{name}.__init__", obj.__init__, obj, obj.__doc__, False))
        for member, value in own_members(obj).items():
            function = _function(value)
            if member.startswith("_") or function is None:
                continue
            out.append((f"{name}.{member}", function, obj, function.__doc__, _returns_something(inspect.signature(function))))
    return out


def own_members(cls: type) -> dict[str, Any]:
    """What ``cls`` and its bases defined in fs_mllm define (a shared private base such as config's
    _CheckedConfig gives FSConfig its to_dict): the nearest definition of each name, not torch's or object's."""
    members: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is cls or klass.__module__.startswith("fs_mllm"):
            for member, value in vars(klass).items():
                members.setdefault(member, value)
    return members


def class_raisers(cls: type) -> list[Callable]:
    """The methods whose errors construction (or assignment) raises, documented in the class docstring."""
    names = ("__post_init__", "__setattr__") if dataclasses.is_dataclass(cls) else ("__init__", "__setattr__")  # generated __init__
    members = own_members(cls)
    return [_function(members[name]) for name in names if name in members and _function(members[name]) is not None]


def parameters(function: Callable, owner: Optional[type]) -> list[inspect.Parameter]:
    params = list(inspect.signature(function).parameters.values())
    if owner is not None and params and params[0].name in ("self", "cls"):
        params = params[1:]
    return params


CALLABLES = public_callables()
CLASSES = [getattr(fs_mllm, name) for name in fs_mllm.__all__ if inspect.isclass(getattr(fs_mllm, name))]
DATACLASSES = [cls for cls in CLASSES if dataclasses.is_dataclass(cls)]


# ---------------------------------------------------------------------------------------------
# the checks, as functions returning the problems found (so they can be tested on a bad example)
# ---------------------------------------------------------------------------------------------

def entry_problems(owner: str, section: str, kind: str, name: str, entry: Optional[str], annotation: Any) -> list[str]:
    """One parameter's (Args) or field's (Attributes) entry: present, with a shape if a tensor/array, with its unit."""
    if entry is None:
        return [f"{owner}: {kind} {name!r} is not an entry of {section}:"]
    problems = []
    if ARRAY_TYPES.search(_annotation(annotation)) and not SHAPE.search(entry):
        problems.append(f"{owner}: {section} entry {name!r} (a tensor/array) gives no shape")
    if UNIT_NAMES.match(name) and UNIT not in entry:
        problems.append(f"{owner}: {section} entry {name!r} does not say its unit ({UNIT} space)")
    return problems


def callable_problems(qualname: str, function: Callable, owner: Optional[type], doc: Optional[str],
                      returns: bool) -> list[str]:
    problems = []
    if not (doc or "").strip():
        return [f"{qualname}: no docstring"]
    args = entries(doc, "Args")
    for param in parameters(function, owner):
        problems += entry_problems(qualname, "Args", "parameter", param.name, args.get(param.name), param.annotation)
    if returns:
        text = " ".join(sections(doc).get("Returns", [])).strip()
        if not text:
            problems.append(f"{qualname}: returns a value but has no Returns: section")
        elif ARRAY_TYPES.search(_annotation(inspect.signature(function).return_annotation)) and not SHAPE.search(text):
            problems.append(f"{qualname}: Returns: (a tensor/array) gives no shape")
    documented = set(entries(doc, "Raises"))
    for error in sorted(raised(function, owner) - documented):
        problems.append(f"{qualname}: raises {error} but Raises: does not list it")
    return problems


def class_problems(cls: type) -> list[str]:
    doc = cls.__dict__.get("__doc__")
    if not (doc or "").strip() or doc.startswith(f"{cls.__name__}("):  # dataclasses' generated __doc__
        return [f"{cls.__name__}: no docstring of its own"]
    problems = []
    documented = set(entries(doc, "Raises"))
    for function in class_raisers(cls):
        for error in sorted(raised(function, cls) - documented):
            problems.append(f"{cls.__name__}: {function.__name__} raises {error} but the class's Raises: does not list it")
    if dataclasses.is_dataclass(cls):
        attributes = entries(doc, "Attributes")
        own = cls.__dict__.get("__annotations__", {})
        for field in dataclasses.fields(cls):
            if field.name not in own:
                continue  # inherited: documented on the base class
            problems += entry_problems(cls.__name__, "Attributes", "field", field.name, attributes.get(field.name), field.type)
    return problems


def raises_problems(qualname: str, doc: Optional[str]) -> list[str]:
    """Every Raises entry names an exception class (a typo would render as a bogus exception)."""
    problems = []
    for name in entries(doc, "Raises"):
        value = getattr(builtins, name, None)
        if not (isinstance(value, type) and issubclass(value, BaseException)):
            problems.append(f"{qualname}: Raises entry {name!r} is not a builtin exception")
    return problems


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------

def test_the_checks_see_the_public_api():
    assert len(CALLABLES) >= 40, [q for q, *_ in CALLABLES]
    assert {q for q, *_ in CALLABLES} >= {"patch_model", "certify_model", "GaussianSmoothnessBooster.__init__",
                                          "GaussianSmoothnessBooster.denoise", "Certificate.fcsb", "FSConfig.replace"}
    assert len(DATACLASSES) >= 8
    assert "ValueError" in raised(fs_mllm.get_fs_state)
    assert "RuntimeError" in raised(fs_mllm.patch_model)  # check_transformers_version, one call down
    assert "OSError" in raised(fs_mllm.push_to_hub)


def test_the_checks_catch_a_badly_documented_function():
    def bad(images, sigma, *, radius=0.1, **extra) -> "torch.Tensor":
        """Smooth something.

        Args:
            images: the images.
            sigma: the noise.
        """
        if sigma <= 0:
            raise ValueError("sigma")
        return images

    problems = callable_problems("bad", bad, None, bad.__doc__, True)
    assert "bad: parameter 'radius' is not an entry of Args:" in problems
    assert "bad: parameter 'extra' is not an entry of Args:" in problems
    assert "bad: Args entry 'sigma' does not say its unit ([0,1] pixel space)" in problems
    assert "bad: returns a value but has no Returns: section" in problems
    assert "bad: raises ValueError but Raises: does not list it" in problems
    assert callable_problems("none", bad, None, None, True) == ["none: no docstring"]

    @dataclasses.dataclass
    class Bare:
        x: int = 0

    assert class_problems(Bare) == ["Bare: no docstring of its own"]


def test_every_public_name_has_a_docstring_of_its_own():
    missing = [name for name in fs_mllm.__all__ if not (getattr(fs_mllm, name).__doc__ or "").strip()]
    missing += [p for cls in CLASSES for p in class_problems(cls) if p.endswith("no docstring of its own")]
    assert not missing, missing


@pytest.mark.parametrize("qualname, function, owner, doc, returns", CALLABLES, ids=[c[0] for c in CALLABLES])
def test_public_callable_documents_parameters_returns_and_errors(qualname, function, owner, doc, returns):
    problems = callable_problems(qualname, function, owner, doc, returns) + raises_problems(qualname, doc)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_public_class_documents_fields_and_errors(cls):
    problems = class_problems(cls) + raises_problems(cls.__name__, cls.__dict__.get("__doc__"))
    assert not problems, "\n".join(problems)
