"""The datagen contract on a real model: SmolLM2-135M-Instruct over a few Gutenberg documents.
Slow (about a minute to build the model the first time). Runs when ../shared is beside the checkout
(the model is built with ../shared/tools/smollm2.py into ~/.cache/nla/smollm2) or when NLA_SMOLLM2
names a model folder; NLA_CORPUS may name another corpus."""
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

import nla
from conftest import ROOT, run_script

SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
CORPUS = os.environ.get('NLA_CORPUS', os.path.join(SHARED, 'assets', 'gutenberg-docs.parquet'))
pytestmark = pytest.mark.skipif(not os.environ.get('NLA_SMOLLM2') and not os.path.isdir(SHARED),
                                reason='needs ../shared or NLA_SMOLLM2')


@pytest.fixture(scope='module')
def smollm2():
    if os.environ.get('NLA_SMOLLM2'):
        return os.environ['NLA_SMOLLM2']
    path = os.path.join(os.path.expanduser('~'), '.cache', 'nla', 'smollm2')
    p = subprocess.run([sys.executable, os.path.join(SHARED, 'tools', 'smollm2.py'), path], capture_output=True, text=True)
    assert p.returncode == 0, f"building SmolLM2 failed (needs gguf and accelerate):\n{p.stderr[-2000:]}"
    return path


def test_datagen_contract_on_smollm2(smollm2, tmp_path):
    if not os.path.isfile(CORPUS):
        pytest.skip(f'{CORPUS} not found')
    out = tmp_path / 'data'
    run_script('datagen.py', 'config/datagen_smollm2.py', f'--base_model={smollm2}', f'--corpus={CORPUS}',
               f'--out_dir={out}', '--max_docs=24', '--positions_per_doc=3', '--device=cpu', '--dtype=float32',
               '--batch_size=8', '--max_length=128')
    meta = json.loads((out / 'meta.json').read_text())
    assert (meta['layer'], meta['d_model']) == (20, 576)
    tok = nla.load_tokenizer(smollm2)
    assert tok.encode(meta['marker'], add_special_tokens=False) == [meta['marker_id']]
    assert 100 < meta['alpha'] < 500  # ~250 was measured on an H100 in bf16 (../shared/README.md)
    splits = {s: pq.read_table(out / f'{s}.parquet').to_pydict() for s in ('av_sft', 'ar_sft', 'rl', 'val')}
    docs = [set(t['doc_id']) for t in splits.values()]
    assert all(not (a & b) for i, a in enumerate(docs) for b in docs[i + 1:])
    model = nla.load_lm(smollm2, 'float32')
    texts = pq.read_table(CORPUS).column('text').to_pylist()
    rows = splits['val']
    for i in range(min(3, len(rows['doc_id']))):
        ids = tok(texts[rows['doc_id'][i]], truncation=True, max_length=128)['input_ids']
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[21][0, rows['position'][i]]
        torch.testing.assert_close(torch.tensor(rows['activation'][i]), hs, atol=1e-3, rtol=1e-3)
    assert all(nla.extract_explanation(e) for e in splits['av_sft']['explanation'])
