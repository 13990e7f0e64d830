"""Data parallelism: torchrun --nproc_per_node=2 on the CPU (gloo) against one process over the same
global batch. Each rank checks at every checkpoint that all ranks hold the same weights. Its pieces (the
gradient buckets, that check) are also tested in this process."""
import os
import signal
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import train

from conftest import ROOT, kill_group, read_log, run_script, wait_for_a_step


TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', os.path.join(ROOT, 'train.py')]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def torchrun(*args, ok=True):
    """train.py under torchrun with 2 ranks; (returncode, stderr). Killed with its ranks after 15 minutes (a hang)."""
    p = subprocess.Popen([*TORCHRUN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=ENV, start_new_session=True)
    try:
        out, err = p.communicate(timeout=900)
    finally:
        kill_group(p)
    if ok and p.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{out[-3000:]}\n{err[-3000:]}")
    return p.returncode, err


def assert_same_weights(a, b, name):
    a, b = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
    assert a.keys() == b.keys()
    for k in a:
        # Adam divides by sqrt(v): where a gradient is ~0, float noise of the two reduction orders
        # moves a weight by up to ~lr * 1e-2; a real mismatch moves many weights by ~lr
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=f"{name}: {k}")


def common(tiny_dir, tiny_data):
    # gen_batch_size = micro_batch = one rank's share, so both layouts make the same chunks and seeds
    return ['config/tiny.py', f'--base_model={tiny_dir["llama"]}', f'--data_dir={tiny_data}', '--micro_batch=8',
            '--gen_batch_size=8', '--ckpt_interval=1', '--eval_interval=100', '--max_new_tokens=64', '--length_slack=8']


@pytest.mark.parametrize('stage, weights', [('sft_av', ['av.safetensors']), ('sft_ar', ['ar.safetensors']),
                                            ('rl', ['av.safetensors', 'ar.safetensors'])])
def test_two_ranks_equal_one_process(tiny_dir, tiny_data, sft_runs, tmp_path, stage, weights):
    # 23 eval rows: 11 on one rank, 12 on the other
    args = [*common(tiny_dir, tiny_data), f'--stage={stage}', '--max_steps=2', '--lr=3e-3', '--ar_lr=3e-3', '--eval_rows=23']
    if stage == 'rl':
        args += [f'--init_av={sft_runs["av"]}', f'--init_ar={sft_runs["ar"]}']
    run_script('train.py', *args, f'--out_dir={tmp_path / "one"}')
    torchrun(*args, f'--out_dir={tmp_path / "two"}')
    for name in weights:
        assert_same_weights(tmp_path / 'one', tmp_path / 'two', name)
    one, two = read_log(tmp_path / 'one', stage), read_log(tmp_path / 'two', stage)
    keys = ['reward', 'reward_std', 'fve', 'extraction_rate', 'truncation_rate', 'mean_len', 'kl', 'entropy',
            'zero_adv_frac', 'ar_loss'] if stage == 'rl' else ['loss']
    for key in keys:  # logged metrics are over the global batch
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], abs=1e-4, nan_ok=True), key
    keys = {'sft_av': ['val_loss'], 'sft_ar': ['fve', 'val_mse'], 'rl': ['rows']}[stage]  # rl's evals sample
    for key in keys:  # at step 0 and at the last step
        assert [r[key] for r in read_log(tmp_path / 'one', 'eval')] == pytest.approx([r[key] for r in read_log(tmp_path / 'two', 'eval')], abs=1e-4), key
    init = load_file(os.path.join(sft_runs['ar'], 'ar.safetensors')) if stage == 'rl' else None
    if init is not None:  # the step really moved the AR
        assert not torch.equal(init['head.weight'], load_file(tmp_path / 'two' / 'ar.safetensors')['head.weight'])


def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_saved_step(tiny_dir, tiny_data, tmp_path):
    """The ranks agree on a stop: a rank stopping alone would leave the others waiting in the next collective."""
    out = tmp_path / 'run'
    with open(tmp_path / 'stderr', 'w') as err:
        p = subprocess.Popen([*TORCHRUN, *common(tiny_dir, tiny_data), '--stage=sft_ar', '--max_steps=100000', f'--out_dir={out}'],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=ENV, start_new_session=True)
        try:
            wait_for_a_step(p, out, 'sft_ar')
            ranks = open(f'/proc/{p.pid}/task/{p.pid}/children').read().split()
            assert len(ranks) == 2, ranks
            os.kill(int(ranks[1]), signal.SIGTERM)
            p.wait(timeout=300)
        finally:
            kill_group(p)
    err = (tmp_path / 'stderr').read_text()
    step = torch.load(out / 'ckpt.pt', weights_only=False)['step']
    assert p.returncode != 0 and err.count(f"train: stopped by SIGTERM at step {step}: ") == 1, err[-3000:]
    assert read_log(out, 'sft_ar')[-1]['step'] == step


def test_batch_must_divide_by_ranks(tiny_dir, tiny_data, tmp_path):
    returncode, err = torchrun(*common(tiny_dir, tiny_data), '--stage=sft_ar', '--batch_size=15', f'--out_dir={tmp_path}', ok=False)
    assert returncode != 0 and 'batch_size=15 must divide by the number of ranks, 2' in err


def test_process_group_threads_end_with_destroy(tiny_dir):
    # from_pretrained imports torch.distributed.nn, whose functions bind the live group as a default argument
    # when imported after init_process_group: the gloo threads then outlive destroy and a rank may abort at exit
    script = f"""import glob
import torch.distributed as dist, transformers, train
dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
transformers.AutoModelForCausalLM.from_pretrained({tiny_dir['llama']!r})
dist.destroy_process_group()
print(sorted(open(f).read().strip() for f in glob.glob('/proc/self/task/*/comm')))"""
    p = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert 'gloo' not in p.stdout, p.stdout


def test_gradient_buckets_give_every_gradient_back_to_its_parameter(monkeypatch):
    """allreduce_grads in buckets of at most 12 numbers (here [5 + 6], [3 in bf16], [11], [4 + 4]; a run's are 2**25),
    over one gloo rank whose all_reduce doubles (the sum over two ranks of equal gradients): each gradient comes back
    summed, whole, to its own parameter across bucket and dtype boundaries (the last one's too), and the parameter
    with no gradient (the fifth) gets zeros."""
    shapes = [((5,), torch.float32), ((2, 3), torch.float32), ((3,), torch.bfloat16), ((11,), torch.float32),
              ((4,), torch.float32), ((4,), torch.float32)]
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in shapes]
    want = [torch.randn(p.shape).to(p.dtype) for p in params]
    want[4] = torch.zeros(4)
    for i, (p, g) in enumerate(zip(params, want)):
        p.grad = None if i == 4 else g.clone()
    monkeypatch.setattr(train, 'ddp', True)
    monkeypatch.setattr(dist, 'all_reduce', lambda t: t.mul_(2))
    train.allreduce_grads(params, bucket_numel=12)
    assert all(torch.equal(p.grad, 2 * g) for p, g in zip(params, want))


def test_rank_slices_are_disjoint_and_cover_the_batch(monkeypatch):
    """Each of 4 ranks takes its own contiguous quarter of a global batch of 12 rows."""
    monkeypatch.setattr(train, 'ddp_world_size', 4)
    slices = []
    for rank in range(4):
        monkeypatch.setattr(train, 'ddp_rank', rank)
        slices.append(train.rank_slice(list(range(100, 112))))
    assert slices == [[100, 101, 102], [103, 104, 105], [106, 107, 108], [109, 110, 111]]


def test_ranks_that_hold_different_weights_stop_the_run(monkeypatch):
    model = torch.nn.Linear(3, 2)
    run = types.SimpleNamespace(av=model, av_opt=object(), ar=None, ar_opt=None, step=7)
    monkeypatch.setattr(train, 'ddp_world_size', 2)
    monkeypatch.setattr(dist, 'all_gather', lambda every, t: [e.copy_(t) for e in every])
    train.check_ranks_agree(run, 'cpu')  # the same sums on both ranks: no refusal
    monkeypatch.setattr(dist, 'all_gather', lambda every, t: [e.copy_(t + i) for i, e in enumerate(every)])
    with pytest.raises(SystemExit, match='ranks hold different weights at step 7'):
        train.check_ranks_agree(run, 'cpu')
