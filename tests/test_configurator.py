"""configurator.py: files then --key=value over a script's globals, refusing what it does not know."""
import json
import os

import pytest

import configurator


def defaults():
    return {'lr': 1e-4, 'steps': 10, 'name': 'run', 'flag': False, 'splits': {'a': 0.5}, 'layers': [1, 2]}


def test_files_then_command_line(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("import math\nlr = 3e-4\nsteps = 2 * 5 + 1\nname = 'from_file'\n")
    g = defaults()
    config = configurator.configure(g, [str(cfg), '--steps=7', '--flag=True', '--name=42'])
    assert config == {'lr': 3e-4, 'steps': 7, 'name': '42', 'flag': True, 'splits': {'a': 0.5}, 'layers': [1, 2]}
    assert g['steps'] == 7


def test_int_for_float_is_fine():
    config = configurator.configure(defaults(), ['--lr=1'])
    assert config['lr'] == 1.0 and isinstance(config['lr'], float)


@pytest.mark.parametrize('argv, message', [
    (['--lrr=0.1'], "unknown key 'lrr' in the command line (did you mean 'lr'?)"),
    (['--steps=1.5'], "'steps' in the command line must be int"),
    (['--steps=True'], "'steps' in the command line must be int"),
    (['--flag=1'], "'flag' in the command line must be bool"),
    (['--lr=True'], "'lr' in the command line must be float"),
    (['--lr'], "must look like --key=value"),
    (['--lr=1e999'], "'lr' in the command line must be a finite number"),
    (['--lr=-1e999'], "'lr' in the command line must be a finite number"),
    (['--lr=' + '9' * 400], "'lr' in the command line must be a finite number"),
    (['--steps={[]: 1}'], "'steps' in the command line must be int"),  # a literal that cannot be built
    (['--layers=[{1}]'], "'layers' in the command line must hold only plain numbers, strings, lists and dicts"),  # a set
    (['--lr=' + '1+' * 5000 + '1'], "'lr' in the command line must be float"),  # one too deep to build
    (['missing.py'], "config file 'missing.py' not found"),
    (['lr=0.1'], "config file 'lr=0.1' not found (a setting is written --lr=0.1)"),
])
def test_bad_arguments_stop_with_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        configurator.configure(defaults(), argv)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_a_value_inside_a_dict_must_be_one_json_can_save(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("import numpy as np\nsplits = {'a': np.float32(0.5)}\n")
    with pytest.raises(SystemExit, match=r"'splits' in .* must hold only plain numbers, strings, lists and dicts"):
        configurator.configure(defaults(), [str(cfg)])


def test_a_path_starting_with_a_tilde_is_in_the_home_folder(monkeypatch):
    """The shell does not expand ~ after --key=: the run would write into a folder named '~' here."""
    monkeypatch.setenv('HOME', '/home/someone')
    assert configurator.configure(defaults(), ['--name=~/runs/a'])['name'] == '/home/someone/runs/a'
    assert configurator.configure(defaults(), ['--name=~'])['name'] == '~'  # a marker character, say


def test_a_config_path_that_is_a_folder_is_named_so(tmp_path):
    with pytest.raises(SystemExit, match=f"config file '{tmp_path}' is a folder"):
        configurator.configure(defaults(), [str(tmp_path)])


@pytest.mark.parametrize('value', ['3', 'None', '__import__("numpy").int64(3)'])
def test_unknown_key_in_a_file(tmp_path, value):
    """Whatever its value: only imports, functions and classes are taken for a config file's helpers."""
    cfg = tmp_path / 'c.py'
    cfg.write_text(f"import os\ndef twice(x):\n    return 2 * x\nsetps = {value}\n")
    with pytest.raises(SystemExit, match=r"unknown key 'setps' in .*c.py \(did you mean 'steps'\?\)"):
        configurator.configure(defaults(), [str(cfg)])


def test_constants_are_not_config():
    g = {**defaults(), 'SPLITS': ('a', 'b')}
    with pytest.raises(SystemExit, match="unknown key 'SPLITS'"):
        configurator.configure(g, ['--SPLITS=1'])


def test_save_config(tmp_path):
    configurator.save_config(defaults(), tmp_path / 'out')
    assert json.loads((tmp_path / 'out' / 'config.json').read_text()) == defaults()


def test_a_save_config_that_fails_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    configurator.save_config(defaults(), tmp_path)

    def dump(obj, f, **kwargs):
        f.write('{"lr": ')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(configurator.json, 'dump', dump)
    with pytest.raises(OSError, match='No space left'):
        configurator.save_config({**defaults(), 'steps': 3}, tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text()) == defaults() and os.listdir(tmp_path) == ['config.json']


def test_a_config_file_may_read_the_defaults(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text('steps = steps * 2\n')
    assert configurator.configure(defaults(), [str(cfg)])['steps'] == 20


@pytest.mark.parametrize('text, message', [("lr = (3e-4\n", "failed: SyntaxError"), ("lr = 2 * undefined\n", "failed: NameError"),
                                           ("raise SystemExit\n", "failed: SystemExit")])  # whose status would be 0
def test_a_config_file_that_raises_stops_with_one_line(tmp_path, text, message):
    cfg = tmp_path / 'c.py'
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        configurator.configure(defaults(), [str(cfg)])
    assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('text, line', [('{"lr": 0.001, "steps": 7}\n', 1),  # JSON: one dict, which Python evaluates and drops
                                        ('"""a docstring"""\nsteps = 7\nlr: 0.001\n', 3),  # YAML: an annotation to Python
                                        ('steps = 7\nlr\n', 2)])
def test_a_config_file_line_that_sets_nothing_is_refused(tmp_path, text, line):
    cfg = tmp_path / 'c.py'
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        configurator.configure(defaults(), [str(cfg)])
    assert str(e.value) == f"config: config file '{cfg}' line {line} sets nothing: a config file is Python, key = value"


def test_a_config_file_may_call_and_annotate(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text('"""notes"""\nprint("loading")\nsteps: int = 7\n(lr := 0.5)\n')
    config = configurator.configure(defaults(), [str(cfg)])
    assert config['steps'] == 7 and config['lr'] == 0.5


@pytest.mark.parametrize('value', ['None', '__import__("numpy").int64(3)', 'int'])
def test_a_known_key_of_another_type_in_a_file_is_refused(tmp_path, value):
    """A value of a type config does not hold (None, a numpy int, a function: `steps = int`, its value forgotten)
    was once taken for a helper and dropped."""
    cfg = tmp_path / 'c.py'
    cfg.write_text(f"steps = {value}\n")
    with pytest.raises(SystemExit, match="'steps' in .*c.py must be int"):
        configurator.configure(defaults(), [str(cfg)])
