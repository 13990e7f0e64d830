"""Tiny stand-ins built in-test, so nothing is downloaded: a byte-level BPE tokenizer with a chat
template, random Llama and Qwen3 models from a config, and a synthetic corpus."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("the a of and to in was he she it that his her with as for had you not on at but by which "
         "king river night house window letter garden road sea ship captain doctor mother father "
         "walked said looked heard thought turned opened smiled answered remembered wrote carried "
         "old young dark bright quiet cold long little great strange silent early").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def synthetic_docs(n, seed=0, words=(60, 160)):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(*words) // 8):
            s = [rng.choice(WORDS) for _ in range(rng.randint(5, 11))]
            sentences.append(" ".join(s).capitalize() + rng.choice([".", ".", ",", "!", "?"]))
        docs.append(" ".join(sentences))
    return docs


def make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from nla import AR_TEMPLATE, AV_USER
    AV_TEXT, AR_TEXT = AV_USER, AR_TEMPLATE
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = synthetic_docs(200, seed=1) + [AV_TEXT, "<explanation>\n- ends with: earlier words: </explanation>", AR_TEXT] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_model(path, family, tok, layers=4, **config):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=None)
    common.update(config)
    if family == 'llama':
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == 'qwen3':
        model = Qwen3ForCausalLM(Qwen3Config(**{'head_dim': 16, **common}))
    else:  # full and sliding-window layers: the AR's truncated config must keep them in order
        layer_types = ['full_attention'] + ['sliding_attention'] * (layers - 1)
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, sliding_window=8, layer_types=layer_types, **common))
    with torch.no_grad():  # a random head (tied to the embedding) is too small for confident logits: LoRA could not learn a format
        model.get_input_embeddings().weight.mul_(10)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_gpt2():
    """A random GPT-2, whose blocks' projections are Conv1D, not nn.Linear: LoRA has nothing to wrap."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2))


@pytest.fixture(scope='session')
def tiny_dir(tmp_path_factory):
    """{'llama', 'qwen3', 'gemma3': model folders, 'corpus': parquet}: tiny random models with the test tokenizer."""
    root = tmp_path_factory.mktemp('tiny')
    tok = make_tokenizer(str(root / 'tok'))
    out = {f: make_model(str(root / f), f, tok) for f in ('llama', 'qwen3', 'gemma3')}
    out['corpus'] = str(root / 'corpus.parquet')
    pq.write_table(pa.table({'text': synthetic_docs(60)}), out['corpus'])
    return out


def run_script(script, *args, ok=True, env=None, cwd=ROOT):
    """Run a top-level script as a user would; check its exit status, and that a failure is one line, not a traceback.
    A script that hangs is killed after 15 minutes, failing the test, rather than stalling the suite."""
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                       text=True, env=full_env, cwd=cwd, timeout=900)
    if ok and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    if not ok:
        assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    return p


@pytest.fixture(scope='session')
def tiny_data(tiny_dir, tmp_path_factory):
    """datagen output for the tiny Llama: layer 1 of 4, 400 documents, 4 positions each."""
    root = tmp_path_factory.mktemp('data')
    corpus = str(root / 'corpus.parquet')
    pq.write_table(pa.table({'text': synthetic_docs(400)}), corpus)
    out = str(root / 'tiny')
    run_script('datagen.py', 'config/datagen_tiny.py', f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}',
               f'--out_dir={out}', '--layer=1')
    return out


def read_log(out_dir, stage=None):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if stage is None or r['stage'] == stage]


def rl_adapter_lora_B(out_dir):
    """The lora_B weights of the adapter an rl run trains (adapter1, on top of the frozen SFT one): they start at 0."""
    return [w for k, w in load_file(os.path.join(out_dir, 'av.safetensors')).items()
            if k.startswith('adapter1.') and k.endswith('.lora_B')]


def kill_group(p):
    """Kill p and whatever it started, if still running: p was started with start_new_session=True, so that a test
    that fails while its run is under way leaves no run (or torchrun's ranks) behind."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def wait_for_a_step(p, out_dir, stage, timeout=300):
    """Wait until the run p has logged a step of `stage`; fail if it ends first or takes over `timeout` s."""
    deadline = time.time() + timeout
    while True:
        try:
            if read_log(out_dir, stage):
                return
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line being written
            pass
        assert p.poll() is None, f"the run ended before its first step (exit {p.returncode})"
        assert time.time() < deadline, f"no {stage} step logged in {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope='session')
def sft_runs(tiny_dir, tiny_data, tmp_path_factory):
    """The SFT stages on the tiny data: {'av': out_dir, 'ar': out_dir, 'ar_context': out_dir}."""
    root = tmp_path_factory.mktemp('sft')
    base = ['config/tiny.py', f'--base_model={tiny_dir["llama"]}', f'--data_dir={tiny_data}']
    out = {k: str(root / k) for k in ('av', 'ar', 'ar_context')}
    run_script('train.py', *base, '--stage=sft_av', f'--out_dir={out["av"]}', '--epochs=5', '--lr=3e-3', '--eval_interval=50')
    # ar_lr 2e-3: at 3e-3 the AR sometimes stays on the constant-prediction plateau (1 seed in 4 on one draw of the data)
    run_script('train.py', *base, '--stage=sft_ar', f'--out_dir={out["ar"]}', '--max_steps=300', '--ar_lr=2e-3',
               '--eval_interval=100', '--eval_rows=160')
    run_script('train.py', *base, '--stage=sft_ar', '--ar_input=context', f'--out_dir={out["ar_context"]}',
               '--max_steps=100', '--ar_lr=3e-3', '--eval_interval=100', '--eval_rows=160')
    return out


def broken_copy(tiny_data, tmp_path, meta_edit=None, val=None):
    """A copy of the tiny data with meta.json's text edited or the val split replaced."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    if meta_edit is not None:
        (data / 'meta.json').write_text(meta_edit(json.loads((data / 'meta.json').read_text())))
    if val == 'cut':
        raw = (data / 'val.parquet').read_bytes()
        (data / 'val.parquet').write_bytes(raw[:len(raw) // 2])
    elif val is not None:
        pq.write_table(val(pq.read_table(data / 'val.parquet')), data / 'val.parquet')
    return str(data)


def zero_first_activation(table):
    acts = table.column('activation').combine_chunks()
    flat = acts.flatten().to_numpy().copy()
    flat[:acts.type.list_size] = 0
    return table.set_column(table.column_names.index('activation'), 'activation',
                            pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), acts.type.list_size))
