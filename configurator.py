"""
nanoGPT's configurator, made safe. A script calls

    config = configurator.configure(globals())

after its config globals (lower-case names of plain types; ALL_CAPS constants are left out). Arguments are config files (Python, run over the config in order) and then
--key=value overrides (parsed with ast.literal_eval, falling back to a string). An unknown key, a
value of the wrong type, a missing file or a file line that sets nothing (JSON or YAML read as Python) stops the
program before any work, with one line naming it and the closest valid key. A text value starting with ~/ is a path in the home folder. Returns the resolved config and writes it back into the script's globals.
"""
import ast
import difflib
import json
import os
import sys
import types

CONFIG_TYPES = (bool, int, float, str, list, tuple, dict)


def _fail(msg):
    raise SystemExit(f"config: {msg}")


def _check(key, value, config, where):
    if key not in config:
        close = difflib.get_close_matches(key, list(config), n=1)
        _fail(f"unknown key '{key}' in {where}" + (f" (did you mean '{close[0]}'?)" if close else ""))
    want = type(config[key])
    ok = isinstance(value, want) and (want is not int or not isinstance(value, bool))
    ok = ok or (want is float and isinstance(value, int) and not isinstance(value, bool))  # 1 for 1.0 is fine
    if not ok:
        _fail(f"'{key}' in {where} must be {want.__name__} like its default {config[key]!r}, got {value!r}")
    if want is float and not abs(value) <= sys.float_info.max:  # nan, inf, or an int too large for a float
        _fail(f"'{key}' in {where} must be a finite number, got {value!r}")
    if want in (list, tuple, dict):  # what it holds is saved as JSON too
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            _fail(f"'{key}' in {where} must hold only plain numbers, strings, lists and dicts, got {value!r}")
    if want is str and value.startswith('~/'):  # a path in the home folder: the shell leaves --key=~/x as it is
        value = os.path.expanduser(value)
    return float(value) if want is float else value


def _sets_nothing(node):
    """A config file's statement that Python runs without a word and that sets nothing: YAML's `key: value` (an
    annotation) or a bare value (a JSON file is one dict). A docstring, a call and `(key := value)` are left alone."""
    if isinstance(node, ast.AnnAssign):
        return node.value is None
    return isinstance(node, ast.Expr) and not isinstance(node.value, (ast.Call, ast.NamedExpr)) and not (
        isinstance(node.value, ast.Constant) and isinstance(node.value.value, str))


def configure(script_globals, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config = {k: v for k, v in script_globals.items()  # ALL_CAPS names are constants, not config
              if not k.startswith('_') and not k.isupper() and type(v) in CONFIG_TYPES}
    for arg in argv:
        if not arg.startswith('--'):
            if os.path.isdir(arg):
                _fail(f"config file '{arg}' is a folder")
            if not os.path.isfile(arg):
                hint = f" (a setting is written --{arg})" if '=' in arg else ''
                _fail(f"config file '{arg}' not found{hint}")
            namespace, idle = dict(config), None
            try:
                with open(arg) as f:
                    tree = ast.parse(f.read(), arg)
                idle = next((node for node in tree.body if _sets_nothing(node)), None)
                if idle is None:
                    exec(compile(tree, arg, 'exec'), namespace)
            except (Exception, SystemExit) as e:  # the file's own error, in one line; its exit() would stop with status 0
                _fail(f"config file '{arg}' failed: {type(e).__name__}: {e}")
            if idle is not None:
                _fail(f"config file '{arg}' line {idle.lineno} sets nothing: a config file is Python, key = value")
            for key, value in namespace.items():
                if key.startswith('_') or (key not in config and (callable(value) or isinstance(value, types.ModuleType))):
                    continue  # imports and helpers a config file uses
                if key not in config or value is not config[key]:
                    config[key] = _check(key, value, config, arg)
        else:
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                _fail(f"'{arg}' must look like --key=value")
            try:
                value = raw if isinstance(config.get(key), str) else ast.literal_eval(raw)
            except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):  # TypeError: {[]: 1}
                value = raw
            config[key] = _check(key, value, config, 'the command line')
    script_globals.update(config)
    return config


def save_config(config, out_dir, name='config.json'):
    """The resolved config, as JSON, beside the outputs it made (written atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    try:
        with open(path + '.tmp', 'w') as f:
            json.dump(config, f, indent=2)
        os.replace(path + '.tmp', path)
    finally:  # a failed write (a full disk) leaves the old file and no partial one
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
