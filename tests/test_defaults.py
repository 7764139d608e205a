"""One place for the statistics and attack-strength defaults: fs_mllm/config.py.

The certificate's sample count, failure probability, bound and chunk size are read from config.py
(CertifyConfig's fields, DEFAULT_CHUNK_SIZE, and FSConfig built on them) by every function signature,
dataclass field and command-line option of the package; a literal restated
elsewhere would drift when the default moves (chunk_size was 50 in one module and 32 in the others). So are the
attacks' steps and EOT samples (ATTACK_STEPS, COMMAND_ATTACK_STEPS, DEMO_ATTACK_STEPS, ... side by side there).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fs_mllm
from fs_mllm import config

PACKAGE = Path(fs_mllm.__file__).resolve().parent
# parameter / field names -> the config value a literal default of theirs would restate
WATCHED = {
    "n": config.CertifyConfig.n, "certify_n": config.CertifyConfig.n,
    "alpha": config.CertifyConfig.alpha,
    "method": config.CertifyConfig.method,
    "chunk_size": None,  # any number: None means DEFAULT_CHUNK_SIZE
    # attack strength: each entry point's number lives in config.py (ATTACK_STEPS, COMMAND_ATTACK_STEPS, ...)
    **{name: None for name in ("steps", "attack_steps", "adaptive_steps", "transfer_steps", "eot_samples")},
}
OPTIONS = {"--" + name.replace("_", "-"): value for name, value in WATCHED.items()}


def defaults_in(source: str):
    """(kind, line, name, default node) of every default in ``source``: kind "parameter" (a function's, its
    name "function(parameter)"), "field" (an annotated class attribute) or "option" (add_argument's ``--flag``)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            yield from (("parameter", d.lineno, a.arg, d, node.name) for a, d in pairs)
        elif isinstance(node, ast.ClassDef):
            yield from (("field", item.lineno, item.target.id, item.value, node.name) for item in node.body
                        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")]
            yield from (("option", k.value.lineno, flag, k.value, "") for k in node.keywords if k.arg == "default" for flag in flags)


def _restates(name: str, default: ast.AST, watched: dict) -> bool:
    if name not in watched or not isinstance(default, ast.Constant) or default.value is None:
        return False
    value = watched[name]
    return isinstance(default.value, (int, float)) and not isinstance(default.value, bool) if value is None \
        else default.value == value


def restated_defaults(source: str) -> list[str]:
    """'line: name = literal' for each watched default a source restates as a literal (fields too)."""
    found = []
    for kind, line, name, default, _ in defaults_in(source):
        if _restates(name, default, OPTIONS if kind == "option" else WATCHED):
            found.append(f"{line}: {name} default={default.value!r}" if kind == "option" else f"{line}: {name} = {default.value!r}")
    return found


def test_no_statistics_default_is_restated_outside_config():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "config.py" and path.parent == PACKAGE:
            continue
        found = restated_defaults(path.read_text(encoding="utf-8"))
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert not offenders, f"literal defaults restated outside fs_mllm/config.py (use CertifyConfig, FSConfig or its constants): {offenders}"


def test_the_check_finds_what_it_looks_for():
    """The scan is not vacuous: each form a restated default takes is found, and the config's names are not."""
    source = '''
def certify(images, n: int = 1000, *, alpha=0.001, method="bernstein", chunk_size=50): ...
def fine(images, n=CertifyConfig.n, alpha=None, chunk_size=None, steps=ATTACK_STEPS, lr=1000): ...
def attack(images, steps: int = 20, *, eot_samples=8): ...
class Settings:
    certify_n: int = 1000
    alpha: float = CertifyConfig.alpha
parser.add_argument("--alpha", type=float, default=0.001)
parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
parser.add_argument("--eot-samples", type=int, default=1)
'''
    found = restated_defaults(source)
    assert [f.split(": ", 1)[1] for f in found] == [
        "n = 1000", "alpha = 0.001", "method = 'bernstein'", "chunk_size = 50", "steps = 20", "eot_samples = 8",
        "certify_n = 1000", "--alpha default=0.001", "--eot-samples default=1"]


def test_fs_config_defaults_are_the_certify_config():
    defaults, certify = config.FSConfig(), config.CertifyConfig()
    assert (defaults.alpha, defaults.method) == (certify.alpha, certify.method)
    from fs_mllm.smoothing import DEFAULT_CHUNK_SIZE

    assert DEFAULT_CHUNK_SIZE is config.DEFAULT_CHUNK_SIZE


# The other settings: their defaults live in config.py or in the settings dataclass that owns them (FSConfig,
# AttackConfig, EvalSettings, DefenseSettings, AttackRun, BoosterTrainingRun, ...), and function signatures and
# command lines refer to them by name. Left out, by design: ``seed`` (every stream's seed defaults to 0, the
# convention FSConfig.seed states, and the streams are different knobs: noise, attack starts, training,
# synthetic scenes, tiny test models) and ``batch_size`` (a different knob per entry point).
SETTINGS = frozenset(WATCHED) | {
    "sigma", "n_samples", "normalize", "n0", "eps", "norm", "objective", "protocol", "ensemble_weighting",
    "crop_views", "attack_norm", "max_new_tokens",
}


def _literal(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is not None and not isinstance(node.value, bool)


def restated_setting_defaults(source: str, where: str) -> list[str]:
    """The places in ``source`` where a setting's default is a literal in a signature or an option."""
    found = []
    for kind, line, name, default, owner in defaults_in(source):
        setting = name[2:].replace("-", "_") if kind == "option" else name
        if kind != "field" and setting in SETTINGS and _literal(default):
            found.append(f"{where}:{line} {name} default={default.value!r}" if kind == "option"
                         else f"{where}:{line} {owner}({name}={default.value!r})")
    return found


def test_no_setting_default_is_restated_in_a_signature_or_an_option():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "config.py":  # the constants themselves
            found += restated_setting_defaults(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert not found, "defaults restated as literals (name the constant or the settings field instead):\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("def generate(x, max_new_tokens=20): pass", ["m.py:1 generate(max_new_tokens=20)"]),
    ("def smooth(x, *, normalize='global'): pass", ["m.py:1 smooth(normalize='global')"]),
    ("p.add_argument('--objective', default='feature')", ["m.py:1 --objective default='feature'"]),
    ("def f(x, n=CertifyConfig.n, seed=0, sigma=None, normalize=FSConfig.normalize): pass", []),
    ("p.add_argument('--steps', default=ATTACK.steps)\np.add_argument('--threads', default=1)", []),
    ("class C:\n    steps: int = 20", []),  # a settings dataclass owns its defaults
])
def test_the_settings_check_sees_literal_defaults(source, expected):
    assert restated_setting_defaults(source, "m.py") == expected
