"""The vLLM path against stand-ins (vLLM itself is never needed here): the weight push, the engine
arguments, the post-processing of the engine's samples, and rl's vLLM branch with a stand-in engine. Where
vllm imports (no GPU needed), the same arguments and sampling parameters also go through vLLM's own classes;
test_vllm_engine.py runs an engine."""
import importlib.util
import os
import signal
import sys
import types

import pytest
import torch

import configurator
import nla
import train
from conftest import ROOT, read_log, rl_adapter_lora_B


class RecordingEngine:
    """Stands in for vllm.LLM: records the weights each reload_weights call receives."""

    def __init__(self):
        self.received = []

    def collective_rpc(self, method, kwargs):
        assert method == 'reload_weights'
        self.received.append({name: w.clone() for name, w in kwargs['weights_iterator']})


@pytest.mark.parametrize('family', ['llama', 'qwen3'])
def test_push_sends_every_weight_under_its_hf_name_merged_where_adapted(tiny_dir, family):
    torch.manual_seed(0)
    av = nla.add_lora(nla.load_lm(tiny_dir[family], 'float32'), 4, 8.0)
    hf = dict(nla.load_lm(tiny_dir[family], 'float32').named_parameters())
    base = {n: m.base.weight.clone() for n, m in nla.lora_layers(av)}
    engine = RecordingEngine()
    for _ in range(50):
        with torch.no_grad():
            for _, m in nla.lora_layers(av):
                m.lora_B.add_(torch.randn_like(m.lora_B) * 0.01)
        train.push_weights(engine, av)
    assert len(engine.received) == 50
    last = engine.received[-1]
    assert sorted(last) == sorted(hf)  # the checkpoint's names, a tied weight once
    adapted = {f"{n}.weight": (n, m) for n, m in nla.lora_layers(av)}
    assert len(adapted) == 7 * av.config.num_hidden_layers
    for name, w in last.items():
        assert w.shape == hf[name].shape and w.dtype == hf[name].dtype
        if name in adapted:
            layer, m = adapted[name]
            torch.testing.assert_close(w, base[layer] + m.scale * m.lora_B @ m.lora_A)
            assert torch.equal(m.base.weight, base[layer])  # 50 pushes never touched W
        else:
            assert torch.equal(w, hf[name]), name


def test_push_includes_the_frozen_sft_adapter(tiny_dir):
    av = nla.add_lora(nla.load_lm(tiny_dir['llama'], 'float32'), 4, 8.0)
    with torch.no_grad():
        for _, m in nla.lora_layers(av):
            m.lora_B.normal_()
    want = {f"{n}.weight": m.merged_weight() for n, m in nla.lora_layers(av)}
    nla.freeze_lora_(av)
    engine = RecordingEngine()
    train.push_weights(engine, av)
    for k, w in want.items():
        torch.testing.assert_close(engine.received[0][k], w, atol=1e-5, rtol=1e-5)


def test_engine_args_from_the_config(monkeypatch):
    for k, v in dict(base_model='m', dtype='bfloat16', seed=7, ddp_rank=1, ddp=True, vllm_gpu_memory=0.25,
                     max_new_tokens=96).items():
        monkeypatch.setattr(train, k, v)
    args = train.engine_args(40)
    assert args['enable_prompt_embeds'] is True and args['enable_prefix_caching'] is False and args['enable_chunked_prefill'] is False
    assert args['max_model_len'] == 136 and args['gpu_memory_utilization'] == 0.25
    assert args['dtype'] == 'bfloat16' and args['seed'] == 8 and args['model'] == 'm'
    assert args['distributed_executor_backend'] == 'external_launcher'


def test_vllm_rollouts_postprocessing(monkeypatch):
    """Lengths, masks and log-probs from the engine's samples; prompts go in as CPU embeddings."""
    calls = {}

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            calls['prompts'], calls['params'] = prompts, params
            lp = lambda ids: [{t: types.SimpleNamespace(logprob=-0.1 * (j + 1))} for j, t in enumerate(ids)]
            done = types.SimpleNamespace(token_ids=[5, 6, 2], logprobs=lp([5, 6, 2]), finish_reason='stop')
            cut = types.SimpleNamespace(token_ids=[7, 7, 7, 7], logprobs=lp([7, 7, 7, 7]), finish_reason='length')
            return [types.SimpleNamespace(outputs=[done, cut]) for _ in prompts]

    monkeypatch.setitem(sys.modules, 'vllm', types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(train, 'max_new_tokens', 4)
    embeds = torch.randn(3, 5, 8)
    ids, mask, lengths, truncated, logp = train.vllm_rollouts(FakeLLM(), embeds, 2, [2], 0, (0, 3), 10)
    assert ids.shape == (6, 4) and lengths.tolist() == [3, 4] * 3 and truncated.tolist() == [False, True] * 3
    assert mask[0].tolist() == [1, 1, 1, 0] and ids[0].tolist() == [5, 6, 2, 0]
    assert logp[0].tolist() == pytest.approx([-0.1, -0.2, -0.3, 0.0])
    p = calls['params'][0]
    assert (p['temperature'], p['top_p'], p['top_k'], p['n'], p['logprobs']) == (1.0, 1.0, -1, 2, 0)
    assert p['stop_token_ids'] == [2] and len({q['seed'] for q in calls['params']}) == 3
    assert calls['prompts'][0]['prompt_embeds'].device.type == 'cpu'
    torch.testing.assert_close(calls['prompts'][1]['prompt_embeds'], embeds[1])


def test_vllm_rollouts_seed_each_prompt_by_its_row_in_the_global_batch(monkeypatch):
    """Prompts 1 and 2 of a batch starting at row 10 (2 rollouts each: rows 12 and 14) get the seeds that the same
    prompts get as prompts 0 and 1 of a batch starting at row 12, as on another rank: the split does not change the draws."""
    seeds = []

    class SeedRecorder:
        def generate(self, prompts, params, use_tqdm):
            seeds.append([p['seed'] for p in params])
            return [types.SimpleNamespace(outputs=[]) for _ in prompts]

    monkeypatch.setitem(sys.modules, 'vllm', types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    embeds = torch.randn(3, 5, 8)
    train.vllm_rollouts(SeedRecorder(), embeds, 2, [2], 0, (0, 3), 10)
    train.vllm_rollouts(SeedRecorder(), embeds[1:], 2, [2], 0, (0, 3), 12)
    assert seeds[1] == seeds[0][1:] and len(set(seeds[0])) == 3


def rl_with_a_stand_in_engine(monkeypatch, tiny_dir, tiny_data, sft_runs, out, *args):
    """`train.py config/tiny.py --stage=rl --rollout=vllm *args` in-process, its engine a stand-in: the HF sampler
    draws the rollouts, from the policy of the last push, and reports log-probs of 0 for every token. Returns the pushes."""
    pushes = []
    monkeypatch.setattr(train, 'importlib', types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: object())))
    monkeypatch.setattr(train, 'start_engine', lambda prompt_len, dev: 'engine')
    monkeypatch.setattr(train, 'push_weights', lambda engine, av: pushes.append(av))

    def sample(engine, embeds, n_per_prompt, *rest):
        ids, mask, lengths, truncated = train.rollouts(pushes[-1], embeds, n_per_prompt, *rest)
        return ids, mask, lengths, truncated, torch.zeros(ids.shape)
    monkeypatch.setattr(train, 'vllm_rollouts', sample)
    monkeypatch.setattr(signal, 'signal', lambda *a: None)  # main's SIGTERM handler stays out of the test process
    config = configurator.configure(dict(vars(train)), [
        os.path.join(ROOT, 'config', 'tiny.py'), f'--base_model={tiny_dir["llama"]}', f'--data_dir={tiny_data}', '--stage=rl',
        '--rollout=vllm', f'--init_av={sft_runs["av"]}', f'--init_ar={sft_runs["ar"]}', f'--out_dir={out}', '--max_steps=2',
        '--eval_interval=100', '--max_new_tokens=64', '--length_slack=8', '--lr=1e-3', *args])
    for k, v in config.items():
        monkeypatch.setattr(train, k, v)
    train.main(config)
    return pushes


@pytest.mark.parametrize('max_logprob_diff, dropped', [(0.001, True), (1e9, False)])
def test_rollouts_the_trainer_disagrees_with_are_left_out_of_the_loss(tiny_dir, tiny_data, sft_runs, tmp_path, monkeypatch,
                                                                     max_logprob_diff, dropped):
    """Sampler log-probs of 0 are far from the trainer's: under a max_logprob_diff below that gap every rollout is
    left out, so the AV stays where it started; above it none is, and the AV moves. The engine gets the policy at
    the start and after each step."""
    out = tmp_path / 'rl'
    pushes = rl_with_a_stand_in_engine(monkeypatch, tiny_dir, tiny_data, sft_runs, out, f'--max_logprob_diff={max_logprob_diff}')
    assert len(pushes) == 3
    steps = read_log(out, 'rl')
    assert [r['sampler_dropped'] for r in steps] == ([16, 16] if dropped else [0, 0]), steps
    assert all(r['sampler_logp_diff'] > 0.5 for r in steps), steps
    moved = [bool(w.any()) for w in rl_adapter_lora_B(out)]
    assert moved and all(m != dropped for m in moved), moved


def test_wrong_vllm_version_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, 'vllm', types.SimpleNamespace(__version__='0.33.0'))
    with pytest.raises(SystemExit, match='written against vllm==0.26.0, this is 0.33.0'):
        train.start_engine(10, 'cpu')


def test_engine_on_another_device_than_the_trainer_is_refused(monkeypatch):
    platforms = types.SimpleNamespace(current_platform=types.SimpleNamespace(device_type='cuda'))
    monkeypatch.setitem(sys.modules, 'vllm', types.SimpleNamespace(__version__='0.26.0', platforms=platforms))
    monkeypatch.setitem(sys.modules, 'vllm.platforms', platforms)
    with pytest.raises(SystemExit, match="this vllm build runs on 'cuda', the trainer on 'cpu'"):
        train.start_engine(10, 'cpu')


needs_vllm = pytest.mark.skipif(importlib.util.find_spec('vllm') is None, reason='needs vllm==0.26.0 (no GPU needed)')


@needs_vllm
def test_engine_args_are_vllm_engine_args(tiny_dir, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    monkeypatch.setattr(train, 'base_model', tiny_dir['llama'])  # a local folder: offline, vLLM resolves a hub name
    for ddp in (False, True):
        monkeypatch.setattr(train, 'ddp', ddp)
        args = EngineArgs(**train.engine_args(40))  # vllm.LLM passes them on to EngineArgs
        assert args.enable_prompt_embeds and not args.enable_prefix_caching and not args.enable_chunked_prefill


@needs_vllm
def test_sampling_params_and_outputs_are_vllms(monkeypatch):
    """vllm_rollouts builds real SamplingParams and reads real CompletionOutputs (logprobs as vLLM fills them)."""
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput
    seen = {}

    class EngineWithVllmOutputs:
        def generate(self, prompts, params, use_tqdm):
            seen['params'] = params
            outs = [CompletionOutput(index=i, text='', token_ids=ids, cumulative_logprob=None, finish_reason=why,
                                     logprobs=[{t: Logprob(logprob=-0.5, rank=1)} for t in ids])
                    for i, (ids, why) in enumerate([([5, 2], 'stop'), ([7, 7, 7], 'length')])]
            return [RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=None, prompt_logprobs=None,
                                  outputs=outs, finished=True) for i in range(len(prompts))]

    monkeypatch.setattr(train, 'max_new_tokens', 3)
    ids, mask, lengths, truncated, logp = train.vllm_rollouts(EngineWithVllmOutputs(), torch.randn(2, 4, 8), 2, [2], 0, (0, 1), 0)
    p = seen['params'][0]
    assert (p.temperature, p.top_p, p.top_k, p.n, p.logprobs) == (1.0, 1.0, -1, 2, 0) and p.stop_token_ids == [2]
    assert p.all_stop_token_ids >= {2}  # the end token ends the sample and stays in its token_ids
    assert lengths.tolist() == [2, 3, 2, 3] and truncated.tolist() == [False, True, False, True]
    assert logp[0].tolist() == [-0.5, -0.5, 0.0]
