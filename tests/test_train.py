"""train.py: the stages end to end on the tiny model, the GRPO arithmetic, resume and refusals."""
import fcntl
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import types

import pytest
import torch
import transformers
from safetensors.torch import load_file

import nla
import train
from conftest import (ROOT, broken_copy, kill_group, read_log, rl_adapter_lora_B, run_script, tiny_gpt2, wait_for_a_step,
                      zero_first_activation)

RL_ARGS = ['--stage=rl', '--max_new_tokens=64', '--length_slack=8', '--min_lr_frac=1.0', '--lr=1e-3', '--ar_lr=1e-3']


def base_args(tiny_dir, tiny_data):
    return ['config/tiny.py', f'--base_model={tiny_dir["llama"]}', f'--data_dir={tiny_data}']


def test_sft_av_loss_falls(sft_runs):
    evals = read_log(sft_runs['av'], 'eval')
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 2, evals


def test_sft_ar_reaches_clearly_positive_fve(sft_runs):
    """The AR warm start explains the held-out activations from the teacher's text; shuffled does not."""
    last = read_log(sft_runs['ar'], 'eval')[-1]
    assert last['step'] == 300 and last['fve'] > 0.5 and last['fve_shuffled'] < 0, last
    assert read_log(sft_runs['ar_context'], 'eval')[-1]['fve'] > read_log(sft_runs['ar_context'], 'eval')[0]['fve']


def test_rl_then_eval_end_to_end(tiny_dir, tiny_data, sft_runs, tmp_path):
    out = tmp_path / 'rl'
    run_script('train.py', *base_args(tiny_dir, tiny_data), *RL_ARGS, f'--out_dir={out}', '--max_steps=3',
               f'--init_av={sft_runs["av"]}', f'--init_ar={sft_runs["ar"]}', '--eval_interval=3')
    steps = read_log(out, 'rl')
    assert [r['step'] for r in steps] == [1, 2, 3]
    for key in ('reward', 'reward_std', 'fve', 'extraction_rate', 'truncation_rate', 'mean_len', 'kl', 'entropy',
                'av_grad_norm', 'ar_grad_norm', 'lr', 'ar_lr', 'zero_adv_frac', 't_gen', 't_score', 't_av', 't_ar',
                'rollout_tok_s'):
        assert key in steps[0] and math.isfinite(steps[0][key]), key
    for r in steps:
        assert all(0 <= r[k] <= 1 for k in ('extraction_rate', 'truncation_rate', 'zero_adv_frac')), r
        assert 1 <= r['mean_len'] <= 64 and -4 - 64 * 0.01 <= r['reward'] <= 0 and r['kl'] >= 0, r  # mse is at most 4
    assert any(r['extraction_rate'] > 0 for r in steps) and steps[0]['kl'] == pytest.approx(0, abs=1e-6)
    # the KL reference is the frozen SFT adapter, not the live one: once the live adapter has moved, the two differ
    assert steps[0]['av_grad_norm'] > 0 and all(r['kl'] > 1e-6 for r in steps[1:]), steps
    assert [r['step'] for r in read_log(out, 'eval')] == [0, 3]
    assert {'config.json', 'ckpt.pt', 'av.safetensors', 'ar.safetensors', 'log.jsonl'} <= set(os.listdir(out))
    assert {k.split('.')[0] for k in load_file(out / 'av.safetensors')} == {'adapter0', 'adapter1'}

    ev = tmp_path / 'eval'
    p = run_script('train.py', *base_args(tiny_dir, tiny_data), '--stage=eval', f'--out_dir={ev}', f'--init_av={out}',
                   f'--init_ar={out}', f'--context_ar={sft_runs["ar_context"]}')
    [record] = read_log(ev)
    assert record['step'] == 0 and sorted(os.listdir(ev)) == ['config.json', 'log.jsonl']  # an eval writes no weights
    for key in ('fve', 'fve_shuffled', 'fve_teacher', 'fve_context', 'extraction_rate', 'mean_len'):
        assert math.isfinite(record[key]), key
    assert record['fve_context'] > record['fve_shuffled'] and '->' in p.stdout


def test_resume_ends_in_the_same_state(tiny_dir, tiny_data, sft_runs, tmp_path):
    """4 steps straight == 2 steps, stop, resume to 4: same weights bit for bit (and they did move)."""
    common = [*base_args(tiny_dir, tiny_data), *RL_ARGS, f'--init_av={sft_runs["av"]}', f'--init_ar={sft_runs["ar"]}',
              '--eval_interval=100', '--ckpt_interval=100']
    run_script('train.py', *common, f'--out_dir={tmp_path / "a"}', '--max_steps=4')
    run_script('train.py', *common, f'--out_dir={tmp_path / "b"}', '--max_steps=2')
    with open(tmp_path / 'b' / 'log.jsonl', 'a') as f:  # as if step 3 was logged and the run then died before its checkpoint
        f.write(json.dumps({'stage': 'rl', 'step': 3, 'reward': 123.0}) + '\n')
        f.write('{"stage": "rl", "st')  # and died while logging step 4
    run_script('train.py', *common, f'--out_dir={tmp_path / "b"}', '--max_steps=4', '--resume=True')
    for name in ('av.safetensors', 'ar.safetensors'):
        a, b = load_file(tmp_path / 'a' / name), load_file(tmp_path / 'b' / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    init = load_file(os.path.join(sft_runs['ar'], 'ar.safetensors'))
    assert not torch.equal(init['head.weight'], load_file(tmp_path / 'a' / 'ar.safetensors')['head.weight'])
    live = rl_adapter_lora_B(tmp_path / 'a')
    assert live and all(w.any() for w in live), 'the AV did not move'
    assert [r['step'] for r in read_log(tmp_path / 'b', 'rl')] == [1, 2, 3, 4]
    assert read_log(tmp_path / 'b', 'rl')[2]['reward'] != 123.0
    p = run_script('train.py', *common, f'--out_dir={tmp_path / "b"}', '--max_steps=6', '--resume=True', '--kl_coef=0.5',
                   ok=False)
    assert 'kl_coef' in p.stderr.strip().splitlines()[-1]
    config = (tmp_path / 'b' / 'config.json').read_text()
    p = run_script('train.py', *common, f'--out_dir={tmp_path / "b"}', '--max_steps=3', '--resume=True', ok=False)
    assert "past this run's last step, 3" in p.stderr.strip().splitlines()[-1]
    assert (tmp_path / 'b' / 'config.json').read_text() == config


def test_ctrl_c_ends_the_step_under_way_saves_it_and_a_resume_goes_on(tiny_dir, tiny_data, sft_runs, tmp_path):
    """A Ctrl-C mid-run loses no finished step, as a SIGTERM (timeout, preemption; test_ddp) does: the last logged
    step is in ckpt.pt."""
    out = tmp_path / 'rl'
    common = [*base_args(tiny_dir, tiny_data), *RL_ARGS, f'--init_av={sft_runs["av"]}', f'--init_ar={sft_runs["ar"]}',
              f'--out_dir={out}', '--eval_interval=1000', '--ckpt_interval=1000']
    with open(tmp_path / 'stderr', 'w') as err:
        # the run starts with Ctrl-C at its default, as from a terminal: a suite run as a background job (`pytest &` in a
        # script) ignores SIGINT, which a child inherits (train.py keeps an ignored Ctrl-C ignored), but a signal caught
        # here is reset to the default in the child
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *common, '--max_steps=1000'], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            wait_for_a_step(p, out, 'rl')
            p.send_signal(signal.SIGINT)
            p.wait(timeout=300)
        finally:
            kill_group(p)
    err = (tmp_path / 'stderr').read_text()
    steps = [r['step'] for r in read_log(out, 'rl')]
    assert p.returncode != 0 and 'Traceback' not in err, err[-3000:]
    assert 'train: Ctrl-C: stopping at the end of this step' in err
    assert err.strip().splitlines()[-1] == f"train: stopped by SIGINT at step {steps[-1]}: {out}/ckpt.pt holds it, --resume=True continues"
    assert torch.load(out / 'ckpt.pt', weights_only=False)['step'] == steps[-1]
    run_script('train.py', *common, f'--max_steps={steps[-1] + 1}', '--resume=True')
    assert [r['step'] for r in read_log(out, 'rl')] == list(range(1, steps[-1] + 2))
    assert [r['step'] for r in read_log(out, 'eval')] == [0, steps[-1] + 1]


def rl_steps(tiny_dir, root, steps, *args, ok=True):
    """rl in root/run from root/av and root/ar on root/data."""
    return run_script('train.py', 'config/tiny.py', f'--base_model={tiny_dir["llama"]}', f'--data_dir={root / "data"}',
                      *RL_ARGS, f'--init_av={root / "av"}', f'--init_ar={root / "ar"}', f'--out_dir={root / "run"}',
                      f'--max_steps={steps}', '--eval_interval=100', *args, ok=ok)


def edit_checkpoint(run_dir, edit):
    """run_dir/ckpt.pt loaded, changed in place by edit(ckpt), saved back: a checkpoint as other code would have left it."""
    ckpt = torch.load(run_dir / 'ckpt.pt', weights_only=False)
    edit(ckpt)
    torch.save(ckpt, run_dir / 'ckpt.pt')


def rl_tree(tiny_data, sft_runs, root):
    """A copy of everything an rl run reads: data, av, ar."""
    for name, src in (('data', tiny_data), ('av', sft_runs['av']), ('ar', sft_runs['ar'])):
        shutil.copytree(src, root / name)
    return root


def test_a_run_moved_with_its_inputs_resumes(tiny_dir, tiny_data, sft_runs, tmp_path):
    rl_steps(tiny_dir, rl_tree(tiny_data, sft_runs, tmp_path / 'a'), 1)
    (tmp_path / 'a').rename(tmp_path / 'b')
    rl_steps(tiny_dir, tmp_path / 'b', 2, '--resume=True')
    assert [r['step'] for r in read_log(tmp_path / 'b' / 'run', 'rl')] == [1, 2]


def test_a_resume_makes_the_eval_its_checkpoint_missed_once(tiny_dir, tiny_data, sft_runs, tmp_path):
    """A checkpoint saved before its step's eval, whose eval a resume made before dying: the next resume
    replaces that record rather than adding a second."""
    root = rl_tree(tiny_data, sft_runs, tmp_path)
    rl_steps(tiny_dir, root, 2)
    edit_checkpoint(root / 'run', lambda ckpt: ckpt.update(eval_step=0))
    p = rl_steps(tiny_dir, root, 2, '--resume=True')
    assert [r['step'] for r in read_log(root / 'run', 'eval')] == [0, 2] and 'eval 00002' in p.stdout


def test_resume_refuses_other_data(tiny_dir, tiny_data, sft_runs, tmp_path):
    """Data written again with other settings has another data_id (test_data_id_is_a_hash_of_the_splits_and_meta)."""
    root = rl_tree(tiny_data, sft_runs, tmp_path)
    rl_steps(tiny_dir, root, 1)
    before = {f: (root / 'run' / f).read_bytes() for f in ('log.jsonl', 'config.json')}
    meta = json.loads((root / 'data' / 'meta.json').read_text())
    meta['docs_skipped'] += 1  # other data, consistent in itself
    meta['data_id'] = nla.data_digest(meta, [root / 'data' / f'{s}.parquet' for s in nla.SPLITS])
    (root / 'data' / 'meta.json').write_text(json.dumps(meta))
    p = rl_steps(tiny_dir, root, 2, '--resume=True', ok=False)
    assert f"now holds data {meta['data_id']}" in p.stderr.strip().splitlines()[-1]
    assert before == {f: (root / 'run' / f).read_bytes() for f in before}


def test_resume_refuses_an_init_av_trained_again(tiny_dir, tiny_data, sft_runs, tmp_path):
    """rl's KL reference is init_av's adapter, rebuilt from init_av at a resume: it must be the one the run started from."""
    root = rl_tree(tiny_data, sft_runs, tmp_path)
    rl_steps(tiny_dir, root, 1)
    path = str(root / 'av' / 'av.safetensors')
    tensors = load_file(path)
    name = next(k for k in tensors if 'lora_B' in k)
    tensors[name] = tensors[name] + 0.01
    nla.save_weights(path, tensors, nla.read_meta(path))
    p = rl_steps(tiny_dir, root, 2, '--resume=True', ok=False)
    assert 'are not those the run started from' in p.stderr.strip().splitlines()[-1]


def test_resume_refuses_inits_that_build_other_adapters(tiny_dir, tiny_data, sft_runs, tmp_path):
    """An sft_av begun with fresh adapters (config/tiny.py: rank 8, alpha 16) resumed with an init_av of alpha 32
    would load its adapters at another scale."""
    args = [*base_args(tiny_dir, tiny_data), '--stage=sft_av', f'--out_dir={tmp_path / "run"}', '--eval_interval=100']
    run_script('train.py', *args, '--max_steps=1')
    av = edited_weights(sft_runs['av'], 'av.safetensors', tmp_path / 'av', {'lora_alpha': 32.0})
    p = run_script('train.py', *args, '--max_steps=2', '--resume=True', f'--init_av={av}', ok=False)
    assert 'its models were built with' in p.stderr.strip().splitlines()[-1]


def test_resume_refuses_an_init_ar_that_reads_another_text_length(tiny_dir, tiny_data, sft_runs, tmp_path):
    """The AR's text length comes from init_ar's metadata: a resume given an AR of another ar_max_tokens would go on
    reading texts cut elsewhere."""
    args = [*base_args(tiny_dir, tiny_data), '--stage=sft_ar', f'--out_dir={tmp_path / "run"}', '--eval_interval=100']
    run_script('train.py', *args, '--max_steps=1')
    ar = edited_weights(sft_runs['ar'], 'ar.safetensors', tmp_path / 'ar', {'ar_max_tokens': 16})
    p = run_script('train.py', *args, '--max_steps=2', '--resume=True', f'--init_ar={ar}', ok=False)
    assert 'its models were built with' in p.stderr.strip().splitlines()[-1]


def test_resume_names_a_changed_setting_before_the_adapters_it_changes(tiny_dir, tiny_data, tmp_path):
    """A changed lora_rank builds other adapters too: the setting is what to name, not the inits (none were given)."""
    args = [*base_args(tiny_dir, tiny_data), '--stage=sft_av', f'--out_dir={tmp_path / "run"}', '--eval_interval=100']
    run_script('train.py', *args, '--max_steps=1')
    p = run_script('train.py', *args, '--max_steps=2', '--resume=True', '--lora_rank=4', ok=False)
    assert 'was made with lora_rank=8: resume with the same settings' in p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize('edit, said', [
    (lambda config: config.pop('kl_coef'), 'was made by a train.py without the setting(s) kl_coef: start the run again'),
    (lambda config: config.update(length_bonus=0.1),
     'was made with the setting(s) length_bonus, which this train.py does not have: start the run again')],
    ids=['added', 'removed'])
def test_resume_names_a_setting_that_train_py_added_or_removed_since(edit, said, tiny_dir, tiny_data, tmp_path):
    """A setting added to train.py since the run began (a fork's new reward term, say) is named as such, not as one
    changed from None; one removed since is named as such, not as one to be given the same value again."""
    args = [*base_args(tiny_dir, tiny_data), '--stage=sft_av', f'--out_dir={tmp_path / "run"}', '--eval_interval=100']
    run_script('train.py', *args, '--max_steps=1')
    edit_checkpoint(tmp_path / 'run', lambda ckpt: edit(ckpt['config']))
    p = run_script('train.py', *args, '--max_steps=2', '--resume=True', ok=False)
    assert p.stderr.strip().splitlines()[-1].endswith('ckpt.pt ' + said)


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tiny_dir, tiny_data, tmp_path):
    args = [*base_args(tiny_dir, tiny_data), '--stage=sft_av', f'--out_dir={tmp_path / "run"}', '--max_steps=1']
    run_script('train.py', *args)
    p = run_script('train.py', *args, '--resume=True')
    assert "at step 1: the run's last step (max_steps=1), so nothing is left to do" in p.stdout


def test_init_trained_on_another_base_model_is_noted(tiny_data, sft_runs, monkeypatch, capsys):
    """A model of the same architecture loads the init's weights without error: said, since they may not fit it."""
    meta = json.loads(open(os.path.join(tiny_data, 'meta.json')).read())
    path = os.path.join(sft_runs['av'], 'av.safetensors')
    monkeypatch.setattr(train, 'base_model', nla.read_meta(path)['base_model'])
    train.read_init(path, ['lora_rank'], meta)
    assert 'was trained on' not in capsys.readouterr().err
    monkeypatch.setattr(train, 'base_model', '/elsewhere/a-finetune')
    train.read_init(path, ['lora_rank'], meta)
    assert 'this run loads /elsewhere/a-finetune: if their weights differ' in capsys.readouterr().err


def test_init_trained_on_other_data_is_noted(tiny_data, sft_runs, monkeypatch, capsys):
    """Its val rows may have been the init's training rows: said, not refused (evaluating on other data is allowed)."""
    monkeypatch.setattr(train, 'data_dir', tiny_data)
    meta = json.loads(open(os.path.join(tiny_data, 'meta.json')).read())
    path = os.path.join(sft_runs['av'], 'av.safetensors')
    train.read_init(path, ['lora_rank'], meta)
    assert 'trained on other data' not in capsys.readouterr().err
    train.read_init(path, ['lora_rank'], {**meta, 'data_id': 'other'})
    assert 'was trained on other data' in capsys.readouterr().err


def test_each_ar_reads_as_many_tokens_as_it_was_trained_on(tiny_dir, tiny_data, sft_runs, tmp_path):
    """Both ARs were trained on 64 tokens (config/tiny.py): --ar_max_tokens=16 changes neither, while an AR
    whose metadata says 16 reads 16."""
    def eval_record(name, ar, *args):
        run_script('train.py', *base_args(tiny_dir, tiny_data), '--stage=eval', f'--init_av={sft_runs["av"]}', f'--init_ar={ar}',
                   f'--context_ar={sft_runs["ar_context"]}', f'--out_dir={tmp_path / name}', *args)
        return read_log(tmp_path / name)[-1]
    a = eval_record('a', sft_runs['ar'])
    b = eval_record('b', sft_runs['ar'], '--ar_max_tokens=16')
    c = eval_record('c', edited_weights(sft_runs['ar'], 'ar.safetensors', tmp_path / 'ar16', {'ar_max_tokens': 16}))
    assert a['fve_context'] == b['fve_context'] == c['fve_context'] and a['fve_teacher'] == b['fve_teacher'], (a, b)
    assert c['fve_teacher'] != a['fve_teacher'], (a, c)


def edited_weights(run_dir, name, dst, edit=None, drop=()):
    """A copy of a run's weights file in folder dst, its metadata edited."""
    path = os.path.join(run_dir, name)
    meta = {k: v for k, v in nla.read_meta(path).items() if k not in drop}
    dst.mkdir()
    nla.save_weights(str(dst / name), load_file(path), {**meta, **(edit or {})})
    return dst


def eval_fails(tiny_dir, tiny_data, tmp_path, av, ar, *args):
    """The last stderr line of an eval that must fail, having written nothing."""
    p = run_script('train.py', *base_args(tiny_dir, tiny_data), '--stage=eval', f'--out_dir={tmp_path / "out"}',
                   f'--init_av={av}', f'--init_ar={ar}', *args, ok=False)
    assert not (tmp_path / 'out').exists()
    return p.stderr.strip().splitlines()[-1]


def test_context_ar_must_read_contexts(tiny_dir, tiny_data, sft_runs, tmp_path):
    last = eval_fails(tiny_dir, tiny_data, tmp_path, sft_runs['av'], sft_runs['ar'], f'--context_ar={sft_runs["ar"]}')
    assert "ar_input='context'" in last


def test_refuses_an_ar_file_without_the_metadata_to_rebuild_it(tiny_dir, tiny_data, sft_runs, tmp_path):
    """An ar.safetensors from before ar_max_tokens was recorded cannot tell how many tokens its AR read."""
    old = edited_weights(sft_runs['ar_context'], 'ar.safetensors', tmp_path / 'old', drop=['ar_max_tokens'])
    last = eval_fails(tiny_dir, tiny_data, tmp_path, sft_runs['av'], sft_runs['ar'], f'--context_ar={old}')
    assert 'has no ar_max_tokens in its metadata' in last


def test_refuses_an_av_made_for_another_layer(tiny_dir, tiny_data, sft_runs, tmp_path):
    av = edited_weights(sft_runs['av'], 'av.safetensors', tmp_path / 'av', {'layer': 0})
    last = eval_fails(tiny_dir, tiny_data, tmp_path, av, sft_runs['ar'])
    assert 'was made for another model or layer' in last and 'layer 0, the data' in last


def test_refuses_weights_that_do_not_fit_the_model(tiny_dir, tiny_data, sft_runs, tmp_path):
    """Metadata that says rank 16 over rank-8 weights: the shapes do not fit, said in one line."""
    av = edited_weights(sft_runs['av'], 'av.safetensors', tmp_path / 'av', {'lora_rank': 16})
    assert 'the model wants' in eval_fails(tiny_dir, tiny_data, tmp_path, av, sft_runs['ar'])


def test_eval_refuses_a_context_ar_as_its_ar(tiny_dir, tiny_data, sft_runs, tmp_path):
    last = eval_fails(tiny_dir, tiny_data, tmp_path, sft_runs['av'], sft_runs['ar_context'])
    assert "ar_input='context', used here where one of ar_input='explanation' is needed" in last


def test_refuses_an_av_and_an_ar_of_other_steps_in_one_folder(tiny_dir, tiny_data, sft_runs, tmp_path):
    """A crash between a checkpoint's two weight writes leaves them a step apart; an eval would pair them silently."""
    both = edited_weights(sft_runs['av'], 'av.safetensors', tmp_path / 'both')
    step = nla.read_meta(str(both / 'av.safetensors'))['step']
    shutil.copy(edited_weights(sft_runs['ar'], 'ar.safetensors', tmp_path / 'ar', {'step': step + 1}) / 'ar.safetensors', both)
    assert f'holds av.safetensors of step {step} and ar.safetensors of step {step + 1}' in \
        eval_fails(tiny_dir, tiny_data, tmp_path, both, both)


@pytest.mark.parametrize('stage, advice', [('sft_ar', 'pass --resume=True to continue it, or choose another out_dir'),
                                           ('eval', 'choose another out_dir')])  # an eval has nothing to resume
def test_refuses_another_runs_out_dir(tiny_dir, tiny_data, sft_runs, stage, advice):
    inits = [f'--init_av={sft_runs["av"]}', f'--init_ar={sft_runs["ar"]}'] if stage == 'eval' else []
    out = sft_runs['ar_context'] if stage == 'eval' else sft_runs['ar']  # an eval's out_dir that is not one of its inits
    p = run_script('train.py', *base_args(tiny_dir, tiny_data), f'--stage={stage}', f'--out_dir={out}', *inits, ok=False)
    assert p.stderr.strip().splitlines()[-1].endswith(f"holds another run's ckpt.pt: {advice}")


def test_a_second_run_on_an_out_dir_in_use_is_refused(tiny_dir, tiny_data, tmp_path):
    """A job submitted twice, or a resume of a run thought dead, would write its steps among the live run's; and
    before the live run's first checkpoint, the checks of out_dir's files said to delete its log."""
    out = tmp_path / 'run'
    args = [*base_args(tiny_dir, tiny_data), '--stage=sft_ar', f'--out_dir={out}', '--eval_interval=100000']
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args, '--max_steps=100000', '--ckpt_interval=100000'],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_a_step(p, out, 'sft_ar')
        for more in ([], ['--resume=True']):
            second = run_script('train.py', *args, '--max_steps=100000', *more, ok=False)
            assert second.stderr.strip().splitlines()[-1] == f"train: {out} is in use by another run: wait for it to end, or choose another out_dir"
        assert p.poll() is None
    finally:
        kill_group(p)
    steps = [r['step'] for r in read_log(out, 'sft_ar')]
    assert steps == list(range(1, len(steps) + 1))


@pytest.mark.parametrize('into', ['base_model', 'init_av'])
def test_an_out_dir_that_is_an_input_folder_is_refused(tiny_dir, tiny_data, sft_runs, tmp_path, into):
    """A model folder's config.json would be replaced by the run's; rl would write over the weights it starts from."""
    model, av = tmp_path / 'model', tmp_path / 'av'
    shutil.copytree(tiny_dir['llama'], model)
    av.mkdir()
    shutil.copy(os.path.join(sft_runs['av'], 'av.safetensors'), av)
    before = {p: p.read_bytes() for p in [*model.iterdir(), *av.iterdir()]}
    out = model if into == 'base_model' else av
    p = run_script('train.py', 'config/tiny.py', f'--base_model={model}', f'--data_dir={tiny_data}', *RL_ARGS, '--max_steps=1',
                   f'--init_av={av}', f'--init_ar={sft_runs["ar"]}', f'--out_dir={out}', ok=False)
    assert p.stderr.strip().splitlines()[-1] == f"train: out_dir '{out}' is the {into} folder: the run would write over what it reads; choose another out_dir"
    assert before == {p: p.read_bytes() for p in [*model.iterdir(), *av.iterdir()]}


def test_refuses_an_out_dir_with_a_log_but_no_checkpoint(tiny_dir, tiny_data, sft_runs, tmp_path):
    """A run that died before its first checkpoint left log.jsonl; a new run would have appended to it."""
    shutil.copy(os.path.join(sft_runs['ar'], 'log.jsonl'), tmp_path)
    p = run_script('train.py', *base_args(tiny_dir, tiny_data), '--stage=eval', f'--out_dir={tmp_path}',
                   f'--init_av={sft_runs["av"]}', f'--init_ar={sft_runs["ar"]}', ok=False)
    last = p.stderr.strip().splitlines()[-1]
    assert 'holds the log.jsonl of an eval' in last and '--resume' not in last
    assert sorted(os.listdir(tmp_path)) == ['log.jsonl']


def test_a_checkpoint_of_an_older_train_py_names_what_it_lacks(tiny_dir, tiny_data, sft_runs, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(sft_runs['ar'], run)
    edit_checkpoint(run, lambda ckpt: ckpt.pop('built'))
    p = run_script('train.py', *base_args(tiny_dir, tiny_data), '--stage=sft_ar', f'--out_dir={run}', '--resume=True', ok=False)
    assert p.stderr.strip().splitlines()[-1] == f"train: {run / 'ckpt.pt'} was written by an older train.py (it has no built): start the run again"


def test_a_checkpoint_cut_by_a_crash_stops_a_resume_in_one_line(tiny_dir, tiny_data, sft_runs, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(sft_runs['ar'], run)
    data = (run / 'ckpt.pt').read_bytes()
    (run / 'ckpt.pt').write_bytes(data[:len(data) // 2])
    p = run_script('train.py', *base_args(tiny_dir, tiny_data), '--stage=sft_ar', f'--out_dir={run}', '--resume=True', ok=False)
    assert 'cannot be read (cut short by a crash?)' in p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize('line', [b'\0\0\0\0\n', b'\xff\xfe\n', b'{"stage": "eval"}\n'])  # a power cut's; not UTF-8; no step
def test_a_damaged_log_line_stops_a_resume_in_one_line(tiny_dir, tiny_data, sft_runs, tmp_path, line):
    run = tmp_path / 'run'
    shutil.copytree(sft_runs['ar'], run)
    with open(run / 'log.jsonl', 'ab') as f:
        f.write(line)
    before = (run / 'log.jsonl').read_bytes()
    p = run_script('train.py', *base_args(tiny_dir, tiny_data), '--stage=sft_ar', f'--out_dir={run}', '--resume=True',
                   '--max_steps=300', '--ar_lr=2e-3', '--eval_interval=100', '--eval_rows=160', ok=False)
    assert p.stderr.strip().splitlines()[-1] == f"train: {run / 'log.jsonl'} holds a line that is not a log record (damaged, or edited?): delete it, then resume"
    assert (run / 'log.jsonl').read_bytes() == before


@pytest.mark.parametrize('meta_edit, val, message', [
    (lambda m: json.dumps(m)[:40], None, 'is not JSON (cut short?)'),
    (None, zero_first_activation, 'row 0 has a NaN, inf or all-zero activation'),
    (lambda m: json.dumps({**m, 'model_type': 'qwen3'}), None, "does not fit base_model"),
    (None, lambda t: t.slice(1), 'its files are not those its meta.json was written with'),  # a readable split, but not this data's
])
def test_refuses_bad_data_in_one_line_before_writing(tiny_dir, tiny_data, tmp_path, meta_edit, val, message):
    """The readers' refusals (each tested in test_datagen.py) reach the user as one line, before out_dir exists."""
    data = broken_copy(tiny_data, tmp_path, meta_edit, val)
    p = run_script('train.py', 'config/tiny.py', f'--base_model={tiny_dir["llama"]}', f'--data_dir={data}',
                   '--stage=sft_av', f'--out_dir={tmp_path / "out"}', ok=False)
    assert message in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('stage', ['sft_av', 'sft_ar'])
def test_a_model_folder_without_its_weights_is_refused_in_one_line_before_writing(tiny_dir, tiny_data, tmp_path, stage):
    model = tmp_path / 'model'
    shutil.copytree(tiny_dir['llama'], model, ignore=shutil.ignore_patterns('*.safetensors'))
    p = run_script('train.py', 'config/tiny.py', f'--base_model={model}', f'--data_dir={tiny_data}', f'--stage={stage}',
                   f'--out_dir={tmp_path / "out"}', ok=False)
    assert f"base_model '{model}': its weights cannot be loaded" in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / 'out').exists()


def test_data_made_under_another_model_name_gets_a_note(tiny_dir, tiny_data, tmp_path):
    """The same architecture and tokenizer pass the data check, so a model of other weights would too: it is said."""
    model = tmp_path / 'model'
    shutil.copytree(tiny_dir['llama'], model)
    args = ['config/tiny.py', f'--data_dir={tiny_data}', '--stage=sft_ar', '--max_steps=1']
    note = f"train: note: {tiny_data} was made with {tiny_dir['llama']}, this run loads {model}"
    assert note not in run_script('train.py', *args, f'--base_model={tiny_dir["llama"]}', f'--out_dir={tmp_path / "a"}').stderr
    assert note in run_script('train.py', *args, f'--base_model={model}', f'--out_dir={tmp_path / "b"}').stderr


def test_a_run_of_no_steps_is_refused_before_writing(tiny_dir, tiny_data, tmp_path):
    p = run_script('train.py', *base_args(tiny_dir, tiny_data), '--stage=sft_ar', '--batch_size=100000',
                   f'--out_dir={tmp_path / "out"}', ok=False)
    assert 'make no step of batch_size=100000' in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / 'out').exists()


def test_non_finite_steps_stop_the_run(tiny_dir, tiny_data, tmp_path):
    """A learning rate of 1e30 blows the AR up after one step; the next three are skipped, then the run stops."""
    p = run_script('train.py', *base_args(tiny_dir, tiny_data), '--ar_lr=1e30', '--stage=sft_ar', '--max_steps=10',
                   f'--out_dir={tmp_path / "out"}', ok=False)
    assert '3 steps in a row had a non-finite loss or gradient' in p.stderr.strip().splitlines()[-1]

# -----------------------------------------------------------------------------
# the arithmetic, against hand computations


def test_an_eval_and_an_rl_step_of_one_number_draw_apart():
    """An eval at step s does not draw the rollouts of rl step s (seed_key tells the two kinds apart)."""
    assert train.sample_seed((1, 5), 0) != train.sample_seed((0, 5), 0)


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 6.0, -2.0, -2.0, -2.0])
    adv = train.advantages(rewards, 3)
    sd = statistics.stdev([1, 2, 6])  # sqrt(7): a group std of 1 would hide a missing division
    assert adv[:3].tolist() == pytest.approx([-2 / (sd + 1e-6), -1 / (sd + 1e-6), 3 / (sd + 1e-6)])
    assert adv[3:].tolist() == [0, 0, 0]


def test_equal_rewards_get_exactly_zero_advantage():
    """A float32 group mean can miss equal rewards by one ulp; the division must not turn that into a push."""
    rewards = torch.tensor([-0.4537123] * 8 + [-1.9876] * 8 + [-0.1234567] * 8)  # float32 means miss: 0.119 advantages
    assert train.advantages(rewards, 8).tolist() == [0.0] * 24


def test_a_cosine_reward_gives_the_same_advantages():
    """README: advantages ignore a positive affine map of the reward, and -mse = 2 cos - 2, so cosine trains alike."""
    g = torch.Generator().manual_seed(0)  # a group of nearly equal rewards would magnify float32 rounding past atol
    preds, acts = torch.randn(12, 64, generator=g), torch.randn(12, 64, generator=g)
    cos = torch.nn.functional.cosine_similarity(preds, acts)
    torch.testing.assert_close(nla.reward(preds, acts), 2 * cos - 2)
    torch.testing.assert_close(train.advantages(cos, 4), train.advantages(nla.reward(preds, acts), 4), atol=1e-4, rtol=0)


def test_policy_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    loss, kl = train.policy_loss(logp, ref, adv, mask, kl_coef=0.1, logratio_clamp=10.0)
    k3 = lambda r: math.exp(r) - r - 1
    want0 = ((-2 * -1.0 + 0.1 * k3(-0.5)) + (-2 * -2.0 + 0.1 * k3(0.0))) / 2
    want1 = ((1 * -0.5 + 0.1 * k3(0.0)) + (1 * -0.5 + 0.1 * k3(-0.5)) + (1 * -0.5 + 0.1 * k3(0.5))) / 3
    assert loss.tolist() == pytest.approx([want0, want1])
    assert kl.tolist() == pytest.approx([k3(-0.5) / 2, (k3(-0.5) + k3(0.5)) / 3])


def test_logratio_clamp_bounds_k3():
    """A token the policy made far less likely than the reference (log ratio 20) counts as a log ratio of 10, and one it
    made far more likely (log ratio -20) as -10."""
    _, kl = train.policy_loss(torch.tensor([[-20.0], [0.0]]), torch.tensor([[0.0], [-20.0]]), torch.zeros(2), torch.ones(2, 1), 1.0, 10.0)
    assert kl.tolist() == pytest.approx([math.exp(10) - 10 - 1, math.exp(-10) + 10 - 1])


def test_kl_term_pulls_the_policy_toward_the_reference():
    """With no advantage, the loss's gradient is the k3 term's: d/dlogp kl_coef * (exp(r) - r - 1), r = ref - logp, is
    kl_coef * (1 - exp(r)), per masked token over the rollout's token count (a KL that was logged but not trained fails)."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.2, -4.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.1, -0.2, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, _ = train.policy_loss(logp, ref, torch.zeros(2), mask, kl_coef=0.1, logratio_clamp=10.0)
    loss.sum().backward()
    want = 0.1 * (1 - (ref - logp.detach()).exp()) * mask / mask.sum(1, keepdim=True)
    torch.testing.assert_close(logp.grad, want)


def test_k3_is_zero_when_policy_equals_reference():
    logp = torch.randn(4, 7)
    loss, kl = train.policy_loss(logp, logp.clone(), torch.zeros(4), torch.ones(4, 7), 1.0, 10.0)
    assert torch.equal(kl, torch.zeros(4)) and torch.equal(loss, torch.zeros(4))


def test_policy_gradient_direction():
    """A positive advantage raises the sampled tokens' log-probability."""
    logits = torch.zeros(1, 3, 5, requires_grad=True)
    ids = torch.tensor([[1, 2, 3]])
    logp = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    loss, _ = train.policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 3), 0.1, 10.0)
    loss.sum().backward()
    assert (logits.grad[0, torch.arange(3), ids[0]] < 0).all()


def test_reward_floor_and_length_penalty(tiny_dir, monkeypatch):
    monkeypatch.setattr(train, 'max_new_tokens', 20)
    monkeypatch.setattr(train, 'length_slack', 5)
    monkeypatch.setattr(train, 'length_penalty', 0.1)
    monkeypatch.setattr(train, 'base_model', tiny_dir['llama'])
    monkeypatch.setattr(train, 'dtype', 'float32')
    ar, _ = train.build_ar('', {'layer': 1}, 'explanation', 'cpu')
    tok = nla.load_tokenizer(tiny_dir['llama'])
    texts = ['no tags at all', '<explanation>cut off</explanation>', '<explanation>short</explanation>',
             '<explanation>long</explanation>']
    truncated = torch.tensor([False, True, False, False])
    lengths = torch.tensor([10, 20, 10, 18])
    acts = torch.randn(4, 64)
    rewards, valid, _, _ = train.score(ar, tok, texts, truncated, lengths, acts, 'cpu')
    assert rewards[:2].tolist() == [nla.FAIL_REWARD, nla.FAIL_REWARD]
    assert valid.tolist() == [False, False, True, True]
    want = nla.reward(train.ar_predict(ar, tok, ['short', 'long'], 'cpu'), acts[2:]) - torch.tensor([0.0, 0.1 * 3])
    torch.testing.assert_close(rewards[2:], want)


def test_a_base_model_lora_cannot_adapt_is_refused_in_one_line(tmp_path, monkeypatch):
    """GPT-2's projections are Conv1D: an AV or a LoRA AR of it would have nothing to train."""
    tiny_gpt2().save_pretrained(tmp_path / 'gpt2')
    monkeypatch.setattr(train, 'base_model', str(tmp_path / 'gpt2'))
    monkeypatch.setattr(train, 'dtype', 'float32')
    with pytest.raises(SystemExit, match="^train: GPT2LMHeadModel: its decoder blocks hold no nn.Linear"):
        train.build_av('', {}, None, 'cpu')
    monkeypatch.setattr(train, 'ar_lora_rank', 4)
    with pytest.raises(SystemExit, match="^train: GPT2Model: its decoder blocks hold no nn.Linear"):
        train.build_ar('', {'layer': 0}, 'explanation', 'cpu')


def test_take_rows_is_a_seeded_stream(monkeypatch):
    a, c1 = train.take_rows(0, 7, 10)
    b, c2 = train.take_rows(c1, 7, 10)
    assert (c1, c2) == (7, 14) and sorted(a + b[:3]) == list(range(10))  # epoch 0 whole, then epoch 1
    assert b[3:] == train.take_rows(10, 4, 10)[0] and train.take_rows(0, 14, 10)[0] == a + b  # epoch 1 from its start
    assert train.take_rows(7, 7, 10)[0] == b
    assert train.take_rows(23, 4, 10)[0] == train.take_rows(20, 7, 10)[0][3:]  # a resume inside a later epoch
    assert train.take_rows(0, 10, 10)[0] != train.take_rows(10, 10, 10)[0]  # each epoch its own order
    monkeypatch.setattr(train, 'seed', train.seed + 1)
    assert train.take_rows(0, 10, 10)[0] != a + b[:3]  # the config's seed orders the rows


def test_lr_schedule(monkeypatch):
    monkeypatch.setattr(train, 'warmup_steps', 10)
    monkeypatch.setattr(train, 'min_lr_frac', 0.1)
    assert train.lr_at(0, 1.0, 100) == pytest.approx(0.1)
    assert train.lr_at(10, 1.0, 100) == pytest.approx(1.0)
    assert train.lr_at(100, 1.0, 100) == pytest.approx(0.1)
    assert train.lr_at(35, 1.0, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # a quarter of the way
    monkeypatch.setattr(train, 'min_lr_frac', 1.0)
    assert train.lr_at(60, 1.0, 100) == pytest.approx(1.0)


def test_optimizer_step_skips_non_finite_gradients():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.tensor([1.0, float('nan'), 0.0])
    norm, ok = train.optimizer_step([w], opt, 0.1)
    assert not ok and torch.equal(w.data, torch.ones(3)) and w.grad is None


def test_eval_shards_are_contiguous_and_together_every_eval_row(monkeypatch):
    """10 rows over 3 ranks are 3 + 3 + 4: none is dropped, so the eval scores the rows one process would."""
    monkeypatch.setattr(train, 'eval_rows', 10)
    monkeypatch.setattr(train, 'ddp_world_size', 3)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(train, 'ddp_rank', rank)
        shards.append(train.eval_shard(100))
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(SystemExit, match='leave nothing for some of the 3 ranks'):
        train.eval_shard(2)
    monkeypatch.setattr(train, 'eval_rows', 3)  # as many rows as ranks: one each
    assert train.eval_shard(100) == [2]


@pytest.mark.parametrize('settings, message', [
    ({'stage': 'rl', 'group_size': 1, 'max_steps': 5, 'init_av': 'a', 'init_ar': 'b'}, 'at least 2'),
    ({'dtype': 'float16'}, 'loss scaling'),
    ({'top_k': 50}, 'true policy'),
    ({'rollout': 'sglang'}, "rollout must be"),
    ({'rollout': 'vllm', 'device': 'cuda:1'}, 'CUDA_VISIBLE_DEVICES'),
    ({'stage': 'rl', 'max_steps': 0}, 'max_steps > 0'),
    ({'stage': 'rl', 'max_steps': 5, 'init_av': 'a'}, "stage 'rl' needs init_av and init_ar"),
    ({'stage': 'eval', 'init_av': 'a'}, "stage 'eval' needs init_av and init_ar"),
    ({'dtype': 'float64'}, 'dtype must be one of'),
    ({'device': 'gpu'}, "device must be 'auto'"),
    ({'micro_batch': 0}, 'micro_batch must be at least 1'),
    ({'ar_max_tokens': 0}, 'ar_max_tokens must be at least 1'),
    ({'max_steps': -3}, 'max_steps must not be negative'),
    ({'ar_lr': -1.0}, 'ar_lr must not be negative'),
    ({'grad_clip': 0.0}, 'grad_clip must be positive'),
    ({'min_lr_frac': 1.5}, 'min_lr_frac in'),
    ({'resume': True}, 'resume=True but'),
    ({'seed': -1}, 'seed must be in'),
    ({'logratio_clamp': 0.0}, 'logratio_clamp must be positive'),
    ({'lora_alpha': 0.0}, 'lora_alpha must be positive'),
    ({'out_dir': ''}, 'out_dir is empty'),
    ({'length_slack': -1}, 'length_slack must not be negative'),
    ({'rollout': 'vllm', 'stage': 'eval', 'init_av': 'a', 'init_ar': 'b'}, 'pip install vllm==0.26.0'),
    ({'wandb_log': True}, 'pip install wandb'),
    ({'stage': 'sft_av', 'init_ar': 'b'}, "stage 'sft_av' does not use init_ar"),
    ({'stage': 'sft_ar', 'context_ar': 'c'}, "stage 'sft_ar' does not use context_ar"),
    ({'stage': 'sft_av', 'context_ar': 'c'}, "stage 'sft_av' does not use context_ar"),
    ({'stage': 'sft_ar', 'init_av': 'a'}, "stage 'sft_ar' does not use init_av"),
    ({'seed': 2**32}, 'seed must be in'),
    ({'vllm_gpu_memory': 0.0}, 'vllm_gpu_memory must be in'),
    ({'min_lr_frac': -0.1}, 'min_lr_frac in'),
    ({'top_p': 0.9}, 'true policy'),
])
def test_check_config_refusals(monkeypatch, tmp_path, settings, message):
    configure(monkeypatch, tmp_path, settings)
    with pytest.raises(SystemExit, match=message):
        train.check_config()


def configure(monkeypatch, tmp_path, settings):
    """train's config globals for a check_config call: out_dir in tmp_path, the optional packages (vllm, wandb) absent."""
    monkeypatch.setattr(train, 'out_dir', str(tmp_path))
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    for k, v in settings.items():
        monkeypatch.setattr(train, k, v)


def accepted(monkeypatch, tmp_path, settings):
    configure(monkeypatch, tmp_path, settings)
    _, lock = train.check_config()
    if lock is not None:
        os.close(lock)


AT_LEAST_1 = ['batch_size', 'micro_batch', 'batch_prompts', 'group_size', 'max_new_tokens', 'gen_batch_size', 'epochs',
              'eval_interval', 'eval_rows', 'ckpt_interval', 'log_interval', 'max_bad_steps', 'ar_max_tokens', 'lora_rank']
NOT_NEGATIVE = ['max_steps', 'warmup_steps', 'lr', 'ar_lr', 'weight_decay', 'ar_lora_rank', 'eval_examples',
                'length_penalty', 'length_slack', 'kl_coef']
POSITIVE = ['grad_clip', 'max_logprob_diff', 'logratio_clamp', 'lora_alpha']


@pytest.mark.parametrize('name', AT_LEAST_1)
def test_check_config_refuses_each_count_of_zero(monkeypatch, tmp_path, name):
    """Else a zero ends in a traceback (a % 0 or // 0) or a run that does nothing."""
    configure(monkeypatch, tmp_path, {name: 0})
    with pytest.raises(SystemExit, match=f'{name} must be at least 1, got 0'):
        train.check_config()


@pytest.mark.parametrize('name', NOT_NEGATIVE)
def test_check_config_refuses_each_negative_and_takes_zero(monkeypatch, tmp_path, name):
    """A negative lr or kl_coef would train the wrong way without a word."""
    accepted(monkeypatch, tmp_path, {name: 0})
    monkeypatch.setattr(train, name, -1)
    with pytest.raises(SystemExit, match=f'{name} must not be negative, got -1'):
        train.check_config()


@pytest.mark.parametrize('name', POSITIVE)
def test_check_config_refuses_each_zero_that_must_be_positive(monkeypatch, tmp_path, name):
    """max_logprob_diff=0, say, would leave every vLLM rollout out of the loss."""
    configure(monkeypatch, tmp_path, {name: 0.0})
    with pytest.raises(SystemExit, match=f'{name} must be positive, got 0.0'):
        train.check_config()


@pytest.mark.parametrize('settings', [
    {'seed': 0}, {'seed': 2**32 - 1},  # numpy's seed range, both ends
    {'vllm_gpu_memory': 1.0}, {'min_lr_frac': 0.0}, {'min_lr_frac': 1.0},  # 0: the cosine to zero; 1: constant after warmup
    {'stage': 'rl', 'group_size': 2, 'max_steps': 5, 'init_av': 'a', 'init_ar': 'b'},  # the smallest group
    {'stage': 'eval', 'dtype': 'float16', 'init_av': 'a', 'init_ar': 'b'},  # no loss, so no loss scaling needed
    {'rollout': 'vllm', 'stage': 'sft_av'},  # SFT samples nothing: vLLM need not be installed
])
def test_check_config_takes_the_ends_of_each_range(monkeypatch, tmp_path, settings):
    accepted(monkeypatch, tmp_path, settings)


def test_check_config_takes_cuda_0_for_a_vllm_run_in_one_process(monkeypatch, tmp_path):
    monkeypatch.setattr(nla, 'resolve_device', lambda name: name)  # no GPU needed to check the config
    accepted(monkeypatch, tmp_path, {'rollout': 'vllm', 'device': 'cuda:0', 'stage': 'sft_av'})


def test_an_out_dir_that_is_init_ar_is_refused(monkeypatch, tmp_path):
    """An rl run would write over the ar.safetensors it reads."""
    configure(monkeypatch, tmp_path, {'stage': 'rl', 'max_steps': 5, 'init_av': 'a', 'init_ar': str(tmp_path)})
    with pytest.raises(SystemExit, match="is the init_ar folder"):
        train.check_config()


@pytest.mark.parametrize('stage, refused', [('sft_av', 'batch_size'), ('sft_ar', 'batch_size'), ('rl', 'batch_prompts')])
def test_only_the_stage_batch_must_divide_by_the_ranks(monkeypatch, tmp_path, stage, refused):
    """Three ranks: the stage's own global batch is refused when it does not divide, the other stage's is not looked at."""
    other = {'batch_size': 'batch_prompts', 'batch_prompts': 'batch_size'}[refused]
    accepted(monkeypatch, tmp_path, {'stage': stage, 'ddp_world_size': 3, refused: 30, other: 32, 'max_steps': 5,
                                     'init_av': 'a' if stage == 'rl' else '', 'init_ar': 'b' if stage == 'rl' else ''})
    monkeypatch.setattr(train, refused, 32)
    with pytest.raises(SystemExit, match=f'{refused}=32 must divide by the number of ranks, 3'):
        train.check_config()


def test_an_eval_takes_no_batch_so_none_must_divide_by_the_ranks(monkeypatch, tmp_path):
    accepted(monkeypatch, tmp_path, {'stage': 'eval', 'ddp_world_size': 3, 'batch_size': 32, 'batch_prompts': 32,
                                     'init_av': 'a', 'init_ar': 'b'})


def test_log_writes_non_finite_floats_as_null(monkeypatch, tmp_path):
    """log.jsonl stays strict JSON: a diverged step's inf or nan loss is written as null."""
    monkeypatch.setattr(train, 'out_dir', str(tmp_path))
    mirrored = []
    run = types.SimpleNamespace(wandb_log=lambda values, step: mirrored.append(values))
    train.log(run, {'stage': 'sft_ar', 'step': 1, 'loss': float('inf'), 'kl': float('-inf'), 'fve': float('nan'), 'n': 2})
    line = (tmp_path / 'log.jsonl').read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} in log.jsonl'))
    assert record == {'stage': 'sft_ar', 'step': 1, 'loss': None, 'kl': None, 'fve': None, 'n': 2}
    assert mirrored == [{'sft_ar/n': 2}]


def test_only_rank_0_logs(monkeypatch, tmp_path):
    monkeypatch.setattr(train, 'out_dir', str(tmp_path))
    monkeypatch.setattr(train, 'master_process', False)
    mirrored = []
    train.log(types.SimpleNamespace(wandb_log=lambda *a, **k: mirrored.append(a)), {'stage': 'rl', 'step': 1, 'fve': 0.5})
    assert not (tmp_path / 'log.jsonl').exists() and mirrored == []


def test_fmt_leaves_out_stage_and_step_and_rounds_floats():
    assert train.fmt({'stage': 'rl', 'step': 3, 'loss': 0.123456, 'rows': 5, 'lr': 1e-5}) == 'loss 0.1235 | rows 5 | lr 1e-05'


def test_sft_steps_counts_the_rows_of_all_epochs(monkeypatch):
    """3 epochs of 10 rows in batches of 4 are 30 rows: 7 steps (take_rows streams across epochs)."""
    monkeypatch.setattr(train, 'max_steps', 0)
    monkeypatch.setattr(train, 'epochs', 3)
    monkeypatch.setattr(train, 'batch_size', 4)
    assert train.sft_steps(10) == 7
    monkeypatch.setattr(train, 'max_steps', 2)
    assert train.sft_steps(10) == 2


def test_lock_out_dir_refuses_a_folder_another_run_holds(monkeypatch, tmp_path):
    monkeypatch.setattr(train, 'out_dir', str(tmp_path))
    held = os.open(tmp_path, os.O_RDONLY)  # another open file description: flock conflicts even within one process
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def too_long(*_):
        raise TimeoutError('lock_out_dir waited for the lock instead of refusing')
    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(5)
    try:
        with pytest.raises(SystemExit, match='is in use by another run'):
            train.lock_out_dir()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        os.close(held)


@pytest.mark.parametrize('side, key', [('av', 'lora_rank'), ('av', 'lora_alpha'), ('av', 'rslora'), ('ar', 'ar_lora_rank'),
                                       ('ar', 'lora_alpha'), ('ar', 'rslora'), ('ar', 'ar_max_tokens')])
def test_build_settings_tell_apart_models_built_with_any_other_setting(side, key):
    """A resume compares these: an init of another rslora or ar_lora_rank builds other adapters, and must be refused."""
    metas = {'av': {'lora_rank': 8, 'lora_alpha': 16.0, 'rslora': False},
             'ar': {'ar_lora_rank': 4, 'lora_alpha': 8.0, 'rslora': False, 'ar_max_tokens': 64}}
    before = train.build_settings(types.SimpleNamespace(av_meta=metas['av'], ar_meta=metas['ar']))
    metas[side] = {**metas[side], key: 'other'}
    assert train.build_settings(types.SimpleNamespace(av_meta=metas['av'], ar_meta=metas['ar'])) != before


def test_read_init_notes_nothing_for_a_file_of_this_model_and_data_or_one_without_base_model(monkeypatch, capsys):
    monkeypatch.setattr(train, 'base_model', 'm')
    for meta in ({'data_id': 'd'}, {'data_id': 'd', 'base_model': 'm'}):  # an older file names no base_model
        monkeypatch.setattr(nla, 'read_meta', lambda path, needs, data_meta: meta)
        assert train.read_init('x', ['lora_rank'], {'data_id': 'd'}) == meta
    assert capsys.readouterr().err == ''


def fresh_run():
    """What run_loop reads of a run that has made no step, on one CPU process."""
    return types.SimpleNamespace(step=0, eval_step=-1, bad_steps=0, skipped=0, stop=0, dev='cpu')


def test_log_interval_logs_the_steps_it_names(monkeypatch):
    """--log_interval=2 over 5 steps logs steps 2 and 4, and the last."""
    logged = []
    monkeypatch.setattr(train, 'log_interval', 2)
    monkeypatch.setattr(train, 'save_checkpoint', lambda run: None)
    monkeypatch.setattr(train, 'log', lambda run, record: logged.append((record['stage'], record['step'])))
    run = fresh_run()
    train.run_loop(run, 5, lambda step: {'ok': True}, lambda step: ({'stage': 'eval', 'step': step}, []))
    assert [s for stage, s in logged if stage != 'eval'] == [2, 4, 5]


def test_wandb_gets_each_stage_under_keys_of_its_own(monkeypatch, tmp_path):
    """An rl step and the eval at that step both log `fve`: under one key, wandb would keep only one of them."""
    monkeypatch.setattr(train, 'out_dir', str(tmp_path))
    mirrored = []
    run = types.SimpleNamespace(wandb_log=lambda values, step: mirrored.append((step, values)))
    train.log(run, {'stage': 'rl', 'step': 5, 'fve': 0.1, 'mean_len': 30})
    train.log(run, {'stage': 'eval', 'step': 5, 'fve': 0.2, 'rows': 8})
    assert mirrored == [(5, {'rl/fve': 0.1, 'rl/mean_len': 30}), (5, {'eval/fve': 0.2, 'eval/rows': 8})]
    assert [r['fve'] for r in read_log(tmp_path, 'rl') + read_log(tmp_path, 'eval')] == [0.1, 0.2]


def loop_events(monkeypatch, tmp_path, run, total, stop_at=None, stop_in_eval=None):
    """What run_loop does, as ('eval', step) and ('save', step), with a SIGTERM arriving during update(stop_at)
    or during the eval of step stop_in_eval."""
    events = []
    monkeypatch.setattr(train, 'out_dir', str(tmp_path))
    monkeypatch.setattr(train, 'eval_interval', 5)
    monkeypatch.setattr(train, 'ckpt_interval', 100)
    monkeypatch.setattr(train, 'save_checkpoint', lambda run: events.append(('save', run.step, run.eval_step)))

    def log(run, record):
        with open(tmp_path / 'log.jsonl', 'a') as f:
            f.write(json.dumps(record) + '\n')
    monkeypatch.setattr(train, 'log', log)

    def update(step):
        run.stop = run.stop or signal.SIGTERM * (step == stop_at)
        return {'ok': True}

    def evaluate_fn(step):
        events.append(('eval', step))
        run.stop = run.stop or signal.SIGTERM * (step == stop_in_eval)
        return {'stage': 'eval', 'step': step}, []
    try:
        train.run_loop(run, total, update, evaluate_fn)
    except SystemExit as e:
        return events, str(e)
    return events, None


def test_a_sigterm_before_an_eval_saves_at_once_and_the_resume_makes_that_eval(monkeypatch, tmp_path):
    run = fresh_run()
    events, message = loop_events(monkeypatch, tmp_path, run, 20, stop_at=4)
    assert events == [('eval', 0), ('save', 5, 0)] and 'stopped by SIGTERM at step 5' in message, events
    run.stop = 0
    events, message = loop_events(monkeypatch, tmp_path, run, 6, stop_at=99)
    assert events == [('eval', 5), ('eval', 6), ('save', 6, 6)] and message is None, events


def test_a_sigterm_in_the_last_step_saves_and_the_resume_saves_the_last_eval(monkeypatch, tmp_path):
    """Unsaved, the last eval would be dropped from the log by a later resume with a larger max_steps, and never made again."""
    run = fresh_run()
    events, message = loop_events(monkeypatch, tmp_path, run, 7, stop_at=6)
    assert events == [('eval', 0), ('eval', 5), ('save', 7, 5)] and 'stopped by SIGTERM at step 7' in message, events
    run.stop = 0
    events, message = loop_events(monkeypatch, tmp_path, run, 7)
    assert events == [('eval', 7), ('save', 7, 7)] and message is None, events


def test_a_sigterm_in_the_first_eval_leaves_nothing_that_stops_a_rerun(monkeypatch, tmp_path):
    run = fresh_run()
    events, message = loop_events(monkeypatch, tmp_path, run, 20, stop_in_eval=0)
    assert events == [('eval', 0)] and 'before the first step' in message, events
    assert not (tmp_path / 'log.jsonl').exists()


def test_response_mask_keeps_the_end_token_and_ignores_what_follows():
    """pad == eos must not mask the real end token: the mask comes from the first end, not from ids."""
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    mask, lengths, truncated = train.response_mask(ids, [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert lengths.tolist() == [2, 4, 1] and truncated.tolist() == [False, True, False]


@pytest.mark.parametrize('family', ['llama', 'gemma3'])  # gemma3: sliding-window layers, whose static cache is a ring
def test_static_cache_draws_the_same_rollouts_and_is_made_once(tiny_dir, family, monkeypatch):
    """gen_cache='static' (the fast path on a GPU) samples exactly what the dynamic cache samples, call after call, from
    one cache made at the first call (a cache at the same addresses keeps a GPU's recorded decode graph valid)."""
    monkeypatch.setattr(train, 'base_model', tiny_dir[family])
    monkeypatch.setattr(train, 'dtype', 'float32')
    monkeypatch.setattr(train, 'max_new_tokens', 16)
    tok = nla.load_tokenizer(tiny_dir[family])
    ids, pos = nla.av_prompt(tok, '@')
    built = []  # the StaticCaches made: the static run must really use one
    static_init = transformers.StaticCache.__init__
    monkeypatch.setattr(transformers.StaticCache, '__init__', lambda self, *a, **k: built.append(1) or static_init(self, *a, **k))
    out, caches = {}, {}
    for cache in ('dynamic', 'static'):
        monkeypatch.setattr(train, 'gen_cache', cache)
        torch.manual_seed(0)
        av, _, _ = train.build_av('', {}, tok, 'cpu')
        x = nla.inject(av, ids, pos, torch.randn(4, 64), 2.0)
        out[cache] = [train.rollouts(av, x, 2, nla.end_token_ids(av, tok), tok.pad_token_id, (0, step), 0) for step in range(3)]
        caches[cache], built[:] = len(built), []
    assert caches == {'dynamic': 0, 'static': 1}, caches
    for dynamic, static in zip(out['dynamic'], out['static']):
        assert all(torch.equal(a, b) for a, b in zip(dynamic, static))
    assert not torch.equal(out['static'][0][0], out['static'][1][0])  # other seeds: other samples
    assert out['static'][0][0].shape == (8, 16)
